rule report:
    input:
        metrics=[W.metrics_output(PIPE, r, s, k) for r, s, k in W.evaluations(PIPE)],
        logs=[f"{ROOT}/train/{r}/log.csv" for r in W.runs(PIPE)],
        distill_log=f"{ROOT}/distill/{PIPE['teacher']}/log.csv",
    output:
        readme=f"{ROOT}/README.md",
        fid_table=report(f"{ROOT}/tables/fid.md", caption="../report/fid_table.rst", category="Tables"),
        speedup=report(f"{ROOT}/tables/speedup.md", caption="../report/speedup.rst", category="Tables"),
        scm=report(f"{ROOT}/tables/scm.md", caption="../report/scm.rst", category="Tables"),
        fid_curve=report(f"{ROOT}/figures/fid_vs_iterations.png", caption="../report/fid_curve.rst", category="Figures"),
        loss=report(f"{ROOT}/figures/training_loss.png", caption="../report/loss.rst", category="Figures"),
        timesteps=report(f"{ROOT}/figures/timestep_methods.png", caption="../report/timesteps.rst", category="Figures"),
        grids=report(f"{ROOT}/figures/samples_per_method.png", caption="../report/grids.rst", category="Figures"),
        scm_grids=report(f"{ROOT}/figures/teacher_vs_scm.png", caption="../report/scm_grids.rst", category="Figures"),
        teacher_grid=report(f"{ROOT}/figures/teacher_grid.png", caption="../report/teacher_grid.rst", category="Figures"),
        distillation=report(f"{ROOT}/figures/distillation.png", caption="../report/distillation.rst", category="Figures"),
    params:
        config=lambda wc: W.report_config(PIPE),
        version=STAGE_VERSIONS["report"],
        launcher={"executor": "local"},
    threads: 1
    script:
        "../scripts/stage.py"
