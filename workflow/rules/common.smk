# Shared by the rules. Every job's params carry, per stage it runs, the stage's version and the values of the config
# keys the stage registry (speedpipe.stages) says it reads: an edit re-runs exactly the jobs that read the edited key.
# Where a job runs (its launcher settings) and its threads are no params. The job itself resolves its full configs
# from the experiment (workflow/scripts/stage.py); its log and resource record go where the layout says.
from speedpipe.layout import checkpoint as checkpoint_path

ENV = "../envs/speedpipe.yaml"  # the rules' software environment (relative to workflow/rules/)
AE_TINY = EXP.tiny_autoencoder
AUTOENCODER_WEIGHTS = str(LAYOUT.autoencoder_dir() / "model.safetensors")
CLASSIFIER_WEIGHTS = str(LAYOUT.classifier_dir() / "model.safetensors")
REFERENCE = str(LAYOUT.reference(EXP.pipe["extractor"]))
