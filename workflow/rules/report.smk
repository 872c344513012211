# The report: one job reads every metrics file, sample grid, log and resource record and writes the tables (each named
# table of the experiment file, the metrics of every run, sCM vs its teachers, where the time went), the figures and
# the experiment's README. Each named table's own caption travels as a label (the .rst caption is shared by all).
TABLE_LABELS = {t: {"table": t, "caption": table.caption or "-"} for t, table in EXP.tables.items()}
TABLE_OUTPUTS = {f"table_{t}": report(str(LAYOUT.table(t, "md")), caption="../report/named_table.rst", category="Tables",
                                     subcategory=t, labels=TABLE_LABELS[t]) for t in EXP.tables}
TABLE_FIGURES = {f"figure_{t}": report(str(LAYOUT.figure(t)), caption="../report/named_table_figure.rst", category="Figures",
                                      subcategory=t, labels=TABLE_LABELS[t]) for t in EXP.tables}
BUDGET_FIGURES = {f"budgets_{t}": report(str(LAYOUT.figure(f"{t}_budgets")), caption="../report/budgets.rst", category="Figures",
                                        subcategory=t, labels=TABLE_LABELS[t]) for t, table in EXP.tables.items() if table.budgets}
SCM_OUTPUTS = dict(
    scm=report(str(LAYOUT.table("scm", "md")), caption="../report/scm.rst", category="Tables"),
    scm_grids=report(str(LAYOUT.figure("teacher_vs_scm")), caption="../report/scm_grids.rst", category="Figures"),
    distillation=report(str(LAYOUT.figure("distillation")), caption="../report/distillation.rst", category="Figures"),
    **({"teacher_grid": report(str(LAYOUT.figure("teacher_grid")), caption="../report/teacher_grid.rst", category="Figures")}
       if EXP.teachers else {}),
) if EXP.distill_runs else {}


rule report:
    input:
        metrics=[str(EXP.metrics(e)) for e in EXP.evaluations()],
        grids=[str(EXP.samples(e, "png")) for e in EXP.evaluations()],
        logs=[str(r.log) for r in [*EXP.train_runs.values(), *EXP.distill_runs.values()]],
        usage=[u["path"] for u in EXP.report_config()["usage"]],
    output:
        readme=str(LAYOUT.readme()),
        metrics=report(str(LAYOUT.table("metrics", "md")), caption="../report/fid_table.rst", category="Tables"),
        time_table=report(str(LAYOUT.table("usage", "md")), caption="../report/usage.rst", category="Tables"),
        loss=report(str(LAYOUT.figure("training_loss")), caption="../report/loss.rst", category="Figures"),
        timesteps=report(str(LAYOUT.figure("timestep_methods")), caption="../report/timesteps.rst", category="Figures"),
        grids=report(str(LAYOUT.figure("samples_per_method")), caption="../report/grids.rst", category="Figures"),
        **TABLE_OUTPUTS,
        **TABLE_FIGURES,
        **BUDGET_FIGURES,
        **SCM_OUTPUTS,
    log:
        str(LAYOUT.job_log("report")),
    benchmark:
        str(LAYOUT.job_benchmark("report"))
    params:
        stages=lambda wc: EXP.job_params("report"),
    conda:
        ENV
    threads: 1
    script:
        "../scripts/stage.py"
