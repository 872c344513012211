"""Stage `distill`: sCD of a trained DiT teacher into a 1-2 step consistency model.

Reads the teacher checkpoint (EMA weights) and the latent store; writes {run_dir}/ckpt-{step:07d}.pt
(student, student EMA, logvar head, optimizer, RNG, data order, the teacher's config), log.csv and
config.yaml. Resumable and bit-identical on CPU, DDP over the global batch like the train stage.
"""
import copy
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from speedpipe.checkpoint import latest_checkpoint, load_checkpoint, resume_from_latest, rng_state, save_checkpoint
from speedpipe.config import ConfigError, save_config, to_plain
from speedpipe.consistency.scd import LogvarHead, make_student, sample_time, scd_terms
from speedpipe.consistency.trigflow import TrigFlowTeacher
from speedpipe.csvlog import CsvLog
from speedpipe.data.order import EpochBatches, rank_slice
from speedpipe.diffusion import create_diffusion
from speedpipe.distributed import all_reduce_mean, barrier, setup_device, shutdown
from speedpipe.stages.train import build_model, open_training_data, update_ema

LOG_COLUMNS = ["step", "loss", "mse", "tangent_norm", "logvar", "skipped", "steps_per_s"]


def run_dir_for(cfg) -> Path:
    if cfg.distill.run_dir:
        return Path(cfg.distill.run_dir)
    return Path(cfg.output_dir) / cfg.experiment / "distill" / Path(cfg.distill.teacher).parent.name


class _StudentWithHead(torch.nn.Module):
    """Everything that is trained, with the sCD terms as its forward, so DDP all-reduces every gradient."""

    def __init__(self, student, logvar_head):
        super().__init__()
        self.student, self.logvar_head = student, logvar_head

    def forward(self, teacher, x0, z, t, y, r, c, precision):
        return scd_terms(self.student, teacher, self.logvar_head, x0, z, t, y, r, c, precision)


def run(cfg):
    d = cfg.distill
    if not d.teacher:
        raise ConfigError("config key 'distill.teacher': required (a ckpt-*.pt of a train run)")
    device, env = setup_device(d.device, "distill.device")
    if d.global_batch_size % env.world_size:
        raise ConfigError(f"config key 'distill.global_batch_size': {d.global_batch_size} is not divisible by {env.world_size} ranks")
    run_dir = run_dir_for(cfg)
    torch.manual_seed(cfg.seed * env.world_size + env.rank)

    teacher_state = load_checkpoint(d.teacher)
    teacher_cfg = OmegaConf.create(teacher_state["config"])
    net = build_model(teacher_cfg)
    net.load_state_dict(teacher_state["ema"])
    diffusion = create_diffusion(noise_schedule=teacher_cfg.diffusion.noise_schedule,
                                 diffusion_steps=teacher_cfg.diffusion.diffusion_steps)
    teacher = TrigFlowTeacher.over_latents(net.to(device).eval().requires_grad_(False), diffusion.alphas_cumprod, d.sigma_d,
                                           d.cfg_scale)
    student = make_student(teacher).requires_grad_(True)
    student.net.pos_embed.requires_grad_(False)
    trained = _StudentWithHead(student, LogvarHead()).to(device)
    ema = copy.deepcopy(student.net).requires_grad_(False)
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=d.lr, betas=tuple(d.betas))

    dataset = open_training_data(cfg, teacher_cfg.model)
    order = EpochBatches(len(dataset), d.global_batch_size, cfg.seed)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    generators = {"batch_gen": batch_gen}
    step, skipped = 0, 0
    state = resume_from_latest(run_dir, {"model": student.net, "logvar_head": trained.logvar_head, "ema": ema, "opt": opt},
                               generators)
    if state is not None:
        order = EpochBatches(len(dataset), d.global_batch_size, cfg.seed, **state["data_order"])
        step, skipped = state["step"], state["skipped"]
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log = CsvLog(run_dir / "log.csv", LOG_COLUMNS, resume_step=step)
    net_ddp = DDP(trained, device_ids=[device.index] if device.type == "cuda" else None) if env.world_size > 1 else trained
    model_params, ema_params = list(student.net.parameters()), list(ema.parameters())

    from tqdm.auto import tqdm

    progress = tqdm(total=d.steps, initial=step, disable=not (d.progress and env.is_main), desc="distill", dynamic_ncols=True)
    sums, count, last_time = torch.zeros(4, dtype=torch.float64, device=device), 0, time.perf_counter()
    while step < d.steps:
        n = d.global_batch_size
        idx = order.next_global_batch()
        t = sample_time(n, d.sigma_d, d.p_mean, d.p_std, generator=batch_gen)
        flip = torch.rand(n, generator=batch_gen) < 0.5 if cfg.data.random_flip else torch.zeros(n, dtype=torch.bool)
        z = d.sigma_d * torch.randn((n, *dataset.latent_shape), generator=batch_gen)
        eps = torch.randn((n, *dataset.latent_shape), generator=batch_gen) if getattr(dataset, "samples_posterior", False) else None
        mine = lambda v: None if v is None else rank_slice(v, env.rank, env.world_size)  # noqa: E731
        latents, y = dataset.get_batch(mine(idx), mine(flip), mine(eps))
        x0 = teacher.latent_scale * latents
        r = min(1.0, (step + 1) / d.tangent_warmup)
        terms = net_ddp(teacher, x0.to(device), mine(z).to(device), mine(t).to(device), y.to(device), r, d.tangent_c, d.precision)
        finite = all_reduce_mean(torch.stack([torch.isfinite(terms["g"]).all(), torch.isfinite(terms["loss"])]).double(), env)
        step += 1
        if not bool((finite == 1).all()):
            quantity = "tangent g" if finite[0] < 1 else "loss"
            if not d.skip_nonfinite:
                raise FloatingPointError(f"distill: non-finite {quantity} at step {step}; stopped without saving "
                                         f"(last good checkpoint: {latest_checkpoint(run_dir) or 'none'})")
            skipped += 1
        else:
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            update_ema(ema_params, model_params, d.ema_decay)
            sums += torch.stack([terms[k].detach().double() for k in ("loss", "mse", "tangent_norm", "logvar")])
            count += 1
        progress.update(1)
        at_ckpt = step % d.ckpt_every == 0 or step == d.steps
        if (step % d.log_every == 0 or at_ckpt) and count:
            mean = all_reduce_mean(sums / count, env).tolist()
            now = time.perf_counter()
            if env.is_main:
                log.write(step=step, loss=mean[0], mse=mean[1], tangent_norm=mean[2], logvar=mean[3], skipped=skipped,
                          steps_per_s=count / (now - last_time))
                progress.set_postfix(loss=f"{mean[0]:.4f}")
            sums.zero_()
            count, last_time = 0, now
        if at_ckpt and env.is_main:
            save_checkpoint({"model": student.net.state_dict(), "logvar_head": trained.logvar_head.state_dict(),
                             "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step, "skipped": skipped,
                             "rng": rng_state(generators), "data_order": order.state_dict(), "config": to_plain(cfg),
                             "teacher_config": teacher_state["config"]}, run_dir, step)
        if at_ckpt:
            barrier(env)
    progress.close()
    shutdown(env)
    return run_dir
