include: "common.smk"

AE_TINY = EXP.stage_config("encode")["autoencoder"]["name"] == "tiny"
CLASSIFIER = EXP.pipe["extractor"] == "classifier"
AUTOENCODER_WEIGHTS = str(LAYOUT.autoencoder_dir() / "model.safetensors")
CLASSIFIER_WEIGHTS = str(LAYOUT.classifier_dir() / "model.safetensors")
REFERENCE = str(LAYOUT.reference(EXP.pipe["extractor"]))


rule autoencoder:
    output:
        weights=AUTOENCODER_WEIGHTS,
        grid=report(str(LAYOUT.autoencoder_dir() / "recon.png"), caption="../report/autoencoder.rst", category="Data"),
        metrics=str(LAYOUT.autoencoder_dir() / "metrics.json"),
    params:
        **stage_params("autoencoder"),
    resources:
        gpus=EXP.launcher("autoencoder").get("gpus_per_node", 0),
    threads: 2
    priority: 30  # everything waits on the latents: first, before the classifier takes a core
    script:
        "../scripts/stage.py"


rule encode:
    input:
        ([AUTOENCODER_WEIGHTS] if AE_TINY else []),
    output:
        str(LAYOUT.latents_dir() / "manifest.json"),
    params:
        **stage_params("encode"),
    threads: 2
    priority: 30
    script:
        "../scripts/stage.py"


rule classifier:
    output:
        CLASSIFIER_WEIGHTS,
        str(LAYOUT.classifier_dir() / "metrics.json"),
    params:
        **stage_params("classifier"),
    threads: 1
    priority: 15  # every evaluation needs it (through the reference): beside the teacher, before the other runs
    script:
        "../scripts/stage.py"


rule reference:
    input:
        ([CLASSIFIER_WEIGHTS] if CLASSIFIER else []),
    output:
        REFERENCE,
    params:
        **stage_params("reference"),
    threads: 1
    priority: 15
    script:
        "../scripts/stage.py"
