# Helpers shared by the rules: every job's params carry its resolved stage config (plain values, so that
# Snakemake re-runs exactly the jobs whose config changed), the stage's version and its launcher settings.
from speedpipe.stages import STAGE_VERSIONS


def stage_params(stage, **kwargs):
    return dict(
        config=lambda wc: W.stage_config(PIPE, stage, **{k: (v(wc) if callable(v) else v) for k, v in kwargs.items()}),
        version=STAGE_VERSIONS[stage],
        launcher=W.launcher_settings(PIPE, stage),
    )
