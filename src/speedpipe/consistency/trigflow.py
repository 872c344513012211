"""TrigFlow (Lu & Song, 2024): the teacher's velocity from an ε-prediction DDPM DiT, and the native student.

x_t = cos(t)·x0 + sin(t)·z, z ~ N(0, σ_d² I), t ∈ [0, π/2]. A TrigFlow model F(x_t/σ_d, t) defines the
velocity dx_t/dt = σ_d·F and the consistency function f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F(x_t/σ_d, t).

The TrigFlow data are the teacher's (unit-variance) latents times `latent_scale` (the pipeline uses
latent_scale = σ_d: data of std σ_d, as in the paper, so σ_d = 0.5 keeps the paper's time proposal and
t_max meaningful).

Teacher (`TrigFlowTeacher`): with L = latent_scale, for a DDPM network trained on x_n = √ᾱ_n x0 + √(1−ᾱ_n) ε
over the latents: σ = (σ_d/L)·tan t, ᾱ* = 1/(1+σ²), n* = the continuous index with ᾱ(n*) = ᾱ* (log-space
interpolation of the ᾱ table, never rounded, so F stays differentiable in t), x_n = √ᾱ*·x_t/(L cos t),
ε̂ = net(x_n, n*), x̂0 = (x_n − √(1−ᾱ*) ε̂)/√ᾱ*, and F = cos t·ε̂ − sin t·L·x̂0/σ_d (METHODS.md §4 is L = 1).
With L = σ_d this is F = ε̂/cos t − tan t·x_t/σ_d: a gain of 1/cos t (≈160 at t_max) on ε̂, harmless for the
teacher's velocity (its errors enter the sCD tangent times cos²t) but ill-conditioned for a student.

Student (`TrigFlowStudent`): the network's output is F itself (c_in = 1/σ_d, c_skip = cos t,
c_out = −σ_d·sin t) and its time input is c_noise(t) = time_scale·t, a smooth function with the bounded
derivative time_scale on all of [0, π/2] (the DDPM index n*(t) has derivative ~100·tan t there).
"""
import math

import numpy as np
import torch
import torch.nn as nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from speedpipe.models.dit import DiT
from speedpipe.models.dit_tangent import forward_with_tangent


class ContinuousIndex:
    """n*(ᾱ*) and ᾱ(n) as inverse piecewise-linear maps between n and log ᾱ_n (extrapolated at both ends)."""

    def __init__(self, alphas_cumprod: np.ndarray):
        self.log_ab = torch.as_tensor(np.log(alphas_cumprod), dtype=torch.float64)  # strictly decreasing in n

    def index(self, log_alpha_bar: torch.Tensor) -> torch.Tensor:
        table = self.log_ab.to(log_alpha_bar.device, log_alpha_bar.dtype)
        T = len(table)
        # segment i with table[i] >= target > table[i+1]; clamp to [0, T-2] to extrapolate
        i = (torch.searchsorted(-table, -log_alpha_bar.detach(), right=True) - 1).clamp(0, T - 2)
        lo, hi = table[i], table[i + 1]
        return i.to(log_alpha_bar.dtype) + (lo - log_alpha_bar) / (lo - hi)

    def log_alpha_bar(self, n: torch.Tensor) -> torch.Tensor:
        table = self.log_ab.to(n.device, n.dtype)
        i = n.detach().floor().long().clamp(0, len(table) - 2)
        frac = n - i.to(n.dtype)
        return table[i] + frac * (table[i + 1] - table[i])


def _bcast(v, x):
    return v.view(-1, *([1] * (x.ndim - 1)))


class TrigFlowModel(nn.Module):
    """A network seen as F(x_t/σ_d, t, y); subclasses say how F comes out of it."""

    def __init__(self, net, sigma_d: float):
        super().__init__()
        self.net, self.sigma_d = net, sigma_d

    def consistency(self, x_t, t, y):
        """f(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t): the predicted clean sample."""
        F = self(x_t / self.sigma_d, t, y)
        return _bcast(torch.cos(t), x_t) * x_t - _bcast(torch.sin(t), x_t) * self.sigma_d * F

    def _dtype(self):
        return next(self.net.parameters()).dtype

    def with_tangent(self, x_scaled, t, dx_scaled, dt, y):
        """(F(x_scaled, t) with gradients, its derivative along (dx_scaled, dt) without): a graded pass, then
        torch.func.jvp through the math attention kernel (forward-mode autograd has no fused attention kernel)."""
        out = self(x_scaled, t, y)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, d_out = jvp(lambda a, b: self(a, b, y), (x_scaled, t), (dx_scaled, dt))
        return out, d_out


