"""Stage `train`: DiT on latents with a chosen timestep sampler and loss weighting (baseline, SpeeD, …).

Reads the latent store, writes {run_dir}/ckpt-{step:07d}.pt, log.csv and config.yaml. Resumes from the
newest checkpoint in run_dir. All per-step randomness (timesteps, label dropout, flips, noise) is drawn
for the global batch from one generator per stream whose state is checkpointed, and each rank takes its slice: the
run is bit-identical after a resume on CPU, and the same global batch gives the same loss curve on any
number of ranks.
"""
import copy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from speedpipe.config import named_params, save_config, to_plain
from speedpipe.errors import ConfigError
from speedpipe.data.latents import open_training_data
from speedpipe.data.order import EpochBatches, rank_slice
from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler, build_weighting
from speedpipe.distributed import setup_device, shutdown
from speedpipe.layout import train_run_dir
from speedpipe.loop import Cadence, ResumableLoop
from speedpipe.models.dit import build_model
from speedpipe.randomness import stream_seed
from speedpipe.stages import STAGES
from speedpipe.training import StepRandomness, hybrid_loss, make_optimizer, optimizer_step, update_ema, warmup_lr

LOG_COLUMNS = ["step", "loss", "mse", "vlb", "steps_per_s", "images_per_s"]


@STAGES["train"].entry
def run(cfg, provenance):
    tr = cfg.trainer
    device, env = setup_device(tr.device, "trainer.device")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tr.tf32
        torch.backends.cudnn.allow_tf32 = tr.tf32
    if tr.global_batch_size % env.world_size:
        raise ConfigError(f"config key 'trainer.global_batch_size': {tr.global_batch_size} is not divisible by {env.world_size} ranks")
    run_dir = train_run_dir(cfg)
    dataset = open_training_data(cfg)
    torch.manual_seed(stream_seed(cfg.seed, "init"))  # the initialisation: the same on every rank and any world size
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    diffusion = create_diffusion(
        noise_schedule=cfg.diffusion.noise_schedule, diffusion_steps=cfg.diffusion.diffusion_steps, learn_sigma=cfg.diffusion.learn_sigma
    )
    sampler = build_sampler(cfg.diffusion.timestep_sampler.name, diffusion, **named_params(cfg.diffusion.timestep_sampler))
    mse_weight = build_weighting(cfg.diffusion.loss_weighting.name, diffusion, **named_params(cfg.diffusion.loss_weighting)).to(device)
    opt = make_optimizer(model, cfg.optim, device)
    order = EpochBatches(len(dataset), tr.global_batch_size, cfg.seed, key="trainer.global_batch_size")
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
                         progress=tr.progress, settings={**STAGES["train"].run_settings(provenance), "data": dataset.identity()},
                         checkpoint_extra=lambda: {"config": to_plain(provenance),
                                                                         "latent_norm": dataset.normalization.state_dict()},
                         log_fields=lambda step, mean, steps_per_s: {"images_per_s": steps_per_s * tr.global_batch_size})
    loop.resume()
    if env.is_main:
        save_config(provenance, loop.state_dir / "config.yaml")
    mine = lambda v: None if v is None else rank_slice(v, env.rank, env.world_size)  # noqa: E731

    def forward(step):
        t, drop, flip, latent_eps, noise = randomness.draw(tr.global_batch_size, step)
        x, y = dataset.get_batch(mine(order.next_global_batch()), mine(flip), mine(latent_eps))
        x, y, t = x.to(device, non_blocking=True), y.to(device, non_blocking=True), mine(t).to(device)
        for group in opt.param_groups:
            group["lr"] = warmup_lr(cfg.optim.lr, cfg.optim.warmup_steps, step)
        return hybrid_loss(net, diffusion, mse_weight, x, y, t, mine(noise), mine(drop).to(device), tr.precision)

    def update(terms):
        optimizer_step(opt, terms["loss"], model, cfg.optim.grad_clip)
        update_ema(ema_params, model_params, tr.ema_decay)

    loop.run(forward, update)
    shutdown(env)
    return run_dir
