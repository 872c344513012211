"""Run one Snakemake job: a stage (params.config) or a batch of stages (params.jobs), where params.launcher says."""
import torch

from speedpipe.launch import launch_many

torch.set_num_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)
params = snakemake.params  # noqa: F821
jobs = params.jobs if "jobs" in params.keys() else [[snakemake.rule, params.config]]  # noqa: F821
launch_many([(stage, config) for stage, config in jobs], params.launcher)
