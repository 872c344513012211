"""Consistency methods as plug-ins: one module per method in this package, each defining `METHOD`.

A method says which velocity dx_t/dt its student follows (its objective is an EDM-style callable
loss(student, logvar_head, x0, z, t, y, step), as a rule speedpipe.consistency.objectives.ConsistencyLoss along
that velocity), whether that evaluates the teacher network, its samplers, and what the report says of it. The
distill stage, the experiment file, the rules and the report ask the method; none of them names one. Every method
starts from the same diffusion checkpoint and the same warm start (speedpipe.stages.distill).

A third method is one file here, `mymethod.py`, defining METHOD = ConsistencyMethod(name="mymethod", ...), and its
name in an experiment file's `consistency_methods` (or `distill.method=mymethod` for a single stage run).
"""
import difflib
import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from speedpipe.errors import ConfigError


@dataclass(frozen=True)
class ConsistencyMethod:
    name: str  # the module's name: distill.method, the experiment file's consistency_methods, run names {name}-{teacher}
    title: str  # how tables and figures name it (sCD)
    follows: str  # the velocity its student follows, in words, for the report
    teacher_velocity: bool  # whether its objective evaluates the teacher network (then distill.cfg_scale guides it; the report says so)
    objective: Callable  # objective(teacher: TrigFlowTeacher, distill_config) -> loss(student, head, x0, z, t, y, step)
    sampler: Callable = None  # sampler(student, latent_shape, steps, mid_t) for the labels scm<steps> (None: ConsistencySampler)

    def make_sampler(self, student, latent_shape, steps: int, mid_t: float):
        from speedpipe.consistency.sampling import ConsistencySampler

        return (self.sampler or ConsistencySampler)(student, latent_shape, steps, mid_t)


def method_names() -> list[str]:
    """The methods' names (the modules of this package; a module whose name starts with '_' is a helper), without
    importing them (the experiment file checks names while Snakemake parses the workflow, before torch is imported)."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


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
