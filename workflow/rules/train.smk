rule train:
    input:
        f"{ROOT}/latents/manifest.json",
    output:
        ckpts=[f"{ROOT}/train/{{run}}/ckpt-{W.step_dir(s)}.pt" for s in PIPE["eval_steps"]],
        log=f"{ROOT}/train/{{run}}/log.csv",
    params:
        **stage_params("train", run=lambda wc: wc.run),
    resources:
        gpus=lambda wc: W.launcher_settings(PIPE, "train").get("gpus_per_node", 0),
    threads: 1
    script:
        "../scripts/stage.py"
