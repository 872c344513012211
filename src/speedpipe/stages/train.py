"""Stage `train`: DiT on latents with a chosen timestep sampler and loss weighting (baseline, SpeeD, …).

Reads the latent store, writes {run_dir}/ckpt-{step:07d}.pt, log.csv and config.yaml. Resumes from the
newest checkpoint in run_dir. All per-step randomness (timesteps, label dropout, flips, noise) is drawn
for the global batch from generators whose state is checkpointed, and each rank takes its slice: the
run is bit-identical after a resume on CPU, and the same global batch gives the same loss curve on any
number of ranks.
"""
import copy
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from speedpipe.config import ConfigError, named_params, save_config, to_plain
from speedpipe.data.latents import LatentNormalization, NormalizedLatents
from speedpipe.data.order import EpochBatches, rank_slice
from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler, build_weighting
from speedpipe.distributed import setup_device, shutdown
from speedpipe.layout import Layout
from speedpipe.loop import Cadence, ResumableLoop
from speedpipe.models.dit import DiT_models, load_dit_state_dict

LOG_COLUMNS = ["step", "loss", "mse", "vlb", "steps_per_s", "images_per_s"]


def run_dir_for(cfg) -> Path:
    return Path(cfg.trainer.run_dir or Layout.of(cfg).train_dir(cfg.method, cfg.seed))


def build_model(cfg):
    m = cfg.model
    model = DiT_models[m.name](
        input_size=m.input_size,
        in_channels=m.in_channels,
        num_classes=m.num_classes,
        class_dropout_prob=m.class_dropout_prob,
        learn_sigma=cfg.diffusion.learn_sigma,
        fused_attn=m.fused_attn,
    )
    if m.init_from:
        load_dit_state_dict(model, m.init_from)
    return model


def open_training_data(cfg, model_cfg=None, latent_norm: dict | None = None) -> NormalizedLatents:
    """The latent dataset of cfg.data, checked against the model (cfg.model, or a teacher's model_cfg), normalised
    per data.latent_norm, or with a teacher checkpoint's `latent_norm` when given (sCD sees the teacher's data)."""
    m = model_cfg or cfg.model
    latent_shape = (m.in_channels, m.input_size, m.input_size)
    if cfg.data.source == "synthetic":
        from speedpipe.data.synthetic import SyntheticLatents

        dataset = SyntheticLatents(cfg.data.synthetic_size, latent_shape, m.num_classes)
        stats = {"channel_mean": dataset.latents.mean(dim=(0, 2, 3)).tolist(), "channel_std": dataset.latents.std(dim=(0, 2, 3)).tolist()}
    else:
        from speedpipe.data.latents import LatentStore
        from speedpipe.stages.encode import latents_dir_for

        dataset = LatentStore(latents_dir_for(cfg))
        if dataset.latent_shape != latent_shape or dataset.num_classes != m.num_classes:
            raise ConfigError(
                f"latent store {dataset.root} holds latents {dataset.latent_shape} with {dataset.num_classes} classes, but the "
                f"model expects {latent_shape} with {m.num_classes} (model.in_channels, model.input_size, model.num_classes)"
            )
        stats = dataset.manifest
    if latent_norm is not None:
        normalization = LatentNormalization.from_state(latent_norm, m.in_channels)
    elif cfg.data.latent_norm == "channel":
        normalization = LatentNormalization(stats["channel_mean"], stats["channel_std"])
    else:
        normalization = LatentNormalization.identity(m.in_channels)
    return NormalizedLatents(dataset, normalization)


def make_optimizer(model, optim_cfg, device):
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


