"""Stage `sample`: N images from a checkpoint, written in the ADM layout (arr_0 uint8 NHWC, arr_1 labels).

Labels are class-balanced (or uniform random, from the seed's "labels" stream) and every batch b draws its noise
from the seed's stream "noise:{b}" (speedpipe.randomness), so the same config gives the same images on any number
of ranks: ranks take batches round-robin, write their part, and rank 0 assembles `{sampler}.npz`, a grid PNG with one row per class
(the first 10 classes, 10 samples each) and a JSON sidecar with the NFE per image and the wall-clock seconds.
Generated latents are mapped back through the checkpoint's latent normalisation before decoding.
"""
import json
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from speedpipe.checkpoint import load_checkpoint
from speedpipe.config import save_config
from speedpipe.errors import ConfigError
from speedpipe.data.images import to_uint8
from speedpipe.data.latents import LatentNormalization
from speedpipe.data.samples import write_npz
from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.gaussian import cfg_model_fn
from speedpipe.distributed import barrier, setup_device, shutdown
from speedpipe.io import atomic_path, atomic_write_text, state_fingerprint
from speedpipe.layout import samples_path
from speedpipe.models.autoencoder import decode_latents, open_autoencoder
from speedpipe.models.dit import build_model
from speedpipe.randomness import random_stream
from speedpipe.runstore import KeptFiles
from speedpipe.sampler_labels import SamplerLabel, parse_sampler
from speedpipe.stages import STAGES


def make_labels(n: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    if mode == "balanced":
        return torch.arange(n) % num_classes
    return torch.randint(0, num_classes, (n,), generator=random_stream(seed, "labels"))


def batch_noise(seed: int, batch: int, device="cpu") -> torch.Generator:
    """The generator of batch `batch`'s noise: the same whichever rank samples the batch."""
    return random_stream(seed, f"noise:{batch}", device)


def class_grid(images: np.ndarray, labels: np.ndarray, rows: int = 10, cols: int = 10) -> np.ndarray:
    """uint8 HWC grid: row r holds the first `cols` samples generated for class r (black where there are fewer)."""
    h, w, c = images.shape[1:]
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for r in range(rows):
        for j, i in enumerate(np.flatnonzero(labels == r)[:cols]):
            grid[r * h : (r + 1) * h, j * w : (j + 1) * w] = images[i]
    return grid


def write_png(path, array: np.ndarray):
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="png")


class DiffusionSampler:
    """DDPM (ancestral, ADM's even respacing, as DiT) or DDIM (trailing respacing: every step count, 1 included,
    starts at the pure-noise end) over a respaced diffusion, with classifier-free guidance."""

    def __init__(self, model, run_cfg, sampling_cfg, label: SamplerLabel):
        kind, steps = label.family, label.steps
        self.model, self.kind, self.s = model, kind, sampling_cfg
        self.diffusion = create_diffusion(str(steps) if kind == "ddpm" else f"trailing{steps}", run_cfg.diffusion.noise_schedule,
                                          run_cfg.diffusion.learn_sigma, run_cfg.diffusion.diffusion_steps)
        self.latent_shape = (run_cfg.model.in_channels, run_cfg.model.input_size, run_cfg.model.input_size)
        if sampling_cfg.cfg_scale != 1.0 and model.y_embedder.dropout_prob == 0:
            raise ConfigError("config key 'sampling.cfg_scale': guidance needs a model trained with class dropout (null class)")
        self.nfe = self.diffusion.num_timesteps * (1 if sampling_cfg.cfg_scale == 1.0 else 2)

    def __call__(self, labels, generator):
        s = self.s
        model_fn = cfg_model_fn(self.model, labels, s.cfg_scale, null_class=self.model.num_classes,
                                guided_channels=3 if s.dit_compat else None)
        device = labels.device

        def autocast_fn(x, t):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16"):
                return model_fn(x, t).float()

        shape = (len(labels), *self.latent_shape)
        noise = torch.randn(shape, generator=generator, device=device)
        if self.kind == "ddpm":
            return self.diffusion.p_sample_loop(autocast_fn, shape, noise=noise, generator=generator)
        return self.diffusion.ddim_sample_loop(autocast_fn, shape, eta=s.ddim_eta, noise=noise, generator=generator)


class UnderAutocast:
    """A consistency sampler whose student runs under bf16 autocast when sampling.precision is bf16 (the diffusion
    samplers autocast each network call themselves); its model, latent_shape and nfe are the sampler's."""

    def __init__(self, sampler, precision: str, device):
        self.sampler, self.enabled, self.device = sampler, precision == "bf16", device
        self.model, self.latent_shape, self.nfe = sampler.model, sampler.latent_shape, sampler.nfe

    def __call__(self, labels, generator):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.enabled):
            return self.sampler(labels, generator).float()


