"""sCM: TrigFlow view of DDPM teachers and continuous-time consistency distillation (sCD)."""
from .scd import ConsistencySampler
from .trigflow import TrigFlowTeacher


def scm_sample(student: TrigFlowTeacher, labels, latent_shape, steps: int = 2, generator=None, mid_t: float = 1.1):
    """1- or 2-step consistency sampling of latents for `labels` with a distilled TrigFlow student."""
    return ConsistencySampler(student, latent_shape, steps, mid_t)(labels, generator)


__all__ = ["TrigFlowTeacher", "ConsistencySampler", "scm_sample"]
