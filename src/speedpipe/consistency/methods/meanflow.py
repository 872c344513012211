"""MeanFlow: the student learns the average velocity u(z_t, r, t) of the linear path from the data's velocity e − x
through the MeanFlow identity (speedpipe.consistency.meanflow); no teacher network is evaluated. Its settings are the
section distill.meanflow."""
from speedpipe.consistency.meanflow import (MeanFlowObjective, MeanFlowSampler, MeanFlowStudent, MeanFlowTimes,
                                            TrainingGuidance)
from speedpipe.consistency.methods import ConsistencyMethod
from speedpipe.errors import ConfigError


def objective(teacher, d, imf: bool = False):
    m = d.meanflow
    guidance = TrainingGuidance(m.omega, m.kappa, *m.guidance_t)
    if teacher is None and guidance.active and not m.label_dropout:  # a teacher's student starts with its trained null class
        raise ConfigError(f"config key 'distill.meanflow.label_dropout': 0, but guidance in training (omega {m.omega}, "
                          f"kappa {m.kappa}) without a teacher needs the null class that label dropout trains: set it "
                          f"above 0 (the paper: 0.1)")
    return MeanFlowObjective(guidance, m.adaptive_p, m.adaptive_c, d.precision, imf=imf)


def with_meanflow_student(name: str, title: str, follows: str, objective) -> ConsistencyMethod:
    """A method on MeanFlow's student, times, samplers and settings, with its own objective."""
    return ConsistencyMethod(
        name=name, title=title, follows=follows, teacher_velocity=False, objective=objective, sampler=MeanFlowSampler,
        student=MeanFlowStudent, times=lambda d: MeanFlowTimes(d.meanflow.p_mean, d.meanflow.p_std, d.meanflow.r_neq_t),
        label_dropout=lambda d: d.meanflow.label_dropout)


METHOD = with_meanflow_student(
    "meanflow", "MeanFlow", "the average velocity of the linear path, regressed on e − x − (t − r)·du/dt", objective)
