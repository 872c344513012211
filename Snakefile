# speedpipe: dataset -> autoencoder -> latents -> train (methods x seeds) -> sCD -> sample -> evaluate -> report.
# The experiment file says what to run (configs/pipeline/demo.yaml by default):
#   snakemake --cores all                                   # the demo
#   snakemake --cores all --configfile configs/pipeline/imagenet_256.yaml
#   snakemake --profile slurm/profile --configfile ...      # many jobs at once on a cluster
import re

from speedpipe.workflow import Experiment

# the demo only when no experiment file is given: a --configfile is not merged over it (so `--config key=value`
# alone, without a --configfile, is a whole experiment of one key and is refused by the check below)
if not config:
    configfile: "configs/pipeline/demo.yaml"

EXP = Experiment(config, base_dir=workflow.basedir)  # the validated experiment: its runs, evaluations and tables
LAYOUT = EXP.layout


def one_of(names):
    """A wildcard constraint matching exactly these names (runs are looked up, never parsed)."""
    return "|".join(map(re.escape, names)) or "(?!)"


wildcard_constraints:
    run=one_of(EXP.train_runs),
    teacher=one_of(t.name for t in EXP.teachers),

include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"

rule all:
    default_target: True
    input:
        str(LAYOUT.readme()),
