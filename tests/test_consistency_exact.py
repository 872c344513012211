"""The consistency methods on an exact problem: a Gaussian mixture whose optimal TrigFlow velocity is known in closed form.

The teacher is the analytically optimal denoiser of the mixture, so its probability-flow ODE carries noise exactly to
the data, and it is also the data's own ODE; a converged consistency student maps noise to the ODE's endpoint in one
step. For every method (sCD following the teacher's velocity, sCT the data pairs'), the TrigFlow-native student (warm
start, then the method's objective as the pipeline builds it) must match the mixture in 1 and 2 steps and agree with
the exact ODE endpoint; the warm-started student before the method, and (sCD) an ε-parameterised student given the
same budget, must not.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from speedpipe.config_schema import DistillConfig
from speedpipe.consistency.methods import consistency_method, method_names
from speedpipe.consistency.objectives import LogvarHead, TrigFlowDiffusionLoss, sample_time
from speedpipe.consistency.sampling import ConsistencySampler
from speedpipe.consistency.trigflow import TrigFlowModel, TrigFlowStudent, TrigFlowTeacher, t_max
from speedpipe.diffusion import create_diffusion
from speedpipe.models.dit import TimestepEmbedder

SIGMA_D = 0.5
MODES = torch.tensor([[1.4, 0.0], [0.0, 1.4], [-1.4, 0.0], [0.0, -1.4]], dtype=torch.float64)  # latent units
MODE_STD = 0.16
THRESHOLD = 0.1  # energy distance to fresh data (latent units); two fresh data sets of this size: 0.001
ODE_THRESHOLD = 0.5  # mean squared distance to the exact ODE endpoint (latent units; the data's second moment: 2.0)


def mixture_latents(n, generator):
    k = torch.randint(0, len(MODES), (n,), generator=generator)
    return MODES[k] + MODE_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)


class MixtureTeacher(TrigFlowModel):
    """The optimal F = (cos t·E[z|x_t] − sin t·E[x0|x_t])/σ_d for x0 = σ_d·latent, latent ~ the equal-weight mixture."""

    def __init__(self):
        super().__init__(nn.Linear(1, 1).double(), SIGMA_D)

    def forward(self, x_scaled, t, y):
        x, t = (SIGMA_D * x_scaled).double(), t.double()
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        mu, var0 = SIGMA_D * MODES, (SIGMA_D * MODE_STD) ** 2
        v = c**2 * var0 + s**2 * SIGMA_D**2  # variance of x_t given the mode
        d = x[:, None, :] - c[:, None] * mu[None]  # [n, modes, 2]
        w = torch.softmax(-(d**2).sum(-1) / (2 * v), dim=1)[..., None]
        e_x0 = (w * (mu[None] + (c * var0 / v)[:, None] * d)).sum(1)
        e_z = (w * ((s * SIGMA_D**2 / v)[:, None] * d)).sum(1)
        return ((c * e_z - s * e_x0) / SIGMA_D).to(x_scaled.dtype)


class TinyNet(nn.Module):
    """net(x, time input, y) -> 2·D outputs (the first D are read), like a learned-sigma DiT."""

    def __init__(self, width=128):
        super().__init__()
        self.t_embedder = TimestepEmbedder(width)
        self.inp, self.hidden, self.out = nn.Linear(2, width), nn.Linear(width, width), nn.Linear(width, 4)
        self.num_classes = 1

    def forward(self, x, c_noise, y):
        h = F.silu(self.inp(x) + self.t_embedder(c_noise))
        return self.out(F.silu(self.hidden(h)))


class EpsilonStudent(TrigFlowTeacher):
    """The design sCD used to have: an ε-prediction network seen through the ε→TrigFlow conversion."""

    def c_noise(self, t):
        return self.index.index(-torch.log1p(self.ddpm_sigma(t) ** 2))


def distill(as_student, teacher, method="scd", warm_steps=300, scd_steps=900, batch=256, seed=0):
    """Warm start then the method's objective for as_student(net), built as the distill stage builds them; returns
    as_student(EMA weights) at the end of each phase."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = TinyNet()
    student, ema_net = as_student(net), copy.deepcopy(net)
    head = LogvarHead()
    opt = torch.optim.Adam([*student.net.parameters(), *head.parameters()], lr=5e-4, betas=(0.9, 0.99))
    warm = TrigFlowDiffusionLoss(teacher, "teacher")
    settings = OmegaConf.structured(DistillConfig(tangent_warmup=scd_steps // 4, sigma_d=SIGMA_D))  # every distill.* key
    scd = consistency_method(method).objective(teacher, settings)
    y = torch.zeros(batch, dtype=torch.long)
    snapshots = []
    for step in range(1, warm_steps + scd_steps + 1):
        x0 = SIGMA_D * mixture_latents(batch, g)
        z = SIGMA_D * torch.randn(batch, 2, generator=g, dtype=torch.float64)
        t = sample_time(batch, SIGMA_D, -1.0, 1.4, generator=g)
        objective, k = (warm, step) if step <= warm_steps else (scd, step - warm_steps)
        loss = objective(student, head, x0, z, t, y, k)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema_net.parameters(), student.net.parameters()):
                p_ema.lerp_(p, 0.01)
        if step in (warm_steps, warm_steps + scd_steps):
            snapshots.append(as_student(copy.deepcopy(ema_net)))
    return snapshots


def energy_distance(a, b):
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def exact_ode_endpoint(teacher, x, t0, steps=400):
    """RK4 of dx/dt = σ_d·F_teacher(x/σ_d, t) from t0 down to 0."""
    velocity = lambda x, t: SIGMA_D * teacher(x / SIGMA_D, torch.full((len(x),), t, dtype=torch.float64), None)  # noqa: E731
    ts = torch.linspace(t0, 0.0, steps + 1, dtype=torch.float64)
    for a, b in zip(ts[:-1], ts[1:]):
        h = b - a
        k1 = velocity(x, a)
        k2 = velocity(x + h / 2 * k1, a + h / 2)
        k3 = velocity(x + h / 2 * k2, a + h / 2)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + velocity(x + h * k3, b))
    return x


