"""Pipeline stages: each module's run(cfg) reads its input files and writes its outputs atomically.

A stage's version goes into its Snakemake params: bump it when the stage's behaviour changes so that
Snakemake re-runs the stage (it does not notice edits to imported modules by itself).
"""
STAGE_VERSIONS = {
    "autoencoder": 1,
    "encode": 1,
    "classifier": 1,
    "reference": 1,
    "train": 2,  # 2: latent normalisation, checkpoints at exactly the evaluated steps, lr warm-up
    "distill": 3,  # 2: TrigFlow data = σ_d · latents; 3: TrigFlow-native student, warm start
    "sample": 3,  # 2: scm samplers return latents (÷ σ_d); 3: latent normalisation, class-row grids, trailing DDIM
    "evaluate": 2,  # 2: label accuracy
    "report": 2,  # 2: label accuracy, teacher samplers, distillation curve
}
