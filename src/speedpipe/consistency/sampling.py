"""Consistency sampling of a TrigFlow student (the sampler family `scm` of speedpipe.sampler_labels): 1 step from
t_max = arctan(σ_max/σ_d); 2 steps re-noise the first estimate to t_mid and map it back."""
import math

import torch

from speedpipe.consistency.trigflow import TrigFlowStudent, t_max
from speedpipe.sampler_labels import CONSISTENCY_STEPS


class ConsistencySampler:
    """scm1 / scm2 of a consistency student; returns TrigFlow data (σ_d · latents) ÷ σ_d."""

    def __init__(self, student: TrigFlowStudent, latent_shape, steps: int, mid_t: float = 1.1, sigma_max: float = 80.0):
        if steps not in CONSISTENCY_STEPS:
            raise ValueError(f"consistency sampler steps {steps}: expected one of {CONSISTENCY_STEPS}")
        self.student, self.latent_shape, self.steps, self.mid_t = student, latent_shape, steps, mid_t
        self.model = student.net
        self.t_max = t_max(sigma_max, student.sigma_d)
        self.nfe = steps

    @torch.no_grad()
    def __call__(self, labels, generator):
        n, device, sigma_d = len(labels), labels.device, self.student.sigma_d
        z = torch.randn((n, *self.latent_shape), generator=generator, device=device)
        x0 = self.student.consistency(sigma_d * z, torch.full((n,), self.t_max, device=device), labels)
        if self.steps == 2:
            z2 = torch.randn((n, *self.latent_shape), generator=generator, device=device)
            x_mid = math.cos(self.mid_t) * x0 + math.sin(self.mid_t) * sigma_d * z2
            x0 = self.student.consistency(x_mid, torch.full((n,), self.mid_t, device=device), labels)
        return x0 / sigma_d  # back to the (normalised) latents the teacher was trained on
