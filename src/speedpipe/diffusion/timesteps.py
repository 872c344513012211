"""Which timesteps to train on (samplers) and how much each one counts (MSE weightings).

SpeeD (Wang et al., 2024) splits the T steps at τ: the "convergence area" t ≥ τ, near pure noise,
changes little and is sampled k times less often; steps before τ get a change-aware MSE weight
built from the gradient of 1 - ᾱ_t. Baselines: uniform sampling, lognormal (EDM) and logit-normal (SD3) sampling, a
curriculum that moves with the training step (CLTS), P2, Min-SNR and sigmoid (Kingma & Gao) weighting. Samplers and
weightings are independent and chosen by name; a sampler draws for a training step (`step`, 1-based), which only the
curriculum reads -- a resumed run, at the same step, draws as an uninterrupted one.
"""
import functools
import importlib
import inspect
import math

import numpy as np
import torch

from speedpipe.declared import timestep_modules


def meaningful_steps(alphas_cumprod: np.ndarray, threshold: float = 1e-4) -> int:
    """m = 1 + first t where ∂_t √(1-ᾱ_t) < threshold (642 for the linear schedule, T = 1000)."""
    grad = np.gradient(np.sqrt(1.0 - alphas_cumprod))
    return int(np.argmax(grad < threshold)) + 1


def mirror_timesteps(t: torch.Tensor, m: int) -> torch.Tensor:
    """SpeeD's dual draw: t -> m - t below m, t - m from m on."""
    return torch.where(t < m, m - t, t - m)


class TimestepSampler:
    """Draws n training timesteps from a fixed probability vector over 0..T-1."""

    def __init__(self, probs: np.ndarray):
        self.probs = torch.as_tensor(probs, dtype=torch.float64)
        self.num_timesteps = len(probs)

    def sample(self, n: int, generator: torch.Generator | None = None, step: int | None = None) -> torch.Tensor:
        return torch.multinomial(self.probs, n, replacement=True, generator=generator)

    def distribution(self, n: int, step: int | None = None) -> torch.Tensor:
        """The exact marginal probability of each timestep in a batch of n draws (at a training step)."""
        return self.probs.clone()


class UniformSampler(TimestepSampler):
    def __init__(self, diffusion):
        T = diffusion.num_timesteps
        super().__init__(np.full(T, 1.0 / T))


