"""Consistency methods as plug-ins: one module per method in this package, each defining `METHOD`.

A method says which velocity dx_t/dt its student follows (its objective is an EDM-style callable
loss(student, logvar_head, x0, z, t, y, step), as a rule speedpipe.consistency.objectives.ConsistencyLoss along
that velocity), whether that evaluates the teacher network, its samplers, and what the report says of it. The
distill stage, the experiment file, the rules and the report ask the method; none of them names one. Every method
starts from the same diffusion checkpoint and the same warm start (speedpipe.stages.distill).

A further method is one file here, `mymethod.py`, defining METHOD = ConsistencyMethod(name="mymethod", ...) and, for
hyper-parameters of its own, SETTINGS = {"key": default} (the config section distill.mymethod, speedpipe.declared; its
objective reads them as d.mymethod.key), and its name in an experiment file's `consistency_methods` (or
`distill.method=mymethod` for a single stage run).
"""
import difflib
import functools
import importlib
from dataclasses import dataclass
from typing import Callable

from speedpipe.declared import METHODS, modules
from speedpipe.errors import ConfigError


@dataclass(frozen=True)
class ConsistencyMethod:
    name: str  # the module's name: distill.method, the experiment file's consistency_methods, run names {name}-{teacher}
    title: str  # how tables and figures name it (sCD)
    follows: str  # the velocity its student follows, in words, for the report
    teacher_velocity: bool  # whether its objective evaluates the teacher network (then distill.cfg_scale guides it; the report says so)
    objective: Callable  # objective(teacher: TrigFlowTeacher, distill_config) -> loss(student, head, x0, z, t, y, step)
    sampler: Callable = None  # sampler(student, latent_shape, steps, mid_t) for the labels scm<steps> (None: ConsistencySampler)
    student: Callable = None  # student(trigflow_student) -> the model it trains and samples, from the warm-started
    # TrigFlow student and sharing its network (None: the TrigFlow student itself)
    times: Callable = None  # times(distill_config) -> its training-time proposal, .sample(n, generator, step) (None: TrigFlow's)
    label_dropout: Callable = None  # label_dropout(distill_config) -> the share of labels replaced by the null class (None: 0)

    def make_sampler(self, student, latent_shape, steps: int, mid_t: float):
        from speedpipe.consistency.sampling import ConsistencySampler

        return (self.sampler or ConsistencySampler)(student, latent_shape, steps, mid_t)

    def make_student(self, trigflow_student):
        return self.student(trigflow_student) if self.student else trigflow_student

    def make_times(self, d):
        from speedpipe.consistency.objectives import TimeProposal

        return self.times(d) if self.times else TimeProposal(d.sigma_d, d.p_mean, d.p_std)

    def dropped_labels(self, d) -> float:
        return self.label_dropout(d) if self.label_dropout else 0.0


def student_from_checkpoint(state: dict, use_ema: bool = True):
    """The student of a distill checkpoint (its EMA weights by default), as its method builds it: the teacher's DiT
    read as a TrigFlow model, then the method's own (MeanFlow adds an interval embedding before the weights load)."""
    from omegaconf import OmegaConf

    from speedpipe.consistency.trigflow import TrigFlowStudent
    from speedpipe.models.dit import build_model

    net = build_model(OmegaConf.create(state["teacher_config"]), initialise=False)
    d = state["config"]["distill"]
    student = consistency_method(d.get("method", "scd")).make_student(TrigFlowStudent(net, d["sigma_d"], d["time_scale"]))
    net.load_state_dict(state["ema" if use_ema else "model"])  # checkpoints made before methods: sCD
    return student.eval()


def method_names() -> list[str]:
    """The methods' names (the modules of this package; a module whose name starts with '_' is a helper), without
    importing them (the experiment file checks names while Snakemake parses the workflow, before torch is imported)."""
    return modules(METHODS)


@functools.lru_cache(maxsize=None)
def consistency_method(name: str) -> ConsistencyMethod:
    """The method of that name; an unknown name is a ConfigError that lists the known ones."""
    if name not in method_names():
        close = difflib.get_close_matches(str(name), method_names(), n=1)
        raise ConfigError(f"consistency method {name!r}: " + (f"did you mean {close[0]!r}?" if close else
                                                             f"expected one of {method_names()}") +
                          f" (a method is a module in {__name__})")
    method = getattr(importlib.import_module(f"{__name__}.{name}"), "METHOD", None)
    if not isinstance(method, ConsistencyMethod) or method.name != name:
        raise TypeError(f"{__name__}.{name} must define METHOD = ConsistencyMethod(name={name!r}, ...)")
    return method