def build_sampler_for(state, cfg, device):
    """The latent sampler for a checkpoint: diffusion samplers for train runs, the sampler its method gives for the
    consistency students of distill runs."""
    label = parse_sampler(cfg.sampling.sampler)
    is_student = "teacher_config" in state
    if label.consistency != is_student:
        raise ConfigError(f"config key 'sampling.sampler': {label.name} samples a "
                          f"{'distill' if label.consistency else 'train'} checkpoint, {cfg.sampling.checkpoint} is a "
                          f"{'distill' if is_student else 'train'} checkpoint")
    if label.consistency:
        from speedpipe.consistency.methods import consistency_method, student_from_checkpoint

        m = state["teacher_config"]["model"]
        student = student_from_checkpoint(state, cfg.sampling.use_ema).to(device)
        method = consistency_method(state["config"]["distill"].get("method", "scd"))
        return UnderAutocast(method.make_sampler(student, (m["in_channels"], m["input_size"], m["input_size"]), label.steps,
                                                 cfg.sampling.scm_mid_t), cfg.sampling.precision, device)
    run_cfg = OmegaConf.create(state["config"])
    model = build_model(run_cfg, initialise=False)
    model.load_state_dict(state["ema" if cfg.sampling.use_ema else "model"])
    return DiffusionSampler(model.to(device).eval(), run_cfg, cfg.sampling, label)


@torch.no_grad()
@STAGES["sample"].entry
def run(cfg, provenance):
    s = cfg.sampling
    if not s.checkpoint:
        raise ConfigError("config key 'sampling.checkpoint': required (a ckpt-*.pt of a train or distill run)")
    device, env = setup_device(s.device, "sampling.device")
    out = samples_path(cfg)
    state = load_checkpoint(s.checkpoint)
    vae, scale, decoder = open_autoencoder(cfg)
    # a sampling job samples several checkpoints: each one's finished files are kept where a failed job's cleanup does
    # not reach, and a re-run of the job restores them instead of sampling again (same settings, model and decoder)
    kept = KeptFiles([out.with_suffix(ext) for ext in (".npz", ".png", ".json", ".yaml")],
                     {**STAGES["sample"].run_settings(provenance), "checkpoint": state_fingerprint(state), "decoder": decoder})
    if kept.complete():
        if env.is_main:
            kept.restore()
            print(f"speedpipe: {out} restored from {kept.dir} (sampled by an earlier run of this job)", flush=True)
        shutdown(env)
        return out
    sampler = build_sampler_for(state, cfg, device)
    normalization = LatentNormalization.from_state(state.get("latent_norm"), sampler.latent_shape[0])
    vae = vae.to(device)
    labels = make_labels(s.num_samples, sampler.model.num_classes, s.labels, s.seed)
    batches = [range(b, min(b + s.batch_size, s.num_samples)) for b in range(0, s.num_samples, s.batch_size)]

    from tqdm.auto import tqdm

    start = time.perf_counter()
    parts = []
    for b in tqdm(range(env.rank, len(batches), env.world_size), desc="sample", disable=not (s.progress and env.is_main)):
        generator = batch_noise(s.seed, b, device)
        y = labels[batches[b].start : batches[b].stop].to(device)
        z = normalization.denormalize(sampler(y, generator))
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError(f"sample: non-finite latents from {s.checkpoint} (training step {state['step']}) with "
                                     f"sampler {s.sampler} (cfg {s.cfg_scale}) in batch {b}; nothing was written")
        parts.append((b, to_uint8(decode_latents(vae, z, scale)).numpy(), y.cpu().numpy()))
    seconds = time.perf_counter() - start

    if env.world_size > 1:  # each rank writes its batches; rank 0 assembles them in batch order
        part_file = out.parent / f".part-{out.stem}-rank{env.rank}.npz"
        if parts:
            write_npz(part_file, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
        else:  # fewer batches than ranks: this rank sampled none
            write_npz(part_file, np.zeros((0,), np.uint8), np.zeros((0,), np.int64))
        barrier(env)
        if env.is_main:
            parts = []
            for r in range(env.world_size):
                with np.load(out.parent / f".part-{out.stem}-rank{r}.npz", allow_pickle=False) as part:
                    mine = range(r, len(batches), env.world_size)
                    bounds = np.cumsum([0] + [len(batches[b]) for b in mine])
                    parts += [(b, part["arr_0"][lo:hi], part["arr_1"][lo:hi]) for b, lo, hi in zip(mine, bounds[:-1], bounds[1:])]
        barrier(env)
        part_file.unlink()
    if env.is_main:
        parts.sort(key=lambda p: p[0])
        images = np.concatenate([p[1] for p in parts])
        labels_out = np.concatenate([p[2] for p in parts])
        write_npz(out, images, labels_out)
        write_png(out.with_suffix(".png"), class_grid(images, labels_out, rows=min(10, sampler.model.num_classes)))
        info = {
            "checkpoint": str(s.checkpoint), "step": int(state["step"]), "sampler": s.sampler, "num_samples": s.num_samples,
            "nfe_per_image": sampler.nfe, "cfg_scale": s.cfg_scale, "seed": s.seed, "world_size": env.world_size,
            "seconds": seconds, "seconds_per_image": seconds * env.world_size / s.num_samples, "device": str(device),
        }
        atomic_write_text(out.with_suffix(".json"), json.dumps(info, indent=2))
        save_config(provenance, out.with_suffix(".yaml"))
        kept.keep()
    shutdown(env)
    return out