@torch.no_grad()
def scores(student, teacher, n=1500):
    data = mixture_latents(n, torch.Generator().manual_seed(123))
    labels = torch.zeros(n, dtype=torch.long)
    result = {}
    for steps in (1, 2):
        latents = ConsistencySampler(student, (2,), steps)(labels, torch.Generator().manual_seed(7))
        result[f"energy_{steps}step"] = energy_distance(latents.double(), data)
    noise = SIGMA_D * torch.randn(500, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    t0 = t_max(80.0, SIGMA_D)
    f = student.consistency(noise, torch.full((500,), t0, dtype=torch.float64), labels[:500]).double()
    result["ode_endpoint_mse"] = ((f - exact_ode_endpoint(teacher, noise, t0)) ** 2).sum(1).mean().item() / SIGMA_D**2
    return result


def test_the_exact_teacher_carries_noise_to_the_mixture():
    teacher = MixtureTeacher()
    noise = SIGMA_D * torch.randn(1500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    endpoints = exact_ode_endpoint(teacher, noise, t_max(80.0, SIGMA_D)) / SIGMA_D
    assert energy_distance(endpoints, mixture_latents(1500, torch.Generator().manual_seed(2))) < 0.005


# every method of speedpipe.consistency.methods on the TrigFlow student, a new one included (MeanFlow's student follows
# another path: tests/test_meanflow.py judges its objective on a mixture with its exact average velocity)
@pytest.mark.parametrize("method", [m for m in method_names() if consistency_method(m).student is None])
def test_each_method_turns_the_warm_started_student_into_a_one_step_sampler_of_the_mixture(method):
    teacher = MixtureTeacher()
    warm_started, trained = distill(lambda net: TrigFlowStudent(net, SIGMA_D, time_scale=1.0), teacher, method)
    before, after = scores(warm_started, teacher), scores(trained, teacher)
    assert after["energy_1step"] < THRESHOLD and after["energy_2step"] < THRESHOLD, after
    assert after["ode_endpoint_mse"] < ODE_THRESHOLD, after
    assert before["energy_1step"] > THRESHOLD and before["ode_endpoint_mse"] > ODE_THRESHOLD, before  # the method did the work


def test_an_epsilon_student_does_not_distil_the_mixture():
    """The design sCD used to have, with the same budget: the ε→TrigFlow conversion's 1/cos t gain is ill-conditioned."""
    teacher = MixtureTeacher()
    alphas_cumprod = create_diffusion("").alphas_cumprod
    _, eps_distilled = distill(lambda net: EpsilonStudent(net, alphas_cumprod, SIGMA_D, latent_scale=SIGMA_D), teacher)
    eps = scores(eps_distilled, teacher)
    assert not (eps["energy_1step"] < THRESHOLD and eps["ode_endpoint_mse"] < ODE_THRESHOLD), eps
