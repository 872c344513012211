"""Which timesteps to train on (samplers) and how much each one counts (MSE weightings).

SpeeD (Wang et al., 2024) splits the T steps at τ: the "convergence area" t ≥ τ, near pure noise,
changes little and is sampled k times less often; steps before τ get a change-aware MSE weight
built from the gradient of 1 - ᾱ_t. Baselines: uniform sampling, lognormal (EDM/SD3) sampling,
P2 and Min-SNR weighting. Samplers and weightings are independent and chosen by name.
"""
import inspect
import math

import numpy as np
import torch


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

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.multinomial(self.probs, n, replacement=True, generator=generator)

    def distribution(self, n: int) -> torch.Tensor:
        """The exact marginal probability of each timestep in a batch of n draws."""
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

    def sample(self, n, generator=None):
        if not self.dual:
            return super().sample(n, generator)
        draws = super().sample(n // 2 + 1, generator)
        return torch.cat([draws, mirror_timesteps(draws, self.m)])[:n]

    def distribution(self, n):
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
        # Each t owns the log σ interval between the midpoints to its neighbours (log σ increases with t).
        edges = np.concatenate([[-np.inf], (log_sigma[1:] + log_sigma[:-1]) / 2, [np.inf]])
        cdf = np.array([0.5 * (1 + math.erf((e - p_mean) / (p_std * math.sqrt(2)))) if np.isfinite(e) else float(e > 0) for e in edges])
        super().__init__(np.diff(cdf))


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


def no_weights(diffusion) -> torch.Tensor:
    return torch.ones(diffusion.num_timesteps, dtype=torch.float32)


SAMPLERS = {"uniform": UniformSampler, "speed": SpeedSampler, "lognormal": LognormalSampler}
WEIGHTINGS = {"none": no_weights, "speed": speed_weights, "p2": p2_weights, "min_snr": min_snr_weights}


def _call_with_params(kind, registry, name, diffusion, params):
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
    return _call_with_params("timestep sampler", SAMPLERS, name, diffusion, params)


def build_weighting(name: str, diffusion, **params) -> torch.Tensor:
    """build_weighting("speed", diffusion, lam=0.6, tau=700) -> FloatTensor [T] of per-timestep MSE weights."""
    return _call_with_params("loss weighting", WEIGHTINGS, name, diffusion, params)
