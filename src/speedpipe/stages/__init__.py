"""Pipeline stages: each module's run(cfg) reads its input files and writes its outputs atomically.

A stage's version goes into its Snakemake params: bump it when the stage's behaviour changes so that
Snakemake re-runs the stage (it does not notice edits to imported modules by itself).
"""
STAGE_VERSIONS = {
    "autoencoder": 1,
    "encode": 1,
    "classifier": 1,
    "reference": 1,
    "train": 1,
    "distill": 2,  # 2: TrigFlow data = σ_d · latents
    "sample": 2,  # 2: scm samplers return latents (÷ σ_d)
    "evaluate": 1,
    "report": 1,
}
