"""Gaussian diffusion in the ADM / DiT conventions (Ho et al. 2020; Nichol & Dhariwal 2021).

Discrete index t = 0 is the clean end and t = T-1 pure noise. The model predicts ε and, with
learned sigmas, an interpolation v between log β_t and log β̃_t ("learned range"). The training
loss is the improved-DDPM hybrid: w_t · MSE(ε, ε̂) + L_vlb, where the VLB term sees the predicted
mean through a stop-gradient and the per-timestep weight w_t touches only the MSE term.
"""
import math

import numpy as np
import torch


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps  # keeps the schedule comparable for T != 1000
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"noise_schedule: unknown schedule {name!r}; expected 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins under a Gaussian (ADM's decoder term)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _extract(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape):
    """arr[timesteps] as a float tensor broadcastable to broadcast_shape."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return res.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)


class GaussianDiffusion:
    def __init__(self, betas: np.ndarray, learn_sigma: bool = True):
        self.betas = np.asarray(betas, dtype=np.float64)
        assert self.betas.ndim == 1 and (self.betas > 0).all() and (self.betas <= 1).all()
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(self.betas)

        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; clip its log there (to β_0 for a single-step diffusion: a DDIM-1 sampler).
        clip = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(clip, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @property
    def snr(self) -> np.ndarray:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) per timestep."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    # ----- forward process -----
    def q_sample(self, x_start, t, noise):
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t.shape)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    # ----- reverse process -----
    def p_mean_variance_from_output(self, model_output, x_t, t, clip_denoised=False):
        """Turn a raw network output [ε̂ | v] into the reverse-step mean, log-variance and x̂0."""
        C = x_t.shape[1]
        if self.learn_sigma:
            eps, var_values = model_output[:, :C], model_output[:, C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
            max_log = _extract(np.log(self.betas), t, x_t.shape)
            frac = (var_values + 1) / 2  # the model outputs v in [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            # Fixed "large" variance (β_t, with β̃_1 at t = 0), as ADM for non-learned sigmas.
            log_variance = _extract(np.log(np.append(self.posterior_variance[1], self.betas[1:])), t, x_t.shape)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart, eps

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """The VLB term L_t in bits per dimension (L_0 is the discretised decoder likelihood)."""
        true_mean, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance_from_output(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----- training -----
    def training_losses(self, model_output, x_start, x_t, t, noise, mse_weight=None):
        """Per-example losses given the network output at (x_t, t).

        Returns dict(loss, mse, vb): loss = mse_weight[t] * mse + vb. The VLB term only trains the
        variance: the ε part of the output is detached so the mean is learned by the MSE alone.
        """
        C = x_t.shape[1]
        eps = model_output[:, :C]
        mse = mean_flat((noise.float() - eps.float()) ** 2)
        terms = {"mse": mse}
        if self.learn_sigma:
            frozen_out = torch.cat([eps.detach(), model_output[:, C:]], dim=1).float()
            terms["vb"] = self.vb_terms_bpd(frozen_out, x_start.float(), x_t.float(), t)
        else:
            terms["vb"] = torch.zeros_like(mse)
        weight = 1.0 if mse_weight is None else mse_weight.to(mse.device)[t]
        terms["loss"] = weight * mse + terms["vb"]
        return terms

    # ----- sampling -----
    def p_sample_loop(self, model_fn, shape, noise=None, generator=None, device="cpu", progress=False, clip_denoised=False):
        """Ancestral sampling. model_fn(x, t) -> raw network output at this diffusion's timesteps."""
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        for i in self._progress(range(self.num_timesteps)[::-1], progress):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                mean, log_var, _, _ = self.p_mean_variance_from_output(model_fn(x, t), x, t, clip_denoised)
            z = torch.randn(x.shape, generator=generator, device=x.device) if i > 0 else torch.zeros_like(x)
            x = mean + torch.exp(0.5 * log_var) * z
        return x

    def ddim_sample_loop(self, model_fn, shape, eta=0.0, noise=None, generator=None, device="cpu", progress=False, clip_denoised=False):
        """DDIM (Song et al. 2021); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        for i in self._progress(range(self.num_timesteps)[::-1], progress):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                _, _, pred_xstart, _ = self.p_mean_variance_from_output(model_fn(x, t), x, t, clip_denoised)
            eps = self.predict_eps_from_xstart(x, t, pred_xstart)
            a_bar = _extract(self.alphas_cumprod, t, x.shape)
            a_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
            sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
            mean = pred_xstart * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma**2) * eps
            z = torch.randn(x.shape, generator=generator, device=x.device) if i > 0 else torch.zeros_like(x)
            x = mean + sigma * z
        return x

    @staticmethod
    def _progress(iterable, progress):
        if not progress:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, leave=False)


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """ADM's respacing: "250" or [10, 15, 20] evenly strided per section, or "ddim50" for DDIM's fixed stride; or
    "trailing4": T−1 − round(i·T/N) for i < N (Lin et al. 2024), whose first step is always the pure-noise end T−1
    (ADM's DDIM stride starts at T − T/N: from the sampler's pure noise that is far off for a few steps, and 1 step
    cannot be made at all)."""
    if isinstance(section_counts, str) and section_counts.startswith("trailing"):
        desired = int(section_counts[len("trailing"):])
        if not 0 < desired <= num_timesteps:
            raise ValueError(f"timestep_respacing: cannot take {desired} of {num_timesteps} steps")
        return {num_timesteps - 1 - round(i * num_timesteps / desired) for i in range(desired)}
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep_respacing: cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"timestep_respacing: cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the base timesteps; the model still sees the original indices."""

    def __init__(self, use_timesteps, betas, learn_sigma=True):
        base = GaussianDiffusion(betas, learn_sigma)
        self.timestep_map = []
        new_betas, last_alpha_cumprod = [], 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        self.original_num_steps = len(betas)
        super().__init__(np.array(new_betas), learn_sigma)

    def wrap_model(self, model_fn):
        timestep_map = torch.tensor(self.timestep_map)

        def wrapped(x, t, *args, **kwargs):
            return model_fn(x, timestep_map.to(t.device)[t], *args, **kwargs)

        return wrapped

    def p_sample_loop(self, model_fn, *args, **kwargs):
        return super().p_sample_loop(self.wrap_model(model_fn), *args, **kwargs)

    def ddim_sample_loop(self, model_fn, *args, **kwargs):
        return super().ddim_sample_loop(self.wrap_model(model_fn), *args, **kwargs)


def create_diffusion(
    timestep_respacing="",
    noise_schedule="linear",
    learn_sigma=True,
    diffusion_steps=1000,
):
    """DiT-compatible factory: create_diffusion(timestep_respacing="") is the 1000-step training diffusion."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing in (None, ""):
        return GaussianDiffusion(betas, learn_sigma)
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas, learn_sigma)


def cfg_model_fn(model, y, cfg_scale: float, null_class: int, guided_channels: int | None = None):
    """Classifier-free guidance around a DiT: ε = ε_u + s (ε_c - ε_u).

    s = 1 evaluates the conditional model once (no doubled batch). guided_channels=None guides every
    latent channel; guided_channels=3 reproduces DiT's guidance of only the first 3 of 4 channels.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    y_null = torch.full_like(y, null_class)

    def guided(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2)
        C = x.shape[1]
        g = C if guided_channels is None else guided_channels
        eps = cond[:, :C].clone()
        eps[:, :g] = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([eps, cond[:, C:]], dim=1)

    return guided
