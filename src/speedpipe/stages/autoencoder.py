"""Stage `autoencoder`: train the tiny AutoencoderKL on the dataset (demo); pretrained VAEs skip this stage.

Writes {output_dir}/{experiment}/autoencoder/: model.safetensors (weights + config + measured latent
scale factor), metrics.json (held-out PSNR), recon.png (held-out originals over reconstructions),
log.csv and resumable ckpt-*.pt. Loss: MSE + L1 reconstruction + kl_weight · KL.
"""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torchvision.utils import save_image

from speedpipe.checkpoint import latest_checkpoint, resume_from_latest, rng_state, save_checkpoint
from speedpipe.config import ConfigError, save_config
from speedpipe.csvlog import CsvLog
from speedpipe.data.images import held_out, open_image_dataset
from speedpipe.data.order import EpochBatches
from speedpipe.io import atomic_path, atomic_write_text
from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config


def out_dir_for(cfg) -> Path:
    return Path(cfg.output_dir) / cfg.experiment / "autoencoder"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a, b).item()
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item()


@torch.no_grad()
def measure_scale_factor(vae, images, batch_size=256) -> float:
    """1 / std of the latent posterior samples, so that scaled latents have unit variance (as 0.18215 for SD)."""
    g = torch.Generator().manual_seed(0)
    samples = [vae.encode(images[i : i + batch_size]).latent_dist.sample(generator=g) for i in range(0, len(images), batch_size)]
    return 1.0 / torch.cat(samples).std().item()


def run(cfg):
    ae = cfg.autoencoder
    if ae.name != "tiny":
        raise ConfigError(f"config key 'autoencoder.name': the autoencoder stage trains only 'tiny', not {ae.name!r}")
    out = out_dir_for(cfg)
    torch.manual_seed(cfg.seed)
    dataset = open_image_dataset(cfg.data)
    train_idx, test_idx = held_out(len(dataset))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    train_images, test_images = images[train_idx], images[test_idx]

    vae = AutoencoderKL(**tiny_autoencoder_config(ae.block_out_channels, ae.latent_channels)).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=ae.lr, weight_decay=0.0)
    order = EpochBatches(len(train_images), ae.batch_size, cfg.seed)
    sample_gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    state = resume_from_latest(out, {"model": vae, "opt": opt}, {"sample_gen": sample_gen})
    if state is not None:
        order = EpochBatches(len(train_images), ae.batch_size, cfg.seed, **state["data_order"])
        step = state["step"]
    save_config(cfg, out / "config.yaml")
    log = CsvLog(out / "log.csv", ["step", "loss", "rec", "kl", "steps_per_s"], resume_step=step)

    from tqdm.auto import tqdm

    progress = tqdm(total=ae.steps, initial=step, disable=not ae.progress, desc="autoencoder", dynamic_ncols=True)
    last_time = time.perf_counter()
    while step < ae.steps:
        x = train_images[order.next_global_batch()]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=sample_gen)).sample
        rec_loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        kl = posterior.kl().mean()
        loss = rec_loss + ae.kl_weight * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"autoencoder: non-finite loss at step {step + 1}; last good checkpoint {latest_checkpoint(out)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        progress.update(1)
        if step % 50 == 0 or step == ae.steps:
            now = time.perf_counter()
            log.write(step=step, loss=loss.item(), rec=rec_loss.item(), kl=kl.item(), steps_per_s=50 / (now - last_time))
            last_time = now
            progress.set_postfix(rec=f"{rec_loss.item():.4f}")
        if step % ae.ckpt_every == 0 or step == ae.steps:
            save_checkpoint({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                             "rng": rng_state({"sample_gen": sample_gen}), "data_order": order.state_dict()}, out, step)
    progress.close()

    vae.eval()
    scale = measure_scale_factor(vae, train_images)
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(test_images[i : i + 256]).latent_dist.mean).sample.clamp(-1, 1)
                           for i in range(0, len(test_images), 256)])
    metrics = {"psnr_heldout_db": psnr(recon, test_images), "heldout_images": len(test_images), "scale_factor": scale, "steps": step}
    with atomic_path(out / "recon.png") as tmp:
        shown = torch.linspace(0, len(test_images) - 1, 16).long()  # spread over the (class-sorted) held-out set
        save_image(torch.cat([test_images[shown], recon[shown]]) * 0.5 + 0.5, tmp, nrow=16, format="png")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    save_tiny_autoencoder(vae, scale, out / "model.safetensors", {"dataset": dataset.fingerprint()})
    return out
