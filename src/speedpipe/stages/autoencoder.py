"""Stage `autoencoder`: train the tiny AutoencoderKL on the dataset (demo); pretrained VAEs skip this stage.

Writes {output_dir}/{experiment}/autoencoder/: model.safetensors (weights + config + measured latent
scale factor), metrics.json (held-out PSNR), recon.png (held-out originals over reconstructions),
log.csv and resumable ckpt-*.pt (speedpipe.loop). Loss: MSE + L1 reconstruction + kl_weight · KL. Images are read
batch by batch (memory independent of the dataset size); unreadable files are skipped and counted in metrics.json.
"""
import json
import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torchvision.utils import save_image

from speedpipe.config import save_config
from speedpipe.errors import ConfigError
from speedpipe.data.images import BatchReader, held_out, open_image_dataset
from speedpipe.data.order import EpochBatches
from speedpipe.distributed import DistEnv
from speedpipe.io import atomic_path, atomic_write_text
from speedpipe.layout import Layout
from speedpipe.loop import Cadence, ResumableLoop
from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config
from speedpipe.stages import STAGES


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error between images in [-1, 1] (peak-to-peak 2)."""
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item()


@torch.no_grad()
def measure_scale_factor(vae, batches) -> float:
    """1 / std of the latent posterior samples, so that scaled latents have unit variance (as 0.18215 for SD). The
    moments are accumulated batch by batch in float64: memory does not grow with the dataset."""
    g = torch.Generator().manual_seed(0)
    count, total, squares = 0, 0.0, 0.0
    for x, _ in batches:
        z = vae.encode(x).latent_dist.sample(generator=g).double()
        count, total, squares = count + z.numel(), total + z.sum().item(), squares + (z * z).sum().item()
    mean = total / count
    return 1.0 / math.sqrt((squares / count - mean * mean) * count / (count - 1))


@STAGES["autoencoder"].entry
def run(cfg, provenance):
    ae = cfg.autoencoder
    if ae.name != "tiny":
        raise ConfigError(f"config key 'autoencoder.name': the autoencoder stage trains only 'tiny', not {ae.name!r}")
    out = Layout.of(cfg).autoencoder_dir()
    torch.manual_seed(cfg.seed)
    dataset = open_image_dataset(cfg.data)
    read = BatchReader(dataset)
    train_idx, test_idx = (torch.tensor(ix) for ix in held_out(len(dataset)))

    vae = AutoencoderKL(**tiny_autoencoder_config(ae.block_out_channels, ae.latent_channels)).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=ae.lr, weight_decay=0.0)
    order = EpochBatches(len(train_idx), ae.batch_size, cfg.seed, key="autoencoder.batch_size")
    sample_gen = torch.Generator().manual_seed(cfg.seed)
    loop = ResumableLoop(out, Cadence(ae.steps, ae.log_every, ae.ckpt_every, (), ae.resume_every_steps, ae.resume_every_minutes),
                         {"model": vae, "opt": opt, "data_order": order}, {"sample_gen": sample_gen}, DistEnv(),
                         ["step", "loss", "rec", "kl", "steps_per_s"], what="autoencoder", progress=ae.progress,
                         settings={**STAGES["autoencoder"].run_settings(provenance), "data": dataset.fingerprint()})
    loop.resume()
    save_config(provenance, out / "config.yaml")

    def forward(step):
        x, _ = read(train_idx[order.next_global_batch()])
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
    scale = measure_scale_factor(vae, read.batches(train_idx, 256))
    squared_error, values, images = 0.0, 0, 0
    with torch.no_grad():
        for x, _ in read.batches(test_idx, 256):
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            squared_error += F.mse_loss(recon, x, reduction="sum").item()
            values, images = values + x.numel(), images + len(x)
        shown, _ = read(test_idx[torch.linspace(0, len(test_idx) - 1, 16).long()])  # spread over the (class-sorted) held-out set
        recon = vae.decode(vae.encode(shown).latent_dist.mean).sample.clamp(-1, 1)
    metrics = {"psnr_heldout_db": psnr(squared_error / values), "heldout_images": images,
               "skipped_images": len(read.skipped), "scale_factor": scale, "steps": loop.step}
    with atomic_path(out / "recon.png") as tmp:
        save_image(torch.cat([shown, recon]) * 0.5 + 0.5, tmp, nrow=len(shown), format="png")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    save_tiny_autoencoder(vae, scale, out / "model.safetensors", {"dataset": dataset.fingerprint()})
    return out