class TrigFlowTeacher(TrigFlowModel):
    """F(x_t/σ_d, t, y) of a DDPM DiT (learned-sigma outputs: the first C channels are ε̂), optional CFG."""

    def __init__(self, net, alphas_cumprod, sigma_d: float = 0.5, cfg_scale: float = 1.0, latent_scale: float = 1.0):
        super().__init__(net, sigma_d)
        self.index = ContinuousIndex(alphas_cumprod)
        self.cfg_scale = cfg_scale
        self.latent_scale = latent_scale  # TrigFlow data = latent_scale · the teacher's latents

    @classmethod
    def over_latents(cls, net, alphas_cumprod, sigma_d: float, cfg_scale: float = 1.0):
        """The pipeline's choice: unit-variance latents scaled by σ_d become TrigFlow data of std σ_d."""
        return cls(net, alphas_cumprod, sigma_d, cfg_scale, latent_scale=sigma_d)

    def epsilon(self, x_n, n, y):
        C = x_n.shape[1]
        if self.cfg_scale == 1.0:
            return self.net(x_n, n, y)[:, :C]
        null = torch.full_like(y, self.net.num_classes)
        cond, uncond = self.net(torch.cat([x_n, x_n]), torch.cat([n, n]), torch.cat([y, null]))[:, :C].chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)

    def ddpm_sigma(self, t):
        """σ = (σ_d/L)·tan t: the noise-to-signal ratio of x_t in the teacher's latent units."""
        return self.sigma_d / self.latent_scale * torch.tan(t)

    def forward(self, x_scaled, t, y):
        sigma_d, L = self.sigma_d, self.latent_scale
        x_t = sigma_d * x_scaled
        alpha_bar = 1.0 / (1.0 + self.ddpm_sigma(t) ** 2)
        n = self.index.index(torch.log(alpha_bar))
        x_n = _bcast(alpha_bar.sqrt() / (L * torch.cos(t)), x_t) * x_t
        eps = self.epsilon(x_n.to(self._dtype()), n.to(self._dtype()), y).to(x_t.dtype)
        x0 = (x_n - _bcast((1 - alpha_bar).sqrt(), x_t) * eps) / _bcast(alpha_bar.sqrt(), x_t)
        return _bcast(torch.cos(t), x_t) * eps - _bcast(torch.sin(t), x_t) * L * x0 / sigma_d


class TrigFlowStudent(TrigFlowModel):
    """F_θ(x_t/σ_d, c_noise(t), y): the first C output channels of `net` (a DiT, or any net(x, c_noise, y))."""

    def __init__(self, net, sigma_d: float = 0.5, time_scale: float = 1.0, own_tangent: bool = True):
        super().__init__(net, sigma_d)
        self.time_scale, self.own_tangent = time_scale, own_tangent

    def c_noise(self, t):
        return self.time_scale * t

    def forward(self, x_scaled, t, y):
        dtype = self._dtype()
        return self.net(x_scaled.to(dtype), self.c_noise(t).to(dtype), y)[:, : x_scaled.shape[1]]

    def with_tangent(self, x_scaled, t, dx_scaled, dt, y):
        """(F_θ(x_scaled, t) with gradients, its derivative along (dx_scaled, dt) without gradients).

        The DiT writes its own derivative (speedpipe.models.dit_tangent): both in its one graded pass,
        through the fused attention kernels; any other net, or own_tangent=False, the reference of the general case.
        """
        if not (self.own_tangent and isinstance(self.net, DiT)):
            return super().with_tangent(x_scaled, t, dx_scaled, dt, y)
        dtype, C = self._dtype(), x_scaled.shape[1]
        out, d_out = forward_with_tangent(self.net, x_scaled.to(dtype), dx_scaled.to(dtype), self.c_noise(t).to(dtype),
                                          (self.time_scale * dt).to(dtype), y)  # c_noise is linear in t
        return out[:, :C], d_out[:, :C]


def t_max(sigma_max: float, sigma_d: float) -> float:
    return math.atan(sigma_max / sigma_d)
