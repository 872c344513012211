# Training: one job per run (method x seed), a checkpoint at every evaluated step.


rule train:
    input:
        str(DATA.latents_dir() / "manifest.json"),
    output:
        ckpts=[str(checkpoint_path(LAYOUT.run_dir("train", "{run}"), s)) for s in EXP.pipe["eval_steps"]],
        log=str(LAYOUT.run_dir("train", "{run}") / "log.csv"),
        usage=str(LAYOUT.job_usage("train", "{run}")),
    log:
        str(LAYOUT.job_log("train", "{run}")),
    benchmark:
        str(LAYOUT.job_benchmark("train", "{run}"))
    params:
        stages=lambda wc: EXP.job_params("train", wc),
    conda:
        ENV
    resources:
        gpus=EXP.launcher("train").get("gpus_per_node", 0),
    threads: 1
    # the teachers first (the consistency models and their evaluations wait on them), then every run before the curve evaluations: those
    # are short and fill the last minutes on both cores, where a late training run would leave one idle
    priority: lambda wc: 20 if EXP.train_runs[wc.run] in EXP.teachers else 12
    script:
        "../scripts/stage.py"
