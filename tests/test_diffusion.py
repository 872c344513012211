import math

import numpy as np
import pytest
import torch

from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.gaussian import cfg_model_fn, get_named_beta_schedule, space_timesteps


def test_linear_schedule_matches_dit():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    d = create_diffusion("")
    assert d.num_timesteps == 1000 and d.alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=0.01)


def test_respacing():
    d = create_diffusion("250")
    assert d.num_timesteps == 250 and d.timestep_map[0] == 0 and d.timestep_map[-1] == 999
    full = create_diffusion("")
    # Respaced ᾱ equals the base ᾱ at the kept steps.
    assert np.allclose(d.alphas_cumprod, full.alphas_cumprod[d.timestep_map])
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    # trailing: T-1 - round(i T / N), so every step count starts at the pure-noise end t = 999
    assert space_timesteps(1000, "trailing4") == {999, 749, 499, 249} and space_timesteps(1000, "trailing1") == {999}
    with pytest.raises(ValueError, match="cannot"):
        space_timesteps(10, "20")


def test_hybrid_loss_weights_only_the_mse_and_stops_gradient_of_vb_through_the_mean():
    d = create_diffusion("")
    x0 = torch.randn(4, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    out = torch.randn(4, 4, 4, 4, requires_grad=True)
    weight = torch.linspace(0.5, 2.0, 1000)
    terms = d.training_losses(out, x0, x_t, t, noise, mse_weight=weight)
    plain = d.training_losses(out, x0, x_t, t, noise)
    assert torch.allclose(terms["loss"], weight[t] * plain["mse"] + plain["vb"])
    assert torch.allclose(terms["mse"], ((noise - out[:, :2]) ** 2).mean(dim=(1, 2, 3)))
    grad_eps_vb, grad_var_vb = torch.autograd.grad(terms["vb"].sum(), out)[0].split(2, dim=1)
    assert torch.all(grad_eps_vb == 0) and grad_var_vb.abs().sum() > 0


def test_vb_is_zero_for_the_true_posterior():
    d = create_diffusion("")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([300, 700])
    x_t = d.q_sample(x0, t, noise)
    # Exact ε and the variance interpolation that hits the true posterior variance (v = -1 → β̃_t).
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    assert torch.allclose(d.training_losses(out, x0, x_t, t, noise)["vb"], torch.zeros(2), atol=1e-5)


def test_samplers_recover_a_point_mass_with_the_optimal_denoiser():
    """With data = a single point x*, the optimal ε̂ is (x_t - √ᾱ x*)/√(1-ᾱ): every sampler must return x*."""
    target = torch.full((2, 1, 2, 2), 0.3)
    for respacing in ("50", "ddim20"):
        d = create_diffusion(respacing, learn_sigma=False)
        base = create_diffusion("", learn_sigma=False)
        a = torch.from_numpy(base.alphas_cumprod).float()

        def eps_fn(x, t):
            return (x - a[t].sqrt().view(-1, 1, 1, 1) * target) / (1 - a[t]).sqrt().view(-1, 1, 1, 1)

        g = torch.Generator().manual_seed(0)
        out = d.p_sample_loop(eps_fn, target.shape, generator=g) if respacing == "50" else d.ddim_sample_loop(eps_fn, target.shape, generator=g)
        assert torch.allclose(out, target, atol=1e-3), respacing


def test_cfg_scale_one_is_the_conditional_model():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return torch.cat([x * y.view(-1, 1, 1, 1), x], dim=1)

    x, t, y = torch.randn(3, 4, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    assert torch.equal(cfg_model_fn(model, y, 1.0, null_class=10)(x, t), model(x, t, y)) and calls[0] == 3
    guided = cfg_model_fn(model, y, 4.0, null_class=0, guided_channels=3)(x, t)
    # null class 0 makes the unconditional ε zero: guided = 4 ε_c on 3 channels, ε_c on the 4th.
    assert torch.allclose(guided[:, :3], 4 * (x * y.view(-1, 1, 1, 1))[:, :3])
    assert torch.allclose(guided[:, 3], (x * y.view(-1, 1, 1, 1))[:, 3])


def _table():
    """A small hand-made ᾱ table (T = 4), independent of the library's schedule code."""
    betas = np.array([0.1, 0.2, 0.3, 0.4])
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    return betas, alphas, ab, ab_prev


def test_posterior_and_learned_range_variance_against_closed_forms():
    from speedpipe.diffusion.gaussian import GaussianDiffusion

    betas, alphas, ab, ab_prev = _table()
    d = GaussianDiffusion(betas, learn_sigma=True)
    x0, x_t = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.arange(4)
    mean, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    post_var = betas * (1 - ab_prev) / (1 - ab)  # β̃_t
    coef1, coef2 = betas * np.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * np.sqrt(alphas) / (1 - ab)
    v = lambda a: torch.tensor(a, dtype=torch.float32).view(-1, 1, 1, 1)  # noqa: E731
    assert torch.allclose(mean, v(coef1) * x0 + v(coef2) * x_t, atol=1e-6)
    assert torch.allclose(log_var[:, 0, 0, 0], torch.tensor(np.log(np.append(post_var[1], post_var[1:])), dtype=torch.float32))
    # learned range: log σ² = f·log β_t + (1-f)·log β̃_t (β̃ clipped at t = 0) with f = (v+1)/2
    eps, raw_v = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.tensor([-1.0, -0.2, 0.5, 1.0]).view(-1, 1, 1, 1)
    out = torch.cat([eps, raw_v.expand_as(eps).double()], dim=1)
    m, lv, x0_hat, _ = d.p_mean_variance_from_output(out, x_t, t)
    f = (raw_v[:, 0, 0, 0].numpy() + 1) / 2
    expected = f * np.log(betas) + (1 - f) * np.log(np.append(post_var[1], post_var[1:]))
    assert np.allclose(lv[:, 0, 0, 0].numpy(), expected, atol=1e-6)
    x0_expected = (x_t - v(np.sqrt(1 - ab)) * eps) / v(np.sqrt(ab))
    assert torch.allclose(x0_hat, x0_expected, atol=1e-5)
    assert torch.allclose(m, v(coef1) * x0_expected + v(coef2) * x_t, atol=1e-5)


class _RecordedNoise:
    """A fixed ε̂ network and the noise a sampler draws, so one step can be recomputed by hand."""

    def __init__(self, eps):
        self.eps = eps

    def __call__(self, x, t):
        return torch.cat([self.eps, torch.zeros_like(self.eps)], dim=1)  # v = 0: the geometric mean of β and β̃


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_ddim_step_against_its_formula(eta):
    from speedpipe.diffusion.gaussian import GaussianDiffusion

    betas, alphas, ab, ab_prev = _table()
    d = GaussianDiffusion(betas[:2], learn_sigma=True)  # two steps: t = 1 (from the noise) then t = 0
    ab, ab_prev = ab[:2], ab_prev[:2]
    eps, x_T = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    g = torch.Generator().manual_seed(3)
    z_gen = torch.Generator().manual_seed(3)
    out = d.ddim_sample_loop(_RecordedNoise(eps), x_T.shape, eta=eta, noise=x_T, generator=g)
    x = x_T
    for t in (1, 0):
        x0 = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        eps_t = (x - np.sqrt(ab[t]) * x0) / np.sqrt(1 - ab[t])
        sigma = eta * np.sqrt((1 - ab_prev[t]) / (1 - ab[t])) * np.sqrt(1 - ab[t] / ab_prev[t])
        z = torch.randn(x.shape, generator=z_gen) if t > 0 else torch.zeros_like(x)
        x = np.sqrt(ab_prev[t]) * x0 + np.sqrt(1 - ab_prev[t] - sigma**2) * eps_t + sigma * z
    assert torch.allclose(out, x.float(), atol=1e-5)


def test_one_ddpm_step_against_its_formula():
    from speedpipe.diffusion.gaussian import GaussianDiffusion

    betas, alphas, ab, ab_prev = _table()
    d = GaussianDiffusion(betas[:2], learn_sigma=True)
    ab, ab_prev = ab[:2], ab_prev[:2]
    post_var = betas[:2] * (1 - ab_prev) / (1 - ab)
    eps, x_T = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    out = d.p_sample_loop(_RecordedNoise(eps), x_T.shape, noise=x_T, generator=torch.Generator().manual_seed(4))
    z_gen, x = torch.Generator().manual_seed(4), x_T
    for t in (1, 0):
        x0 = (x - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t])
        mean = betas[t] * np.sqrt(ab_prev[t]) / (1 - ab[t]) * x0 + (1 - ab_prev[t]) * np.sqrt(alphas[t]) / (1 - ab[t]) * x
        log_var = 0.5 * np.log(betas[t]) + 0.5 * np.log(post_var[1])  # v = 0; β̃ clipped at t = 0 to β̃_1
        z = torch.randn(x.shape, generator=z_gen) if t > 0 else torch.zeros_like(x)
        x = mean + np.exp(0.5 * log_var) * z
    assert torch.allclose(out, x.float(), atol=1e-5)


def _gaussian_data_denoiser(mu, s):
    """Exact ε̂ for data x0 ~ N(μ, s²): ε̂ = √(1-ᾱ)(x_t - √ᾱ μ)/(ᾱ s² + 1 - ᾱ), on the full 1000-step schedule."""
    ab = torch.from_numpy(create_diffusion("").alphas_cumprod)

    def eps_fn(x, t):
        a = ab[t].view(-1, 1, 1, 1).float()
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
    return eps_fn, ab.double()


def test_gaussian_data_through_ancestral_sampling_keeps_its_mean_and_variance():
    """Ancestral DDPM with the exact denoiser draws N(μ, s²) (a point mass would hide wrong variances: here every
    step's noise and scale matter)."""
    mu, s = 0.7, 0.4
    eps_fn, _ = _gaussian_data_denoiser(mu, s)
    out = create_diffusion("50", learn_sigma=False).p_sample_loop(eps_fn, (4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(mu, abs=0.02) and out.std().item() == pytest.approx(s, rel=0.05)


@pytest.mark.parametrize("respacing", ["ddim50", "trailing10", "ddim250"])
def test_ddim_on_gaussian_data_is_the_euler_step_in_sigma(respacing):
    """DDIM is Euler on dx̄/dσ = ε̂ with x̄ = x/√ᾱ, σ = √((1-ᾱ)/ᾱ). For Gaussian data ε̂ = σ(x̄-μ)/(s²+σ²), so each step
    maps x̄-μ to r(x̄-μ) with r = (s² + σσ')/(s² + σ²): the output is μ + Πr (x_T/√ᾱ_T - μ) element by element.
    With many steps Πr reaches the exact flow's s/√(s²+σ_T²) and the samples have std s; with few it falls short."""
    mu, s = 0.7, 0.4
    eps_fn, ab = _gaussian_data_denoiser(mu, s)
    d = create_diffusion(respacing, learn_sigma=False)
    noise = torch.randn((2000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    out = d.ddim_sample_loop(eps_fn, noise.shape, noise=noise)
    sigma = [((1 - ab[t]) / ab[t]).sqrt() for t in d.timestep_map][::-1] + [0.0]
    contraction = math.prod((s**2 + a * b) / (s**2 + a**2) for a, b in zip(sigma[:-1], sigma[1:]))
    expected = mu + contraction * (noise.double() * math.sqrt(1 + sigma[0] ** 2) - mu)
    assert torch.allclose(out.double(), expected, atol=1e-4)
    if respacing == "ddim250":
        assert out.std().item() == pytest.approx(s, rel=0.05)
    if respacing == "trailing10":
        assert out.std().item() < 0.8 * s
