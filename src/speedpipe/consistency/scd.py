"""sCD: continuous-time consistency distillation (Lu & Song, 2024, Alg. 1 with the rearranged tangent).

The student F_θ is TrigFlow-native (`TrigFlowStudent`); the teacher is any TrigFlow model (the DDPM DiT through
`TrigFlowTeacher`). With F⁻ = F_θ under stop-gradient (the detached value of the same graded pass) and
dx_t/dt = σ_d·F_teacher:
    g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d·dF⁻/dt),   g ← g / (‖g‖ + c)
    L = e^{−logvar(t)}/D · ‖F_θ − F⁻ − g‖² + logvar(t)
where cos t·sin t·dF⁻/dt is one JVP of F_θ at (x_t/σ_d, t) along (cos t·sin t·dx_t/dt/σ_d, cos t·sin t), and
r = min(1, step/H) warms the tangent up. Before sCD the student is warm-started with the TrigFlow diffusion
loss (`TrigFlowDiffusionLoss`). Samplers: 1 step from t_max = arctan(σ_max/σ_d), 2 steps through t_mid.
"""
import math

import torch
import torch.nn as nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from speedpipe.consistency.trigflow import TrigFlowStudent, _bcast, t_max
from speedpipe.models.dit import TimestepEmbedder


class LogvarHead(nn.Module):
    """logvar(t): a linear map of the sinusoidal embedding of the student's time input c_noise(t)."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_noise):
        return self.linear(TimestepEmbedder.timestep_embedding(c_noise, self.dim).to(self.linear.weight.dtype)).squeeze(-1)


def sample_time(n, sigma_d, p_mean, p_std, generator=None, device="cpu"):
    """t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²)."""
    tau = p_mean + p_std * torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return torch.atan(torch.exp(tau) / sigma_d)


def trigflow_point(x0, z, t):
    """x_t = cos t·x0 + sin t·z in fp64, and the per-example t broadcast helper."""
    t64 = t.double()
    return _bcast(torch.cos(t64), x0) * x0.double() + _bcast(torch.sin(t64), x0) * z.double(), t64


def _autocast(device_type, precision):
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def graded_F(student: TrigFlowStudent, x_t, t64, y, precision):
    """F_θ(x_t/σ_d, t) with gradients (bf16 autocast if asked), returned in fp64 for the loss arithmetic."""
    with _autocast(x_t.device.type, precision):
        return student(x_t.float() / student.sigma_d, t64.float(), y).double()


def jvp_dF_dt(student: TrigFlowStudent, x_t, t, y, dxt_dt, precision="fp32"):
    """cos t·sin t·dF_θ/dt along the teacher's ODE: one forward-mode pass (no gradients).

    The primal output is discarded: F⁻ is taken from the graded pass, so that F_θ − F⁻ is exactly zero.
    """
    sigma_d = student.sigma_d
    cos_sin = torch.cos(t) * torch.sin(t)
    primals = ((x_t / sigma_d).float(), t.float())
    tangents = ((_bcast(cos_sin, x_t) * dxt_dt / sigma_d).float(), cos_sin.float())
    # fused attention kernels have no forward-mode derivative: the math kernel
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _autocast(x_t.device.type, precision):
        _, tangent_out = jvp(lambda x, tt: student(x, tt, y), primals, tangents)
    return tangent_out.double()


def adaptive_loss(err_sq_sum, logvar, D):
    """e^{−logvar}/D · ‖·‖² + logvar, averaged over the batch (the sCM paper's adaptive weighting)."""
    return (torch.exp(-logvar) / D * err_sq_sum + logvar).mean()


class TrigFlowDiffusionLoss:
    """Warm start: regress F_θ on the TrigFlow velocity target with adaptive weighting.

    target "data": F* = (cos t·z − sin t·x0)/σ_d (the TrigFlow diffusion loss; its optimum is the data's flow);
    target "teacher": F* = F_teacher(x_t/σ_d, t) (the teacher's velocity, a noise-free regression target).
    """

    def __init__(self, teacher, target: str = "data", precision: str = "fp32"):
        if target not in ("data", "teacher"):
            raise ValueError(f"warm-start target {target!r}: expected 'data' or 'teacher'")
        self.teacher, self.target, self.precision = teacher, target, precision

    def __call__(self, student, logvar_head, x0, z, t, y, step):
        sigma_d = student.sigma_d
        x_t, t64 = trigflow_point(x0, z, t)
        with torch.no_grad():
            if self.target == "data":
                target = (_bcast(torch.cos(t64), x0) * z.double() - _bcast(torch.sin(t64), x0) * x0.double()) / sigma_d
            else:
                target = self.teacher(x_t.float() / sigma_d, t64.float(), y).double()
        F_theta = graded_F(student, x_t, t64, y, self.precision)
        logvar = logvar_head(student.c_noise(t64.float())).double()
        sq = ((F_theta - target) ** 2).flatten(1).sum(dim=1)
        D = x0[0].numel()
        return {"loss": adaptive_loss(sq, logvar, D), "mse": (sq / D).mean().detach(), "logvar": logvar.mean().detach()}


class SCDLoss:
    """The sCD objective; tangent and loss arithmetic in fp64, network passes in fp32 (or bf16 autocast)."""

    def __init__(self, teacher, tangent_warmup: int, tangent_c: float = 0.1, precision: str = "fp32"):
        self.teacher, self.tangent_warmup, self.tangent_c, self.precision = teacher, tangent_warmup, tangent_c, precision

    def warmup(self, step: int) -> float:
        """r = min(1, step/H) for the step-th sCD step (1-based)."""
        return min(1.0, step / self.tangent_warmup)

    def __call__(self, student, logvar_head, x0, z, t, y, step):
        sigma_d = student.sigma_d
        x_t, t64 = trigflow_point(x0, z, t)
        cos_sin = torch.cos(t64) * torch.sin(t64)
        with torch.no_grad():
            dxt_dt = sigma_d * self.teacher(x_t.float() / sigma_d, t64.float(), y).double()
        F_theta = graded_F(student, x_t, t64, y, self.precision)
        F_minus = F_theta.detach()
        cos_sin_dF_dt = jvp_dF_dt(student, x_t, t64, y, dxt_dt, self.precision)
        r = self.warmup(step)
        g = (-_bcast(torch.cos(t64) ** 2, x_t) * (sigma_d * F_minus - dxt_dt)
             - r * (_bcast(cos_sin, x_t) * x_t + sigma_d * cos_sin_dF_dt))
        g_norm = g.flatten(1).norm(dim=1)
        g = g / _bcast(g_norm + self.tangent_c, g)
        logvar = logvar_head(student.c_noise(t64.float())).double()
        sq = ((F_theta - F_minus - g) ** 2).flatten(1).sum(dim=1)
        D = x0[0].numel()
        return {"loss": adaptive_loss(sq, logvar, D), "g": g, "tangent_norm": g_norm.mean(), "logvar": logvar.mean().detach(),
                "mse": (sq / D).mean().detach()}


class ConsistencySampler:
    """scm1 / scm2 samplers of a distilled TrigFlow student; returns TrigFlow data (σ_d · latents) ÷ σ_d."""

    def __init__(self, student: TrigFlowStudent, latent_shape, steps: int, mid_t: float = 1.1, sigma_max: float = 80.0):
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
