# Evaluation jobs (Experiment.evaluation_jobs): a train run's curve points, each teacher sampler, a student's
# checkpoints. Each evaluation is the sample stage then the evaluate stage, all of a job's in one process, so the
# interpreter and library start-up is paid once per job rather than once per file. The job's params carry every
# stage config of the batch. The teachers' and students' jobs go before the curve evaluations (which fill the last
# minutes on both cores).
EVAL_EXTRA = ([AUTOENCODER_WEIGHTS] if AE_TINY else []) + (
    [CLASSIFIER_WEIGHTS] if CLASSIFIER or any(EXP.stage_config("evaluate", evaluation=e)["eval"]["label_accuracy"]
                                              for e in EXP.evaluations()) else [])

for _name, (_run, _evals) in EXP.evaluation_rules().items():

    rule:
        name:
            _name
        input:
            checkpoints=sorted({str(_run.checkpoint(e.step)) for e in _evals}),
            reference=REFERENCE,
            extra=EVAL_EXTRA,
        output:
            metrics=[str(EXP.metrics(e)) for e in _evals],
            samples=[str(EXP.samples(e, ext)) for e in _evals for ext in ("npz", "json", "png")],
        params:
            jobs=lambda wc, evals=_evals: [[stage, EXP.stage_config(stage, evaluation=e)]
                                           for e in evals for stage in ("sample", "evaluate")],
            version=[STAGE_VERSIONS["sample"], STAGE_VERSIONS["evaluate"]],
            launcher=EXP.launcher("sample"),
        resources:
            gpus=EXP.launcher("sample").get("gpus_per_node", 0),
        threads: 1
        priority: 10 if all(e.sampler != EXP.pipe["curve_sampler"] for e in _evals) else 0  # a long teacher sampler, a student
        script:
            "../scripts/stage.py"
