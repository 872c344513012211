import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler, build_weighting, meaningful_steps, mirror_timesteps


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion(timestep_respacing="")


def _histogram_matches(samples, probs):
    counts = np.bincount(samples.numpy(), minlength=len(probs))
    expected = probs.numpy() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "draws fell on timesteps of probability zero"
    return chisquare(counts[keep], expected[keep]).pvalue


def test_meaningful_steps_linear_schedule(diffusion):
    assert meaningful_steps(diffusion.alphas_cumprod) == 642


def test_speed_probability_vector(diffusion):
    sampler = build_sampler("speed", diffusion, k=5, tau=700, dual=False)
    p = sampler.probs.numpy()
    assert np.allclose(p[:700], 5 / (1000 + 700 * 4)) and np.allclose(p[700:], 1 / (1000 + 700 * 4))
    assert p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("name,params", [
    ("uniform", {}),
    ("speed", {"k": 5, "tau": 700, "dual": False}),
    ("speed", {"k": 25, "tau": 700, "dual": False}),
    ("lognormal", {"p_mean": -1.2, "p_std": 1.2}),
])
def test_sampler_histogram_matches_exact_distribution(diffusion, name, params):
    sampler = build_sampler(name, diffusion, **params)
    g = torch.Generator().manual_seed(0)
    samples = sampler.sample(400_000, g)
    assert samples.dtype == torch.long and samples.min() >= 0 and samples.max() < 1000
    assert _histogram_matches(samples, sampler.distribution(400_000)) > 1e-3


def test_speed_dual_draws_mirror_around_m(diffusion):
    sampler = build_sampler("speed", diffusion, k=5, tau=700, dual=True)
    g = torch.Generator().manual_seed(1)
    n = 256
    batch = sampler.sample(n, g)
    draws, mirrors = batch[: n // 2 + 1], batch[n // 2 + 1 :]
    assert torch.equal(mirrors, torch.where(draws < 642, 642 - draws, draws - 642)[: n - (n // 2 + 1)])
    samples = torch.cat([sampler.sample(n, g) for _ in range(2000)])
    assert _histogram_matches(samples, sampler.distribution(n)) > 1e-3
    # Mirrors land in [0, m]: above m only the direct draws contribute.
    assert torch.allclose(sampler.distribution(n)[643:], (n // 2 + 1) / n * sampler.probs[643:])


def test_mirror_map():
    t = torch.tensor([0, 1, 641, 642, 643, 999])
    assert mirror_timesteps(t, 642).tolist() == [642, 641, 1, 0, 1, 357]


def test_speed_weights(diffusion):
    lam, tau = 0.6, 700
    w = build_weighting("speed", diffusion, lam=lam, tau=tau).numpy()
    assert w.shape == (1000,)
    assert (w[:tau] >= 1 - lam - 1e-6).all() and (w[:tau] <= lam + 1e-6).all()
    assert np.all(w[tau:] == 1.0)
    g = np.gradient(1 - diffusion.alphas_cumprod)
    g_hat = (g - g.min()) / (g.max() - g.min())
    assert np.allclose(w[:tau], 0.4 + 0.2 * g_hat[:tau], atol=1e-6)
    assert w[:tau].max() == pytest.approx(lam, abs=1e-6)  # the steepest change gets weight λ


def test_speed_weights_refuse_negative(diffusion):
    with pytest.raises(ValueError, match="negative"):
        build_weighting("speed", diffusion, lam=5, tau=700)


def test_p2_and_min_snr(diffusion):
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    assert np.allclose(build_weighting("p2", diffusion, k=1.0, gamma=1.0).numpy(), 1 / (1 + snr), rtol=1e-6)
    w = build_weighting("min_snr", diffusion, gamma=5.0).numpy()
    assert np.allclose(w, np.minimum(snr, 5) / snr, rtol=1e-6)
    assert w[-1] == pytest.approx(1.0) and w[0] < 1e-3
    assert torch.all(build_weighting("none", diffusion) == 1)


def test_builders_refuse_unknown_names_and_params(diffusion):
    with pytest.raises(ValueError, match="unknown name 'speeed'"):
        build_sampler("speeed", diffusion)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lam'\]"):
        build_sampler("speed", diffusion, k=5, tau=700, lam=0.6)
    with pytest.raises(ValueError, match="missing required"):
        build_weighting("speed", diffusion, lam=0.6)


@pytest.mark.parametrize("p_mean,p_std", [(-1.2, 1.2), (0.4, 0.8)])
def test_lognormal_sampler_follows_the_formula(diffusion, p_mean, p_std):
    """METHODS.md §3, drawn directly: log σ ~ N(P_mean, P_std), t = the discrete step whose σ_t = √((1-ᾱ)/ᾱ) is nearest
    in log σ. The sampler's draws must have the same distribution (binned over 20 groups of 50 steps)."""
    rng = np.random.default_rng(0)
    log_sigma = rng.normal(p_mean, p_std, 400_000)
    table = 0.5 * np.log((1 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod)
    idx = np.clip(np.searchsorted(table, log_sigma), 1, len(table) - 1)
    nearest = np.where(np.abs(log_sigma - table[idx - 1]) <= np.abs(table[idx] - log_sigma), idx - 1, idx)
    direct = np.bincount(nearest, minlength=1000).reshape(20, 50).sum(1) / len(nearest)
    draws = build_sampler("lognormal", diffusion, p_mean=p_mean, p_std=p_std).sample(400_000, torch.Generator().manual_seed(1))
    ours = np.bincount(draws.numpy(), minlength=1000).reshape(20, 50).sum(1) / len(draws)
    assert np.abs(ours - direct).max() < 0.005, (ours, direct)
