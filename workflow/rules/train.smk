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
    # the teacher first (sCD and its evaluations wait on it), then every run before the curve evaluations: those
    # are short and fill the last minutes on both cores, where a late training run would leave one idle
    priority: lambda wc: 20 if wc.run == PIPE["teacher"] else 12
    script:
        "../scripts/stage.py"
