"""Run one stage for a Snakemake job: its resolved config and launcher settings arrive as params."""
import torch

from speedpipe.launch import launch

torch.set_num_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)
launch(snakemake.rule, snakemake.params.config, snakemake.params.launcher)  # noqa: F821
