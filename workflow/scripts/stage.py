"""One Snakemake job: its stages' configs resolved from the experiment, run where its launcher says.

The stage's own output and errors go to the job's log file (the terminal keeps Snakemake's progress); the resources
the stages took where they ran go to the job's usage record. The package runs from this repository's src/, so a
rule environment (workflow/envs/) needs only the dependencies.
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # Snakemake sets __file__ to this script in the repository
sys.path.insert(0, str(REPO / "src"))
log = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
os.dup2(log.fileno(), 1)  # this process and every process it starts write to the log
os.dup2(log.fileno(), 2)

from speedpipe.launch import run_job  # noqa: E402
from speedpipe.workflow import Experiment  # noqa: E402

run_job(Experiment(snakemake.config, base_dir=REPO), snakemake.rule, dict(snakemake.wildcards), snakemake.threads,  # noqa: F821
        snakemake.output.get("usage"))  # noqa: F821
