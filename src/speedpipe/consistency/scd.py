"""sCD: continuous-time consistency distillation (Lu & Song, 2024, Alg. 1 with the rearranged tangent).

With F⁻ = F_θ under stop-gradient and dx_t/dt = σ_d·F_teacher:
    g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d·dF⁻/dt),   g ← g / (‖g‖ + c)
    L = e^{−logvar(t)}/D · ‖F_θ − F⁻ − g‖² + logvar(t)
where cos t·sin t·dF⁻/dt is one JVP of F_θ at (x_t/σ_d, t) along (cos t·sin t·dx_t/dt/σ_d, cos t·sin t).
Samplers: 1 step from t_max = arctan(σ_max/σ_d), 2 steps through t_mid.
"""
import copy
import math

import torch
import torch.nn as nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from speedpipe.consistency.trigflow import TrigFlowTeacher, _bcast, t_max
from speedpipe.models.dit import TimestepEmbedder


class LogvarHead(nn.Module):
    """logvar(t): a linear map of the sinusoidal embedding of the network's time input c_noise(t)."""

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


def jvp_F(student: TrigFlowTeacher, x_t, t, y, dxt_dt):
    """(F⁻, cos t·sin t·dF⁻/dt) along the teacher's ODE: one forward-mode pass, run in the network's dtype."""
    dtype, sigma_d = student._dtype(), student.sigma_d
    cos_sin = torch.cos(t) * torch.sin(t)
    primals = ((x_t / sigma_d).to(dtype), t.to(dtype))
    tangents = ((_bcast(cos_sin, x_t) * dxt_dt / sigma_d).to(dtype), cos_sin.to(dtype))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no forward-mode derivative
        return jvp(lambda x, tt: student(x, tt, y), primals, tangents)


def scd_terms(student: TrigFlowTeacher, teacher: TrigFlowTeacher, logvar_head, x0, z, t, y, r: float, c: float = 0.1,
              precision: str = "fp32"):
    """Loss and diagnostics for one batch. x0: data, z ~ N(0, σ_d² I), t ∈ (0, π/2), r: tangent warmup factor.

    Tangent and loss arithmetic run in fp64; the network passes run in fp32 (or bf16 autocast for the graded one).
    """
    sigma_d = student.sigma_d
    t64 = t.double()
    x_t = _bcast(torch.cos(t64), x0) * x0.double() + _bcast(torch.sin(t64), x0) * z.double()
    cos_sin = torch.cos(t64) * torch.sin(t64)
    with torch.no_grad():
        dxt_dt = sigma_d * teacher(x_t.float() / sigma_d, t64.float(), y).double()
        F_minus, cos_sin_dF_dt = (v.double() for v in jvp_F(student, x_t, t64, y, dxt_dt))
        g = -_bcast(torch.cos(t64) ** 2, x_t) * (sigma_d * F_minus - dxt_dt) - r * (_bcast(cos_sin, x_t) * x_t + sigma_d * cos_sin_dF_dt)
        g_norm = g.flatten(1).norm(dim=1)
        g = g / _bcast(g_norm + c, g)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        F_theta = student(x_t.float() / sigma_d, t64.float(), y)
    logvar = logvar_head(student.c_noise(t64.float())).double()
    D = x0[0].numel()
    sq = ((F_theta.double() - F_minus - g) ** 2).flatten(1).sum(dim=1)
    loss = (torch.exp(-logvar) / D * sq + logvar).mean()
    return {"loss": loss, "g": g, "tangent_norm": g_norm.mean(), "logvar": logvar.mean(), "mse": (sq / D).mean()}


def make_student(teacher: TrigFlowTeacher) -> TrigFlowTeacher:
    """F_θ: the same network and conversion as the teacher (without guidance), initialised from its weights."""
    student = copy.deepcopy(teacher)
    student.cfg_scale = 1.0
    return student


class ConsistencySampler:
    """scm1 / scm2 samplers of a distilled student (EMA weights by default), for the sample stage."""

    def __init__(self, student: TrigFlowTeacher, latent_shape, steps: int, mid_t: float = 1.1, sigma_max: float = 80.0):
        self.student, self.latent_shape, self.steps, self.mid_t = student, latent_shape, steps, mid_t
        self.model = student.net
        self.t_max = t_max(sigma_max, student.sigma_d)
        self.nfe = steps

    @classmethod
    def from_checkpoint(cls, state, sampling_cfg, device):
        from omegaconf import OmegaConf

        from speedpipe.diffusion import create_diffusion
        from speedpipe.stages.train import build_model

        teacher_cfg = OmegaConf.create(state["teacher_config"])
        net = build_model(teacher_cfg)
        net.load_state_dict(state["ema" if sampling_cfg.use_ema else "model"])
        diffusion = create_diffusion(noise_schedule=teacher_cfg.diffusion.noise_schedule,
                                     diffusion_steps=teacher_cfg.diffusion.diffusion_steps)
        student = TrigFlowTeacher.over_latents(net.to(device).eval(), diffusion.alphas_cumprod, state["config"]["distill"]["sigma_d"])
        latent_shape = (teacher_cfg.model.in_channels, teacher_cfg.model.input_size, teacher_cfg.model.input_size)
        return cls(student, latent_shape, int(sampling_cfg.sampler[-1]), sampling_cfg.scm_mid_t)

    @torch.no_grad()
    def __call__(self, labels, generator):
        n, device, sigma_d = len(labels), labels.device, self.student.sigma_d
        z = torch.randn((n, *self.latent_shape), generator=generator, device=device)
        x0 = self.student.consistency(sigma_d * z, torch.full((n,), self.t_max, device=device), labels)
        if self.steps == 2:
            z2 = torch.randn((n, *self.latent_shape), generator=generator, device=device)
            x_mid = math.cos(self.mid_t) * x0 + math.sin(self.mid_t) * sigma_d * z2
            x0 = self.student.consistency(x_mid, torch.full((n,), self.mid_t, device=device), labels)
        return x0 / self.student.latent_scale  # back to the autoencoder's latent units
