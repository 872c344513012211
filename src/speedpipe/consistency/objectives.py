"""The consistency objective of the sCM paper (Lu & Song, 2024, Alg. 1 with the rearranged tangent), for any velocity.

The student F_θ is TrigFlow-native (`TrigFlowStudent`). A method (speedpipe.consistency.methods) says which velocity
dx_t/dt the student follows: sCD its teacher's, σ_d·F_teacher(x_t/σ_d, t); sCT the data's, cos t·z − sin t·x0. With
F⁻ = F_θ under stop-gradient (the detached value of the same graded pass):
    g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d·dF⁻/dt),   g ← g / (‖g‖ + c)
    L = e^{−logvar(t)}/D · ‖F_θ − F⁻ − g‖² + logvar(t)
where cos t·sin t·dF⁻/dt is the derivative of F_θ at (x_t/σ_d, t) along (cos t·sin t·dx_t/dt/σ_d, cos t·sin t),
computed in the graded pass (`TrigFlowStudent.with_tangent`), and r = min(1, step/H) warms the tangent up. Before
either method the student is warm-started with the TrigFlow diffusion loss (`TrigFlowDiffusionLoss`).
"""
import torch
import torch.nn as nn

from speedpipe.consistency.trigflow import TrigFlowStudent, _bcast
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


class TimeProposal:
    """The time proposal as a training-time sampler (speedpipe.training.StepRandomness draws it like DDPM timesteps)."""

    def __init__(self, sigma_d: float, p_mean: float, p_std: float):
        self.sigma_d, self.p_mean, self.p_std = sigma_d, p_mean, p_std

    def sample(self, n, generator=None, step=None):
        return sample_time(n, self.sigma_d, self.p_mean, self.p_std, generator=generator)


def trigflow_point(x0, z, t):
    """x_t = cos t·x0 + sin t·z in fp64, and t in fp64."""
    t64 = t.double()
    return _bcast(torch.cos(t64), x0) * x0.double() + _bcast(torch.sin(t64), x0) * z.double(), t64


def data_velocity(x0, z, t64):
    """dx_t/dt = cos t·z − sin t·x0: the velocity of the pair (x0, z) that made x_t, in fp64."""
    return _bcast(torch.cos(t64), x0) * z.double() - _bcast(torch.sin(t64), x0) * x0.double()


def _autocast(device_type, precision):
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def graded_F(student: TrigFlowStudent, x_t, t64, y, precision):
    """F_θ(x_t/σ_d, t) with gradients (bf16 autocast if asked), returned in fp64 for the loss arithmetic."""
    with _autocast(x_t.device.type, precision):
        return student(x_t.float() / student.sigma_d, t64.float(), y).double()


def graded_F_and_tangent(student: TrigFlowStudent, x_t, t64, y, dxt_dt, precision="fp32"):
    """F_θ(x_t/σ_d, t) with gradients and cos t·sin t·dF_θ/dt along dx_t/dt without, both in fp64.

    The tangent is the derivative along (cos t·sin t·dx_t/dt/σ_d, cos t·sin t) at the graded pass's own point.
    """
    cos_sin = torch.cos(t64) * torch.sin(t64)
    with _autocast(x_t.device.type, precision):
        F, dF = student.with_tangent((x_t / student.sigma_d).float(), t64.float(),
                                     (_bcast(cos_sin, x_t) * dxt_dt / student.sigma_d).float(), cos_sin.float(), y)
    return F.double(), dF.double()


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
                target = data_velocity(x0, z, t64) / sigma_d
            else:
                target = self.teacher(x_t.float() / sigma_d, t64.float(), y).double()
        F_theta = graded_F(student, x_t, t64, y, self.precision)
        logvar = logvar_head(student.c_noise(t64.float())).double()
        sq = ((F_theta - target) ** 2).flatten(1).sum(dim=1)
        D = x0[0].numel()
        return {"loss": adaptive_loss(sq, logvar, D), "mse": (sq / D).mean().detach(), "logvar": logvar.mean().detach()}


class ConsistencyLoss:
    """The continuous-time consistency objective along `velocity(x0, z, x_t, t, y, sigma_d) -> dx_t/dt` (fp64, no
    gradients; sigma_d is the student's);
    tangent and loss arithmetic in fp64, network passes in fp32 (or bf16 autocast)."""

    def __init__(self, velocity, tangent_warmup: int, tangent_c: float = 0.1, precision: str = "fp32"):
        self.velocity, self.tangent_warmup, self.tangent_c, self.precision = velocity, tangent_warmup, tangent_c, precision

    def warmup(self, step: int) -> float:
        """r = min(1, step/H) for the step-th consistency step (1-based)."""
        return min(1.0, step / self.tangent_warmup)

    def __call__(self, student, logvar_head, x0, z, t, y, step):
        sigma_d = student.sigma_d
        x_t, t64 = trigflow_point(x0, z, t)
        cos_sin = torch.cos(t64) * torch.sin(t64)
        with torch.no_grad():
            dxt_dt = self.velocity(x0, z, x_t, t64, y, sigma_d)
        F_theta, cos_sin_dF_dt = graded_F_and_tangent(student, x_t, t64, y, dxt_dt, self.precision)
        F_minus = F_theta.detach()
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
