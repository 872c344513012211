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
