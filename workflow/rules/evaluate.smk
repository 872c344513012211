# Evaluation jobs (workflow.evaluation_jobs): a train run's curve points, each teacher sampler, the student's
# checkpoints. Each evaluation is the sample stage then the evaluate stage, all of a job's in one process, so the
# interpreter and library start-up is paid once per job rather than once per file. The job's params carry every
# stage config of the batch. The teacher's and student's jobs go
# before the curve evaluations (which fill the last minutes on both cores).
import re

EVAL_EXTRA = ([f"{ROOT}/autoencoder/model.safetensors"] if AE_TINY else []) + (
    [f"{ROOT}/classifier/model.safetensors"] if CLASSIFIER or W.stage_config(PIPE, "evaluate", run=PIPE["teacher"],
        step=PIPE["train_steps"], sampler=PIPE["teacher_sampler"])["eval"]["label_accuracy"] else [])

for _name, (_run, _evals) in W.evaluation_jobs(PIPE).items():

    rule:
        name:
            "evaluate_" + re.sub(r"\W", "_", _name)
        input:
            checkpoints=sorted({str(W.checkpoint_path(PIPE, _run, s)) for s, _ in _evals}),
            reference=f"{ROOT}/reference/stats-{PIPE['extractor']}.pt",
            extra=EVAL_EXTRA,
        output:
            metrics=[W.metrics_output(PIPE, _run, s, k) for s, k in _evals],
            samples=[f for s, k in _evals for f in W.sample_outputs(PIPE, _run, s, k)],
        params:
            jobs=lambda wc, run=_run, evals=_evals: [[stage, W.stage_config(PIPE, stage, run=run, step=s, sampler=k)]
                                                     for s, k in evals for stage in ("sample", "evaluate")],
            version=[STAGE_VERSIONS["sample"], STAGE_VERSIONS["evaluate"]],
            launcher=W.launcher_settings(PIPE, "sample"),
        resources:
            gpus=W.launcher_settings(PIPE, "sample").get("gpus_per_node", 0),
        threads: 1
        priority: 10 if _name != _run or _run == W.student(PIPE) else 0
        script:
            "../scripts/stage.py"
