"""The pieces of a DiT training step (the train stage's loop, the distill stage's EMA and the benchmarks use them).

Everything random about a step is drawn for the global batch by `StepRandomness` from generators whose state is
checkpointed, so a resumed run draws as an uninterrupted one and each rank takes its slice of the same batch; each
random stream has a generator of its own (speedpipe.randomness).
"""
import torch

from speedpipe.randomness import random_stream


def make_optimizer(model, optim_cfg, device):
    """AdamW over the trainable parameters: fused on CUDA when optim.fused, foreach elsewhere."""
    fused = optim_cfg.fused and device.type == "cuda"
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        fused=fused or None,
        foreach=None if fused else optim_cfg.fused,
    )


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate at `step` (1-based): linear from 0 over warmup_steps, then lr (DiT: no warm-up)."""
    return lr * min(1.0, step / warmup_steps) if warmup_steps else lr


class StepRandomness:
    """Draws everything random about one global batch; each rank slices out its own examples."""

    def __init__(self, seed, sampler, latent_shape, class_dropout_prob, random_flip, posterior_latents, device):
        self.generators = {name: random_stream(seed, name) for name in ("timesteps", "dropout", "flips", "posterior")}
        self.generators["noise"] = random_stream(seed, "noise", device)  # ε, on the training device
        self.sampler, self.latent_shape, self.device = sampler, latent_shape, device
        self.class_dropout_prob, self.random_flip = class_dropout_prob, random_flip
        self.posterior_latents = posterior_latents

    def draw(self, n: int, step: int):
        """(t, label-drop mask, flip mask, posterior ε or None, diffusion noise ε) for n examples at training step `step`."""
        g = self.generators
        t = self.sampler.sample(n, g["timesteps"], step=step)
        drop = torch.rand(n, generator=g["dropout"]) < self.class_dropout_prob
        flip = torch.rand(n, generator=g["flips"]) < 0.5 if self.random_flip else torch.zeros(n, dtype=torch.bool)
        latent_eps = torch.randn((n, *self.latent_shape), generator=g["posterior"]) if self.posterior_latents else None
        noise = torch.randn((n, *self.latent_shape), generator=g["noise"], device=self.device)
        return t, drop, flip, latent_eps, noise


def hybrid_loss(model, diffusion, mse_weight, x, y, t, noise, drop, precision="fp32") -> dict:
    """The hybrid loss of one batch: its mean "loss" (to differentiate) and the detached mse and vlb means."""
    x_t = diffusion.q_sample(x, t, noise)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(x_t, t, y, force_drop_ids=drop.long())
    terms = diffusion.training_losses(out, x, x_t, t, noise, mse_weight)
    loss = terms["loss"].mean()
    return {"loss": loss, "mse": terms["mse"].mean().detach(), "vlb": terms["vb"].mean().detach()}


def optimizer_step(opt, loss, model, grad_clip=None):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def train_step(model, diffusion, mse_weight, opt, x, y, t, noise, drop, precision="fp32", grad_clip=None):
    """One optimisation step of the hybrid loss; returns detached (loss, mse, vb) batch means (the benchmarks' step)."""
    terms = hybrid_loss(model, diffusion, mse_weight, x, y, t, noise, drop, precision)
    optimizer_step(opt, terms["loss"], model, grad_clip)
    return torch.stack([terms["loss"].detach(), terms["mse"], terms["vlb"]])


@torch.no_grad()
def update_ema(ema_params, model_params, decay: float):
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
