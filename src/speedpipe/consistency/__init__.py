"""sCM: TrigFlow view of DDPM teachers, the TrigFlow-native student and continuous-time consistency distillation (sCD)."""
from .scd import ConsistencySampler, SCDLoss, TrigFlowDiffusionLoss
from .trigflow import TrigFlowStudent, TrigFlowTeacher


def scm_sample(student: TrigFlowStudent, labels, latent_shape, steps: int = 2, generator=None, mid_t: float = 1.1):
    """1- or 2-step consistency sampling of (normalised) latents for `labels` with a distilled TrigFlow student."""
    return ConsistencySampler(student, latent_shape, steps, mid_t)(labels, generator)


__all__ = ["TrigFlowTeacher", "TrigFlowStudent", "SCDLoss", "TrigFlowDiffusionLoss", "ConsistencySampler", "scm_sample"]
