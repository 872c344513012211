# speedpipe: dataset -> autoencoder -> latents -> train (methods x seeds) -> sCD -> sample -> evaluate -> report.
# The experiment file says what to run (configs/pipeline/demo.yaml by default):
#   snakemake --cores all                                   # the demo
#   snakemake --cores all --configfile configs/pipeline/imagenet_256.yaml
#   snakemake --profile slurm/profile --configfile ...      # many jobs at once on a cluster
from speedpipe import workflow as W

# the demo only when no experiment file is given: a --configfile is not merged over it (so `--config key=value`
# alone, without a --configfile, is a whole experiment of one key and is refused by the check below)
if not config:
    configfile: "configs/pipeline/demo.yaml"

PIPE = W.check_pipeline(config, base_dir=workflow.basedir)
ROOT = str(W.root(PIPE))

wildcard_constraints:
    run=r"[A-Za-z0-9_.]+-s\d+",

include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"

rule all:
    default_target: True
    input:
        f"{ROOT}/README.md",
