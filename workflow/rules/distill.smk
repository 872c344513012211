rule distill:
    input:
        teacher=f"{ROOT}/train/{PIPE['teacher']}/ckpt-{W.step_dir(PIPE['train_steps'])}.pt",
        latents=f"{ROOT}/latents/manifest.json",
    output:
        ckpts=[str(W.checkpoint_path(PIPE, W.student(PIPE), s)) for s in PIPE["distill_eval_steps"]],
        log=f"{ROOT}/distill/{PIPE['teacher']}/log.csv",
    params:
        **stage_params("distill"),
    threads: 1
    priority: 15  # on the critical path: as soon as the teacher is trained
    script:
        "../scripts/stage.py"
