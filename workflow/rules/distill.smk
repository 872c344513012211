rule distill:
    input:
        teacher=lambda wc: str(EXP.train_runs[wc.teacher].checkpoint(EXP.pipe["train_steps"])),
        latents=str(LAYOUT.latents_dir() / "manifest.json"),
    output:
        ckpts=[str(checkpoint_path(LAYOUT.run_dir("distill", "{teacher}"), s)) for s in EXP.pipe.get("distill_eval_steps", [])],
        log=str(LAYOUT.run_dir("distill", "{teacher}") / "log.csv"),
    params:
        **stage_params("distill", run=lambda wc: EXP.distill_runs[student_run_name(wc.teacher)]),
    threads: 1
    priority: 15  # on the critical path: as soon as the teacher is trained
    script:
        "../scripts/stage.py"
