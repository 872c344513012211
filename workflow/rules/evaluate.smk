# Evaluation (Experiment.evaluation_jobs): per model, one sampling job and one evaluation job -- a train run's curve
# points, each long teacher sampler, a student's checkpoints. Each job runs all of its files in one process (the
# interpreter and library start-up is paid once per job), and an evaluation setting re-runs only the evaluation jobs:
# their samples stay. The teachers' and students' jobs go before the curve evaluations (which fill the last minutes
# on both cores).
EVAL_EXTRA = [CLASSIFIER_WEIGHTS] if EXP.needs_classifier else []

for _key, (_run, _evals) in EXP.evaluation_keys().items():
    _priority = 10 if all(e.sampler != EXP.pipe["curve_sampler"] for e in _evals) else 0  # a long teacher sampler, a student

    rule:
        name:
            f"sample_{_key}"
        input:
            checkpoints=sorted({str(_run.checkpoint(e.step)) for e in _evals}),
            autoencoder=[AUTOENCODER_WEIGHTS] if AE_TINY else [],
        output:
            samples=[str(EXP.samples(e, ext)) for e in _evals for ext in ("npz", "json", "png")],
            usage=str(LAYOUT.job_usage(f"sample_{_key}")),
        log:
            str(LAYOUT.job_log(f"sample_{_key}")),
        benchmark:
            str(LAYOUT.job_benchmark(f"sample_{_key}"))
        params:
            stages=lambda wc, rule=f"sample_{_key}": EXP.job_params(rule),
        conda:
            ENV
        resources:
            gpus=EXP.launcher("sample").get("gpus_per_node", 0),
        threads: 1
        priority: _priority
        script:
            "../scripts/stage.py"

    rule:
        name:
            f"evaluate_{_key}"
        input:
            samples=[str(EXP.samples(e, ext)) for e in _evals for ext in ("npz", "json")],
            reference=REFERENCE,
            classifier=EVAL_EXTRA,
        output:
            metrics=[str(EXP.metrics(e)) for e in _evals],
            usage=str(LAYOUT.job_usage(f"evaluate_{_key}")),
        log:
            str(LAYOUT.job_log(f"evaluate_{_key}")),
        benchmark:
            str(LAYOUT.job_benchmark(f"evaluate_{_key}"))
        params:
            stages=lambda wc, rule=f"evaluate_{_key}": EXP.job_params(rule),
        conda:
            ENV
        resources:
            gpus=EXP.launcher("evaluate").get("gpus_per_node", 0),
        threads: 1
        priority: _priority
        script:
            "../scripts/stage.py"
