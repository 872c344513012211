"""Stage `autoencoder`: train the tiny AutoencoderKL on the dataset (demo); pretrained VAEs skip this stage.

Writes {output_dir}/{experiment}/autoencoder/: model.safetensors (weights + config + measured latent
scale factor), metrics.json (held-out PSNR), recon.png (held-out originals over reconstructions),
log.csv and resumable ckpt-*.pt (speedpipe.loop). Loss: MSE + L1 reconstruction + kl_weight · KL.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torchvision.utils import save_image

from speedpipe.config import ConfigError, save_config
from speedpipe.distributed import DistEnv
from speedpipe.loop import Cadence, ResumableLoop
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
    loop = ResumableLoop(out, Cadence(ae.steps, ae.log_every, ae.ckpt_every, (), ae.resume_every_steps, ae.resume_every_minutes),
                         {"model": vae, "opt": opt, "data_order": order}, {"sample_gen": sample_gen}, DistEnv(),
                         ["step", "loss", "rec", "kl", "steps_per_s"], what="autoencoder", progress=ae.progress)
    loop.resume()
    save_config(cfg, out / "config.yaml")

    def forward(step):
        x = train_images[order.next_global_batch()]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=sample_gen)).sample
        rec_loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        kl = posterior.kl().mean()
        return {"loss": rec_loss + ae.kl_weight * kl, "rec": rec_loss.detach(), "kl": kl.detach()}

    def update(terms):
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()

    loop.run(forward, update)

    vae.eval()
    scale = measure_scale_factor(vae, train_images)
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(test_images[i : i + 256]).latent_dist.mean).sample.clamp(-1, 1)
                           for i in range(0, len(test_images), 256)])
    metrics = {"psnr_heldout_db": psnr(recon, test_images), "heldout_images": len(test_images), "scale_factor": scale, "steps": loop.step}
    with atomic_path(out / "recon.png") as tmp:
        shown = torch.linspace(0, len(test_images) - 1, 16).long()  # spread over the (class-sorted) held-out set
        save_image(torch.cat([test_images[shown], recon[shown]]) * 0.5 + 0.5, tmp, nrow=16, format="png")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    save_tiny_autoencoder(vae, scale, out / "model.safetensors", {"dataset": dataset.fingerprint()})
    return out
