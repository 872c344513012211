include: "common.smk"

AE_TINY = W.stage_config(PIPE, "encode")["autoencoder"]["name"] == "tiny"
CLASSIFIER = PIPE["extractor"] == "classifier"


rule autoencoder:
    output:
        weights=f"{ROOT}/autoencoder/model.safetensors",
        grid=report(f"{ROOT}/autoencoder/recon.png", caption="../report/autoencoder.rst", category="Data"),
        metrics=f"{ROOT}/autoencoder/metrics.json",
    params:
        **stage_params("autoencoder"),
    resources:
        gpus=lambda wc: W.launcher_settings(PIPE, "autoencoder").get("gpus_per_node", 0),
    threads: 2
    priority: 30  # everything waits on the latents: first, before the classifier takes a core
    script:
        "../scripts/stage.py"


rule encode:
    input:
        ([f"{ROOT}/autoencoder/model.safetensors"] if AE_TINY else []),
    output:
        f"{ROOT}/latents/manifest.json",
    params:
        **stage_params("encode"),
    threads: 2
    priority: 30
    script:
        "../scripts/stage.py"


rule classifier:
    output:
        f"{ROOT}/classifier/model.safetensors",
        f"{ROOT}/classifier/metrics.json",
    params:
        **stage_params("classifier"),
    threads: 1
    priority: 15  # every evaluation needs it (through the reference): beside the teacher, before the other runs
    script:
        "../scripts/stage.py"


rule reference:
    input:
        ([f"{ROOT}/classifier/model.safetensors"] if CLASSIFIER else []),
    output:
        f"{ROOT}/reference/stats-{PIPE['extractor']}.pt",
    params:
        **stage_params("reference"),
    threads: 1
    priority: 15
    script:
        "../scripts/stage.py"
