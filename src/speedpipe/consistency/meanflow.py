"""MeanFlow (Geng et al., 2025) and iMF's loss: a network of the *average* velocity over an interval, sampled in 1-2 steps.

Linear path z_t = (1 − t)·x + t·e, t ∈ [0, 1] (x the unit-variance latents, e ~ N(0, I)), instantaneous velocity
v = e − x. The student predicts u_θ(z_t, r, t) ≈ 1/(t − r)·∫_r^t v(z_τ, τ) dτ. The MeanFlow identity
u = v − (t − r)·du/dt, du/dt = v·∂_z u + ∂_t u, gives the target u_tgt = v − (t − r)·du_θ/dt: one derivative of u_θ
along (dz, dr, dt) = (v, 0, 1), under stop-gradient, and the loss w·‖u_θ − u_tgt‖² with w = sg(1/(‖Δ‖² + c)^p).

The student (`MeanFlowStudent`) is the shared TrigFlow warm start carried to the linear path by the exact change of
variables: with s = √((1 − t)² + t²) and tan τ = t/(1 − t), z_t = s·(cos τ·x + sin τ·e) is s times the TrigFlow point
(in units of σ_d), and e − x = (2t − 1)/s·(z_t/s) + (cos τ·e − sin τ·x)/s, so

    u_θ(z, r, t) = (2t − 1)/s²·z + F_θ(z/s, τ, t − r)/s

where F_θ is the TrigFlow student's network with a second time input t − r (`DiT.add_interval_embedding`, zero at the
start). At r = t it is exactly the warm start's velocity, for every r before training: no re-training to change path.
"""
import math

import torch

from speedpipe.consistency.trigflow import TrigFlowStudent, _bcast
from speedpipe.models.dit_tangent import conditioned_with_tangent, time_embedding_with_tangent


def path_scale(t):
    """s(t) = √((1 − t)² + t²): z_t / s is a variance-preserving (TrigFlow) point."""
    return torch.sqrt((1 - t) ** 2 + t**2)


def trigflow_time(t):
    """τ(t) with tan τ = t/(1 − t) (π/2 at t = 1)."""
    return torch.atan2(t, 1 - t)


def linear_time(tau: float) -> float:
    """t(τ) = tan τ/(1 + tan τ), the inverse of trigflow_time."""
    return math.sin(tau) / (math.sin(tau) + math.cos(tau))


def linear_velocity(F, z, t):
    """The linear path's velocity (2t − 1)/s²·z + F/s from the TrigFlow velocity F (in units of σ_d) at (z/s, τ(t))."""
    s = _bcast(path_scale(t), z)
    return (2 * _bcast(t, z) - 1) / s**2 * z + F / s


class MeanFlowTimes:
    """(t, r) per example as a [n, 2] tensor: two logit-normal(P_mean, P_std) draws, t the larger, r the smaller; r = t
    (flow matching) for all but round(r_neq_t·n) examples of each batch, the batch's last ones (its order is random)."""

    def __init__(self, p_mean: float, p_std: float, r_neq_t: float):
        self.p_mean, self.p_std, self.r_neq_t = p_mean, p_std, r_neq_t

    def sample(self, n, generator=None, step=None):
        a, b = torch.sigmoid(self.p_mean + self.p_std * torch.randn(2, n, generator=generator, dtype=torch.float64))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(torch.arange(n) < n - round(self.r_neq_t * n), t, r)
        return torch.stack([t, r], dim=1)


class MeanFlowStudent(torch.nn.Module):
    """u_θ(z, r, t, y) of a TrigFlow student's DiT with an interval embedding (the module docstring's formula)."""

    def __init__(self, trigflow: TrigFlowStudent):
        super().__init__()
        self.net = trigflow.net.add_interval_embedding()
        self.sigma_d, self.time_scale = trigflow.sigma_d, trigflow.time_scale

    def _conditioning(self, t, r, y):
        net, dtype = self.net, self.net.t_embedder.mlp[0].weight.dtype
        return (net.t_embedder((self.time_scale * trigflow_time(t)).to(dtype)) + net.y_embedder(y, False)
                + net.interval_embedder((t - r).to(dtype)))

    def forward(self, z, r, t, y):
        """u_θ in z's dtype; t and r are [n]."""
        dtype = self.net.t_embedder.mlp[0].weight.dtype
        x_in = (z / _bcast(path_scale(t), z)).to(dtype)
        return linear_velocity(self.net.forward_conditioned(x_in, self._conditioning(t, r, y))[:, : z.shape[1]].to(z.dtype), z, t)

    def with_tangent(self, z, r, t, dz, dr, dt, y):
        """(u_θ with gradients, its derivative along (dz, dr, dt) without), both in z's dtype, through the DiT's own
        tangent (speedpipe.models.dit_tangent): the derivative of u = a(t)·z + F(z/s, c_noise(τ), t − r)/s is
        da·z + a·dz + dF/s − F·ds/s², with a = (2t − 1)/s², ds = (2t − 1)/s·dt, dτ = dt/s² and d(z/s) = dz/s − z·ds/s²."""
        net, dtype, C = self.net, self.net.t_embedder.mlp[0].weight.dtype, z.shape[1]
        s = path_scale(t)
        ds, d_tau = (2 * t - 1) / s * dt, dt / s**2
        a, da = (2 * t - 1) / s**2, 2 / s**2 * dt - 2 * (2 * t - 1) * ds / s**3
        S, dS = _bcast(s, z), _bcast(ds, z)
        t_emb, dt_emb = time_embedding_with_tangent(net.t_embedder, (self.time_scale * trigflow_time(t)).to(dtype),
                                                    (self.time_scale * d_tau).to(dtype))
        i_emb, di_emb = time_embedding_with_tangent(net.interval_embedder, (t - r).to(dtype), (dt - dr).to(dtype))
        c = t_emb + net.y_embedder(y, False) + i_emb
        x_in, dx_in = z / S, dz / S - z * dS / S**2
        F, dF = conditioned_with_tangent(net, x_in.to(dtype), dx_in.to(dtype), c, dt_emb + di_emb)
        F, dF = F[:, :C].to(z.dtype), dF[:, :C].to(z.dtype)
        u = _bcast(a, z) * z + F / S
        with torch.no_grad():
            du = _bcast(da, z) * z + _bcast(a, z) * dz + dF / S - F.detach() * dS / S**2
        return u, du