class SpeedSampler(TimestepSampler):
    """Asymmetric sampling p_t ∝ k (t < τ), ∝ 1 (t ≥ τ), with mirrored dual draws around m."""

    def __init__(self, diffusion, k: float, tau: int, dual: bool = True):
        T = diffusion.num_timesteps
        if not 0 < tau <= T:
            raise ValueError(f"speed sampler: tau={tau} must lie in (0, {T}]")
        if k <= 0:
            raise ValueError(f"speed sampler: k={k} must be positive")
        probs = np.where(np.arange(T) < tau, float(k), 1.0)
        super().__init__(probs / (T + tau * (k - 1)))
        self.dual = dual
        self.m = meaningful_steps(diffusion.alphas_cumprod)

    def sample(self, n, generator=None, step=None):
        if not self.dual:
            return super().sample(n, generator)
        draws = super().sample(n // 2 + 1, generator)
        return torch.cat([draws, mirror_timesteps(draws, self.m)])[:n]

    def distribution(self, n, step=None):
        if not self.dual:
            return self.probs.clone()
        n_draws = n // 2 + 1
        n_mirror = n - min(n_draws, n)
        mirrored = torch.zeros_like(self.probs)
        mirrored.index_add_(0, mirror_timesteps(torch.arange(self.num_timesteps), self.m), self.probs)
        return (min(n_draws, n) * self.probs + n_mirror * mirrored) / n


class LognormalSampler(TimestepSampler):
    """log σ ~ N(p_mean, p_std²) with σ² = (1-ᾱ)/ᾱ, mapped to the discrete t of nearest log σ."""

    def __init__(self, diffusion, p_mean: float = -1.2, p_std: float = 1.2):
        if p_std <= 0:
            raise ValueError(f"lognormal sampler: p_std={p_std} must be positive")
        log_sigma = 0.5 * np.log((1.0 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod)
        super().__init__(_interval_masses(log_sigma, p_mean, p_std))  # each t owns the log σ between its neighbours' midpoints


def _interval_masses(centres: np.ndarray, mean: float, std: float) -> np.ndarray:
    """P(X in the interval each centre owns) for X ~ N(mean, std²): the intervals between the midpoints of increasing
    centres, the first and last open to -inf and +inf."""
    edges = np.concatenate([[-np.inf], (centres[1:] + centres[:-1]) / 2, [np.inf]])
    cdf = np.array([0.5 * (1 + math.erf((e - mean) / (std * math.sqrt(2)))) if np.isfinite(e) else float(e > 0) for e in edges])
    return np.diff(cdf)


class LogitNormalSampler(TimestepSampler):
    """SD3's logit-normal sampling (Esser et al., 2024): u ~ N(m, s²) and the rectified-flow time t_RF = sigmoid(u), whose
    SNR is ((1 - t_RF)/t_RF)², i.e. log SNR = -2u; each DDPM step t owns the log-SNR interval between the midpoints to
    its neighbours (SNR_t = ᾱ_t/(1-ᾱ_t)), so it is drawn with the probability that -(log SNR)/2 falls in it."""

    def __init__(self, diffusion, m: float = 0.0, s: float = 1.0):
        if s <= 0:
            raise ValueError(f"logit_normal sampler: s={s} must be positive")
        u = -0.5 * np.log(diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod))  # increasing with t
        super().__init__(_interval_masses(u, m, s))


class CurriculumSampler(TimestepSampler):
    """CLTS, the curriculum timestep schedule of Xu et al. (2024), in the form of SpeeD's comparison code with its two
    defects mended: π_k(t) = λ_k·N(t; μ, σ²)/Z + (1 - λ_k)/T at training step k, λ_k = min(1, k / ramp_steps). SpeeD's
    copy writes the exponent -(t-μ)²/2·T² (so every t but μ underflows) and lets λ_k = k/50,000 pass 1 (negative
    probabilities); here the exponent is -(t-μ)²/(2σ²) and λ stops at 1. The paper's own constants could not be read
    here: μ, σ and ramp_steps have no defaults (SpeeD's code and a review of the paper give μ = 0.3 T)."""

    def __init__(self, diffusion, mu: float, sigma: float, ramp_steps: int):
        T = diffusion.num_timesteps
        if sigma <= 0 or ramp_steps <= 0:
            raise ValueError(f"clts sampler: sigma={sigma} and ramp_steps={ramp_steps} must be positive")
        t = np.arange(T)
        gaussian = np.exp(-((t - mu) ** 2) / (2 * sigma**2))
        if not gaussian.sum() > 0:
            raise ValueError(f"clts sampler: N({mu}, {sigma}²) has no mass on the steps 0..{T - 1}")
        self.gaussian = torch.as_tensor(gaussian / gaussian.sum(), dtype=torch.float64)
        self.ramp_steps = ramp_steps
        super().__init__(np.full(T, 1.0 / T))

    def probs_at(self, step: int | None) -> torch.Tensor:
        lam = min(1.0, (step or 0) / self.ramp_steps)
        return lam * self.gaussian + (1 - lam) * self.probs

    def sample(self, n, generator=None, step=None):
        return torch.multinomial(self.probs_at(step), n, replacement=True, generator=generator)

    def distribution(self, n, step=None):
        return self.probs_at(step)


def speed_weights(diffusion, lam: float, tau: int) -> torch.Tensor:
    """Change-aware weights: w_t = (1-λ) + (2λ-1) ĝ_t for t < τ (ĝ = min-max rescaled ∂_t(1-ᾱ_t)), else 1."""
    grad = np.gradient(1.0 - diffusion.alphas_cumprod)
    g_hat = (grad - grad.min()) / (grad.max() - grad.min())
    w = np.where(np.arange(diffusion.num_timesteps) < tau, (1 - lam) + (2 * lam - 1) * g_hat, 1.0)
    if (w < 0).any():
        raise ValueError(f"speed weighting: lam={lam} gives negative weights; expected 0 <= lam <= 1")
    return torch.as_tensor(w, dtype=torch.float32)


def p2_weights(diffusion, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2 (Choi et al., 2022): w_t = 1 / (k + SNR_t)^γ."""
    return torch.as_tensor(1.0 / (k + diffusion.snr) ** gamma, dtype=torch.float32)


def min_snr_weights(diffusion, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ for ε-prediction (Hang et al., 2023): w_t = min(SNR_t, γ) / SNR_t."""
    snr = diffusion.snr
    return torch.as_tensor(np.minimum(snr, gamma) / snr, dtype=torch.float32)


def sigmoid_weights(diffusion, b: float) -> torch.Tensor:
    """Sigmoid weighting (Kingma & Gao, 2023) in its ELBO form with uniform t: their loss is E_t[w(λ_t)·(-dλ/dt)·‖ε̂ - ε‖²]
    with w(λ) = sigmoid(b - λ), λ = log SNR, so the ε-MSE multiplier of step t is w(λ_t)·(-dλ/dt) (-dλ/dt by central
    differences of λ over the steps), scaled to mean 1 over t (the scale is the learning rate's)."""
    lam = np.log(diffusion.snr)
    w = 1.0 / (1.0 + np.exp(-(b - lam))) * -np.gradient(lam)
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def no_weights(diffusion) -> torch.Tensor:
    return torch.ones(diffusion.num_timesteps, dtype=torch.float32)


SAMPLERS = {"uniform": UniformSampler, "speed": SpeedSampler, "lognormal": LognormalSampler, "logit_normal": LogitNormalSampler,
            "clts": CurriculumSampler}
WEIGHTINGS = {"none": no_weights, "speed": speed_weights, "p2": p2_weights, "min_snr": min_snr_weights, "sigmoid": sigmoid_weights}


@functools.lru_cache(maxsize=None)
def registered(kind: str) -> dict:
    """The methods of a kind (SAMPLERS or WEIGHTINGS) by name: the built-in ones above and those of the modules of
    speedpipe.diffusion.timestep_methods."""
    methods = dict(globals()[kind])
    for module_name in timestep_modules():
        module = importlib.import_module(f"speedpipe.diffusion.timestep_methods.{module_name}")
        for name, method in getattr(module, kind, {}).items():
            if name in methods:
                raise ValueError(f"{module.__name__}: {kind} name {name!r} is taken by another method")
            methods[name] = method
    return methods


def _call_with_params(kind, methods, name, diffusion, params):
    registry = registered(methods)
    if name not in registry:
        raise ValueError(f"{kind}: unknown name {name!r}; expected one of {sorted(registry)}")
    factory = registry[name]
    signature = inspect.signature(factory)
    accepted = [p for p in signature.parameters if p != "diffusion"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{kind} {name!r}: unknown parameter(s) {unknown}; it accepts {accepted}")
    missing = [p for p, v in signature.parameters.items() if v.default is inspect.Parameter.empty and p not in params and p != "diffusion"]
    if missing:
        raise ValueError(f"{kind} {name!r}: missing required parameter(s) {missing} (set them explicitly)")
    return factory(diffusion, **params)


def build_sampler(name: str, diffusion, **params) -> TimestepSampler:
    """build_sampler("speed", diffusion, k=5, tau=700).sample(n) -> LongTensor [n]."""
    return _call_with_params("timestep sampler", "SAMPLERS", name, diffusion, params)


def build_weighting(name: str, diffusion, **params) -> torch.Tensor:
    """build_weighting("speed", diffusion, lam=0.6, tau=700) -> FloatTensor [T] of per-timestep MSE weights."""
    return _call_with_params("loss weighting", "WEIGHTINGS", name, diffusion, params)
