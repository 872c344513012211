rule distill:
    input:
        teacher=f"{ROOT}/train/{PIPE['teacher']}/ckpt-{W.step_dir(PIPE['train_steps'])}.pt",
        latents=f"{ROOT}/latents/manifest.json",
    output:
        ckpt=f"{ROOT}/distill/{PIPE['teacher']}/ckpt-{W.step_dir(PIPE['distill_steps'])}.pt",
        log=f"{ROOT}/distill/{PIPE['teacher']}/log.csv",
    params:
        **stage_params("distill"),
    threads: 2
    script:
        "../scripts/stage.py"
