# Helpers shared by the rules: every job's params carry its resolved stage config (plain values, so that
# Snakemake re-runs exactly the jobs whose config changed), the stage's version and its launcher settings.
from speedpipe.layout import checkpoint as checkpoint_path, student_run_name
from speedpipe.stages import STAGE_VERSIONS


def stage_params(stage, run=None):
    """params of a one-stage job; run(wildcards) -> the job's run, looked up in the experiment."""
    return dict(
        config=lambda wc: EXP.stage_config(stage, run(wc) if run else None),
        version=STAGE_VERSIONS[stage],
        launcher=EXP.launcher(stage),
    )
