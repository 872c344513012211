# The data stages: the tiny autoencoder (when the experiment trains its own), the latent store, the dataset's classifier
# (feature extractor and label-accuracy judge) and the FID reference statistics of the real images.


rule autoencoder:
    output:
        weights=AUTOENCODER_WEIGHTS,
        grid=report(str(LAYOUT.autoencoder_dir() / "recon.png"), caption="../report/autoencoder.rst", category="Data"),
        metrics=str(LAYOUT.autoencoder_dir() / "metrics.json"),
        usage=str(LAYOUT.job_usage("autoencoder")),
    log:
        str(LAYOUT.job_log("autoencoder")),
    benchmark:
        str(LAYOUT.job_benchmark("autoencoder"))
    params:
        stages=lambda wc: EXP.job_params("autoencoder"),
    conda:
        ENV
    resources:
        gpus=EXP.launcher("autoencoder").get("gpus_per_node", 0),
    threads: 2
    priority: 30  # everything waits on the latents: first, before the classifier takes a core
    script:
        "../scripts/stage.py"


rule encode:
    input:
        [AUTOENCODER_WEIGHTS] if AE_TINY else [],
    output:
        manifest=str(LAYOUT.latents_dir() / "manifest.json"),
        usage=str(LAYOUT.job_usage("encode")),
    log:
        str(LAYOUT.job_log("encode")),
    benchmark:
        str(LAYOUT.job_benchmark("encode"))
    params:
        stages=lambda wc: EXP.job_params("encode"),
    conda:
        ENV
    resources:
        gpus=EXP.launcher("encode").get("gpus_per_node", 0),
    threads: 2
    priority: 30
    script:
        "../scripts/stage.py"


rule classifier:
    output:
        weights=CLASSIFIER_WEIGHTS,
        metrics=str(LAYOUT.classifier_dir() / "metrics.json"),
        usage=str(LAYOUT.job_usage("classifier")),
    log:
        str(LAYOUT.job_log("classifier")),
    benchmark:
        str(LAYOUT.job_benchmark("classifier"))
    params:
        stages=lambda wc: EXP.job_params("classifier"),
    conda:
        ENV
    threads: 1
    priority: 15  # every evaluation needs it (through the reference): beside the teacher, before the other runs
    script:
        "../scripts/stage.py"


rule reference:
    input:
        [CLASSIFIER_WEIGHTS] if EXP.pipe["extractor"] == "classifier" else [],
    output:
        stats=REFERENCE,
        usage=str(LAYOUT.job_usage("reference")),
    log:
        str(LAYOUT.job_log("reference")),
    benchmark:
        str(LAYOUT.job_benchmark("reference"))
    params:
        stages=lambda wc: EXP.job_params("reference"),
    conda:
        ENV
    resources:
        gpus=EXP.launcher("reference").get("gpus_per_node", 0),
    threads: 1
    priority: 15
    script:
        "../scripts/stage.py"
