# Shared by the rules. Every job's params carry, per stage it runs, the stage's version and the values of the config
# keys the stage registry (speedpipe.stages) says it reads: an edit re-runs exactly the jobs that read the edited key.
# Where a job runs (its launcher settings) and its threads are no params. The job itself resolves its full configs
# from the experiment (workflow/scripts/stage.py); its log and resource record go where the layout says.
from speedpipe.layout import checkpoint as checkpoint_path

ENV = "../envs/speedpipe.yaml"  # the rules' software environment (relative to workflow/rules/)
AE_TINY = EXP.tiny_autoencoder
DATA = EXP.data_layout  # the data stages' files: this experiment's, or those of its data_from experiment
AUTOENCODER_WEIGHTS = str(DATA.autoencoder_dir() / "model.safetensors")
CLASSIFIER_WEIGHTS = str(DATA.classifier_dir() / "model.safetensors")
REFERENCE = str(DATA.reference(EXP.pipe["extractor"]))


def samples(run, files, exts=("npz", "json", "png")):
    """The sample files of an evaluation job: per (step, sampler) of a run (a wildcard pattern such as "{run}")."""
    return [str(LAYOUT.samples(run, step, sampler, ext)) for step, sampler in files for ext in exts]


def metrics(run, files):
    return [str(LAYOUT.metrics(run, step, sampler)) for step, sampler in files]
