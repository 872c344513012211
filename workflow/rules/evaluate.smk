# Evaluation (Experiment.evaluation_jobs): one sampling job and one evaluation job per kind of evaluation -- a train
# run's curve points, one sampler of a teacher at its final checkpoint, a student's checkpoints with every scm sampler.
# Each job runs all of its files in one process (the interpreter and library start-up is paid once per job), and an
# evaluation setting re-runs only the evaluation jobs: their samples stay. The teachers' and students' jobs go before
# the curve evaluations (which fill the last minutes on both cores).
CURVE = [(step, EXP.pipe["curve_sampler"]) for step in EXP.pipe["eval_steps"]]  # (step, sampler) of a train run's curve
STUDENT = [(step, label) for step in EXP.pipe.get("distill_eval_steps", []) for label in EXP.pipe.get("scm_samplers", [])]
TEACHER_STEP = EXP.pipe["train_steps"]  # a teacher's samplers (the wildcard sampler) evaluate its final checkpoint
EVALUATED_WITH = [CLASSIFIER_WEIGHTS] if EXP.needs_classifier else []


rule sample_curve:
    input:
        checkpoints=[str(checkpoint_path(LAYOUT.run_dir("train", "{run}"), step)) for step, _ in CURVE],
        autoencoder=[AUTOENCODER_WEIGHTS] if AE_TINY else [],
    output:
        samples=samples("{run}", CURVE),
        usage=str(LAYOUT.job_usage("sample_curve", "{run}")),
    log:
        str(LAYOUT.job_log("sample_curve", "{run}")),
    benchmark:
        str(LAYOUT.job_benchmark("sample_curve", "{run}"))
    params:
        stages=lambda wc: EXP.job_params("sample_curve", wc),
    conda:
        ENV
    resources:
        gpus=EXP.launcher("sample").get("gpus_per_node", 0),
    threads: 1
    priority: 0
    script:
        "../scripts/stage.py"


use rule sample_curve as sample_teacher with:
    input:
        checkpoints=str(checkpoint_path(LAYOUT.run_dir("train", "{teacher}"), TEACHER_STEP)),
        autoencoder=[AUTOENCODER_WEIGHTS] if AE_TINY else [],
    output:
        samples=samples("{teacher}", [(TEACHER_STEP, "{sampler}")]),
        usage=str(LAYOUT.job_usage("sample_teacher", "{teacher}-{sampler}")),
    log:
        str(LAYOUT.job_log("sample_teacher", "{teacher}-{sampler}")),
    benchmark:
        str(LAYOUT.job_benchmark("sample_teacher", "{teacher}-{sampler}"))
    params:
        stages=lambda wc: EXP.job_params("sample_teacher", wc),
    priority: 10


use rule sample_curve as sample_student with:
    input:
        checkpoints=sorted({str(checkpoint_path(LAYOUT.run_dir("distill", "{student}"), step)) for step, _ in STUDENT}),
        autoencoder=[AUTOENCODER_WEIGHTS] if AE_TINY else [],
    output:
        samples=samples("{student}", STUDENT),
        usage=str(LAYOUT.job_usage("sample_student", "{student}")),
    log:
        str(LAYOUT.job_log("sample_student", "{student}")),
    benchmark:
        str(LAYOUT.job_benchmark("sample_student", "{student}"))
    params:
        stages=lambda wc: EXP.job_params("sample_student", wc),
    priority: 10


rule evaluate_curve:
    input:
        samples=samples("{run}", CURVE, ("npz", "json")),
        reference=REFERENCE,
        classifier=EVALUATED_WITH,
    output:
        metrics=metrics("{run}", CURVE),
        usage=str(LAYOUT.job_usage("evaluate_curve", "{run}")),
    log:
        str(LAYOUT.job_log("evaluate_curve", "{run}")),
    benchmark:
        str(LAYOUT.job_benchmark("evaluate_curve", "{run}"))
    params:
        stages=lambda wc: EXP.job_params("evaluate_curve", wc),
    conda:
        ENV
    resources:
        gpus=EXP.launcher("evaluate").get("gpus_per_node", 0),
    threads: 1
    priority: 0
    script:
        "../scripts/stage.py"


use rule evaluate_curve as evaluate_teacher with:
    input:
        samples=samples("{teacher}", [(TEACHER_STEP, "{sampler}")], ("npz", "json")),
        reference=REFERENCE,
        classifier=EVALUATED_WITH,
    output:
        metrics=metrics("{teacher}", [(TEACHER_STEP, "{sampler}")]),
        usage=str(LAYOUT.job_usage("evaluate_teacher", "{teacher}-{sampler}")),
    log:
        str(LAYOUT.job_log("evaluate_teacher", "{teacher}-{sampler}")),
    benchmark:
        str(LAYOUT.job_benchmark("evaluate_teacher", "{teacher}-{sampler}"))
    params:
        stages=lambda wc: EXP.job_params("evaluate_teacher", wc),
    priority: 10


use rule evaluate_curve as evaluate_student with:
    input:
        samples=samples("{student}", STUDENT, ("npz", "json")),
        reference=REFERENCE,
        classifier=EVALUATED_WITH,
    output:
        metrics=metrics("{student}", STUDENT),
        usage=str(LAYOUT.job_usage("evaluate_student", "{student}")),
    log:
        str(LAYOUT.job_log("evaluate_student", "{student}")),
    benchmark:
        str(LAYOUT.job_benchmark("evaluate_student", "{student}"))
    params:
        stages=lambda wc: EXP.job_params("evaluate_student", wc),
    priority: 10