class StepRandomness:
    """Draws everything random about one global batch; each rank slices out its own examples."""

    def __init__(self, seed, sampler, latent_shape, class_dropout_prob, random_flip, posterior_latents, device):
        self.batch_gen = torch.Generator().manual_seed(seed)  # timesteps, dropout, flips, posterior samples (CPU)
        self.noise_gen = torch.Generator(device).manual_seed(seed)  # ε (on the training device)
        self.sampler, self.latent_shape, self.device = sampler, latent_shape, device
        self.class_dropout_prob, self.random_flip = class_dropout_prob, random_flip
        self.posterior_latents = posterior_latents

    @property
    def generators(self):
        return {"batch_gen": self.batch_gen, "noise_gen": self.noise_gen}

    def draw(self, n: int):
        """(t, label-drop mask, flip mask, posterior ε or None, diffusion noise ε) for n examples."""
        t = self.sampler.sample(n, self.batch_gen)
        drop = torch.rand(n, generator=self.batch_gen) < self.class_dropout_prob
        flip = torch.rand(n, generator=self.batch_gen) < 0.5 if self.random_flip else torch.zeros(n, dtype=torch.bool)
        latent_eps = torch.randn((n, *self.latent_shape), generator=self.batch_gen) if self.posterior_latents else None
        noise = torch.randn((n, *self.latent_shape), generator=self.noise_gen, device=self.device)
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
    """One optimisation step of the hybrid loss; returns detached (loss, mse, vb) batch means."""
    terms = hybrid_loss(model, diffusion, mse_weight, x, y, t, noise, drop, precision)
    optimizer_step(opt, terms["loss"], model, grad_clip)
    return torch.stack([terms["loss"].detach(), terms["mse"], terms["vlb"]])


@torch.no_grad()
def update_ema(ema_params, model_params, decay: float):
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def run(cfg):
    tr = cfg.trainer
    device, env = setup_device(tr.device, "trainer.device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tr.tf32
        torch.backends.cudnn.allow_tf32 = tr.tf32
    if tr.global_batch_size % env.world_size:
        raise ConfigError(f"config key 'trainer.global_batch_size': {tr.global_batch_size} is not divisible by {env.world_size} ranks")
    run_dir = run_dir_for(cfg)
    torch.manual_seed(cfg.seed * env.world_size + env.rank)  # rank-local randomness only

    dataset = open_training_data(cfg)
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    diffusion = create_diffusion(
        noise_schedule=cfg.diffusion.noise_schedule, diffusion_steps=cfg.diffusion.diffusion_steps, learn_sigma=cfg.diffusion.learn_sigma
    )
    sampler = build_sampler(cfg.diffusion.timestep_sampler.name, diffusion, **named_params(cfg.diffusion.timestep_sampler))
    mse_weight = build_weighting(cfg.diffusion.loss_weighting.name, diffusion, **named_params(cfg.diffusion.loss_weighting)).to(device)
    opt = make_optimizer(model, cfg.optim, device)
    order = EpochBatches(len(dataset), tr.global_batch_size, cfg.seed)
    randomness = StepRandomness(
        cfg.seed, sampler, dataset.latent_shape, cfg.model.class_dropout_prob, cfg.data.random_flip,
        getattr(dataset, "samples_posterior", False), device,
    )

    model.train()
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if env.world_size > 1 else model
    if tr.compile:
        net = torch.compile(net)
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    loop = ResumableLoop(run_dir, Cadence(tr.steps, tr.log_every, tr.ckpt_every, tuple(tr.ckpt_steps), tr.resume_every_steps,
                                          tr.resume_every_minutes),
                         {"model": model, "ema": ema, "opt": opt, "data_order": order}, randomness.generators, env, LOG_COLUMNS,
                         progress=tr.progress, checkpoint_extra=lambda: {"config": to_plain(cfg),
                                                                         "latent_norm": dataset.normalization.state_dict()},
                         log_fields=lambda step, mean, steps_per_s: {"images_per_s": steps_per_s * tr.global_batch_size})
    loop.resume()
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
    mine = lambda v: None if v is None else rank_slice(v, env.rank, env.world_size)  # noqa: E731

    def forward(step):
        t, drop, flip, latent_eps, noise = randomness.draw(tr.global_batch_size)
        x, y = dataset.get_batch(mine(order.next_global_batch()), mine(flip), mine(latent_eps))
        x, y, t = x.to(device, non_blocking=True), y.to(device, non_blocking=True), mine(t).to(device)
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * min(1.0, step / cfg.optim.warmup_steps) if cfg.optim.warmup_steps else cfg.optim.lr
        return hybrid_loss(net, diffusion, mse_weight, x, y, t, mine(noise), mine(drop).to(device), tr.precision)

    def update(terms):
        optimizer_step(opt, terms["loss"], model, cfg.optim.grad_clip)
        update_ema(ema_params, model_params, tr.ema_decay)

    loop.run(forward, update)
    shutdown(env)
    return run_dir
