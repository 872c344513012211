# speedpipe: dataset -> autoencoder -> latents -> train (methods x seeds) -> consistency models (sCD, sCT) -> sample -> evaluate -> report.
# The experiment file says what to run (configs/pipeline/demo.yaml by default; its keys: workflow/schemas/):
#   snakemake --cores all                                   # the demo
#   snakemake --cores all --configfile configs/pipeline/imagenet_256.yaml
#   snakemake --profile slurm/profile --configfile ...      # many jobs at once on a cluster
from pathlib import Path

from snakemake.utils import min_version

from speedpipe import preflight
from speedpipe.workflow import Experiment, alternation

min_version("9.0")


# the demo only when no experiment file is given: a --configfile is not merged over it (so `--config key=value`
# alone, without a --configfile, is a whole experiment of one key and is refused by the check below)
if not config:
    configfile: "configs/pipeline/demo.yaml"


EXP = Experiment(config, base_dir=workflow.basedir)  # validated against workflow/schemas/experiment.schema.yaml
LAYOUT = EXP.layout
for message in EXP.overridden_values():
    logger.warning(f"speedpipe: {message}")
PROBLEMS = preflight.problems(EXP)  # missing inputs, batches larger than the data, guidance without a null class
for message in PROBLEMS:
    logger.warning(f"speedpipe: {message}")


onstart:
    if PROBLEMS:  # a dry run or --lint only warns; a run stops here, before any job starts
        raise preflight.refusal(EXP, PROBLEMS)


wildcard_constraints:
    run=alternation(EXP.train_runs),
    student=alternation(EXP.distill_runs),
    teacher=alternation(teacher.name for teacher in EXP.teachers),
    sampler=alternation(EXP.teacher_own_samplers()),  # a teacher's own sampling jobs (workflow/rules/evaluate.smk)


include: "workflow/rules/common.smk"
if not EXP.data_from:  # else the data stages' files are another experiment's: read, never made here (preflight)
    include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
for stage_rules in sorted(Path(workflow.basedir, "workflow/rules/stages").glob("*.smk")):  # stages of one's own
    include: stage_rules


rule all:
    default_target: True
    input:
        str(LAYOUT.readme()),