class TrainingGuidance:
    """MeanFlow's guidance in training: v in the target becomes ṽ = ω·v + κ·u_θ(z_t, t, t | y) + (1 − ω − κ)·u_θ(z_t, t, t | ∅)
    for t in [t_start, t_end] (v elsewhere, and for examples whose label was dropped); a student so trained samples
    with classifier-free guidance of scale ω/(1 − κ) in one pass. ω = 1, κ = 0: none."""

    def __init__(self, omega: float, kappa: float, t_start: float, t_end: float):
        self.omega, self.kappa, self.t_start, self.t_end = omega, kappa, t_start, t_end

    @property
    def active(self) -> bool:
        return (self.omega, self.kappa) != (1.0, 0.0)

    @torch.no_grad()
    def __call__(self, student: MeanFlowStudent, z_t, t, y, v):
        if not self.active:
            return v
        null = torch.full_like(y, student.net.num_classes)
        mix = v * self.omega + student(z_t, t, t, null) * (1 - self.omega - self.kappa)
        if self.kappa:
            mix = mix + self.kappa * student(z_t, t, t, y)
        guided = ((t >= self.t_start) & (t <= self.t_end) & (y != null))
        return torch.where(_bcast(guided, v), mix, v)


def adaptive_weighted(err_sq_sum, p: float, c: float):
    """The batch mean of w·‖Δ‖² with w = sg(1/(‖Δ‖² + c)^p) (p = 0: plain L2)."""
    return (err_sq_sum / (err_sq_sum.detach() + c) ** p).mean()


class MeanFlowObjective:
    """loss(student, logvar_head, x0, z, times, y, step) of MeanFlow (`imf=False`) or iMF's loss (`imf=True`).

    x0 and z are the TrigFlow data and noise (σ_d-scaled, as the distill stage draws them); times is [n, 2] of (t, r).
    MeanFlow regresses u_θ on u_tgt = ṽ − (t − r)·sg(du_θ/dt) with du/dt along (ṽ, 0, 1). iMF's loss regresses the
    compound velocity V = u_θ + (t − r)·sg(du_θ/dt) on ṽ, the derivative taken along the student's own velocity
    estimate sg(u_θ(z_t, t, t)) instead of the sample's e − x. Arithmetic in fp64, network passes in fp32 (or bf16)."""

    def __init__(self, guidance: TrainingGuidance, adaptive_p: float, adaptive_c: float, precision: str = "fp32",
                 imf: bool = False):
        self.guidance, self.p, self.c, self.precision, self.imf = guidance, adaptive_p, adaptive_c, precision, imf

    def __call__(self, student: MeanFlowStudent, logvar_head, x0, z, times, y, step):
        x, e = x0.double() / student.sigma_d, z.double() / student.sigma_d
        t, r = times[:, 0].to(x), times[:, 1].to(x)
        z_t = _bcast(1 - t, x) * x + _bcast(t, x) * e
        v = e - x
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            v_target = self.guidance(student, z_t, t, y, v)
            if self.imf:
                with torch.no_grad():
                    tangent = student(z_t, t, t, y)
            else:
                tangent = v_target
            u, du_dt = student.with_tangent(z_t, r, t, tangent, torch.zeros_like(t), torch.ones_like(t), y)
        span = _bcast(t - r, x)
        delta = (u + span * du_dt - v_target) if self.imf else (u - (v_target - span * du_dt))
        sq = (delta**2).flatten(1).sum(dim=1)
        D = x[0].numel()
        return {"loss": adaptive_weighted(sq, self.p, self.c), "mse": (sq / D).mean().detach(),
                "tangent_norm": du_dt.flatten(1).norm(dim=1).mean(), "du_dt": du_dt}


class MeanFlowSampler:
    """1 step: x = e − u_θ(e, 0, 1); 2 steps: z_m = e − (1 − t_m)·u_θ(e, t_m, 1), x = z_m − t_m·u_θ(z_m, 0, t_m), with t_m
    the linear time of the consistency samplers' middle TrigFlow time (the same noise level). Returns latents."""

    def __init__(self, student: MeanFlowStudent, latent_shape, steps: int, mid_t: float = 1.1):
        if steps not in (1, 2):
            raise ValueError(f"MeanFlow sampler steps {steps}: expected 1 or 2")
        self.student, self.latent_shape, self.steps = student, latent_shape, steps
        self.model, self.nfe = student.net, steps
        self.times = (1.0, linear_time(mid_t), 0.0) if steps == 2 else (1.0, 0.0)

    @torch.no_grad()
    def __call__(self, labels, generator):
        n, device = len(labels), labels.device
        z = torch.randn((n, *self.latent_shape), generator=generator, device=device)
        for t, r in zip(self.times, self.times[1:]):
            full = lambda v: torch.full((n,), v, device=device)  # noqa: E731
            z = z - (t - r) * self.student(z, full(r), full(t), labels)
        return z
