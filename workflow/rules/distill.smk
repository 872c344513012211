# Consistency models: one student per teacher run and consistency method (the experiment file's consistency_methods;
# the method is the job's distill.method), from the teacher's final checkpoint and the latent store; and one per method
# of teacher_free, from the latent store alone.


rule distill:
    input:
        teacher=lambda wc: [str(t.checkpoint(EXP.pipe["train_steps"])) for t in [EXP.distill_runs[wc.student].teacher] if t],
        latents=str(DATA.latents_dir() / "manifest.json"),
    output:
        ckpts=[str(checkpoint_path(LAYOUT.run_dir("distill", "{student}"), s)) for s in EXP.pipe.get("distill_eval_steps", [])],
        log=str(LAYOUT.run_dir("distill", "{student}") / "log.csv"),
        usage=str(LAYOUT.job_usage("distill", "{student}")),
    log:
        str(LAYOUT.job_log("distill", "{student}")),
    benchmark:
        str(LAYOUT.job_benchmark("distill", "{student}"))
    params:
        stages=lambda wc: EXP.job_params("distill", wc),
    conda:
        ENV
    resources:
        gpus=EXP.launcher("distill").get("gpus_per_node", 0),
    threads: 1
    priority: 15  # on the critical path: as soon as the teacher is trained
    script:
        "../scripts/stage.py"
