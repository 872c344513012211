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


def _nearest(table, values):
    """The index of the entry of an increasing table nearest to each value."""
    idx = np.clip(np.searchsorted(table, values), 1, len(table) - 1)
    return np.where(np.abs(values - table[idx - 1]) <= np.abs(table[idx] - values), idx - 1, idx)


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
    nearest = _nearest(table, log_sigma)
    direct = np.bincount(nearest, minlength=1000).reshape(20, 50).sum(1) / len(nearest)
    draws = build_sampler("lognormal", diffusion, p_mean=p_mean, p_std=p_std).sample(400_000, torch.Generator().manual_seed(1))
    ours = np.bincount(draws.numpy(), minlength=1000).reshape(20, 50).sum(1) / len(draws)
    assert np.abs(ours - direct).max() < 0.005, (ours, direct)


def test_logit_normal_sampler_follows_sd3(diffusion):
    """u ~ N(m, s²), t_RF = sigmoid(u), SNR = ((1 - t_RF)/t_RF)² = e^(-2u): Monte-Carlo draws of u mapped to the DDPM
    step of nearest log SNR have the sampler's distribution; m moves the mass towards noise (positive) or data."""
    rng = np.random.default_rng(0)
    log_snr = np.log(diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))
    for m, s in ((0.0, 1.0), (1.0, 0.8)):
        t_rf = 1 / (1 + np.exp(-rng.normal(m, s, 400_000)))
        draws = _nearest(-log_snr, -np.log(((1 - t_rf) / t_rf) ** 2))  # -log SNR increases with t
        observed = np.bincount(draws, minlength=1000) / len(draws)
        probs = build_sampler("logit_normal", diffusion, m=m, s=s).probs.numpy()
        assert probs.sum() == pytest.approx(1.0)
        assert np.abs(observed.reshape(20, 50).sum(1) - probs.reshape(20, 50).sum(1)).max() < 0.005, (m, s)
    mean_t = lambda m: (build_sampler("logit_normal", diffusion, m=m, s=1.0).probs.numpy() * np.arange(1000)).sum()  # noqa: E731
    assert mean_t(1.0) > mean_t(0.0) > mean_t(-1.0)


def test_clts_moves_from_uniform_to_its_gaussian_and_stays(diffusion):
    """π_k = λ_k N(μ, σ²)/Z + (1 - λ_k)/T, λ_k = min(1, k/ramp): uniform at step 0, the normalised Gaussian from the end
    of the ramp on (never negative, never past 1), in between the mixture."""
    sampler = build_sampler("clts", diffusion, mu=300, sigma=150, ramp_steps=100)
    t = np.arange(1000)
    gaussian = np.exp(-((t - 300) ** 2) / (2 * 150 ** 2))
    gaussian /= gaussian.sum()
    assert np.allclose(sampler.distribution(8, step=0).numpy(), 1 / 1000)
    assert np.allclose(sampler.distribution(8, step=25).numpy(), 0.25 * gaussian + 0.75 / 1000)
    for step in (100, 10_000):
        assert np.allclose(sampler.distribution(8, step=step).numpy(), gaussian)
    assert _histogram_matches(sampler.sample(200_000, torch.Generator().manual_seed(0), step=25),
                              sampler.distribution(8, step=25)) > 1e-3


def test_sigmoid_weighting_is_kingma_and_gao_in_its_elbo_form(diffusion):
    lam = np.log(diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))
    for b in (0.0, 2.0):
        expected = 1 / (1 + np.exp(lam - b)) * -np.gradient(lam)
        w = build_weighting("sigmoid", diffusion, b=b).numpy()
        assert np.allclose(w, expected / expected.mean(), rtol=1e-5) and w.mean() == pytest.approx(1.0, abs=1e-5)
    # a larger bias weights lower-noise (larger log SNR) steps more
    assert build_weighting("sigmoid", diffusion, b=2.0)[100] > build_weighting("sigmoid", diffusion, b=0.0)[100]


@pytest.mark.parametrize("kind,section", [("SAMPLERS", "SamplerConfig"), ("WEIGHTINGS", "WeightingConfig")])
def test_the_config_takes_the_parameters_the_methods_declare(kind, section):
    """The config section's keys, read from the methods' source without importing them, are exactly the parameters (and
    annotated types) of the methods as imported: a method's new parameter is a config key, a removed one is not."""
    import dataclasses
    import inspect
    import typing

    from speedpipe import config_schema
    from speedpipe.diffusion.timesteps import registered

    declared = {}
    for method in registered(kind).values():
        params = list(inspect.signature(method).parameters.values())
        assert params[0].name == "diffusion"
        for p in params[1:]:
            declared.setdefault(p.name, set()).add(p.annotation)
    fields = {f.name: f.type for f in dataclasses.fields(getattr(config_schema, section)) if f.name != "name"}
    # a parameter two methods annotate differently takes any value
    assert fields == {name: typing.Optional[next(iter(kinds))] if len(kinds) == 1 else typing.Any for name, kinds in declared.items()}
