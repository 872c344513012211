"""A real user's inputs, made by the tests (nothing is downloaded): photos, a pretrained-format VAE folder, Inception-v3
weights in torch-fidelity's format and an ADM reference batch.

- photos: JPEG and PNG of odd sizes and aspect ratios, greyscale, RGBA, palette and CMYK among them, one file that is
  not an image; a flat folder (FFHQ-like, one class) or one folder per class (ImageNet-like).
- an AutoencoderKL folder in diffusers' layout (save_pretrained): sd-vae-ft-ema's architecture, in full or with narrow
  channels (the same 8x downsampling and 4 latent channels) to keep the CPU time of a pipeline run low.
- Inception-v3 (torch-fidelity's FeatureExtractorInceptionV3) with random weights whose batch-norm statistics are
  calibrated on the photos and whose logits are scaled to unit spread, so that its features neither vanish (random
  convolutions alone shrink them by ~1e-8) nor saturate.
- an ADM reference batch (mu, sigma of the 2048-d pool features, and arr_0 images) as guided-diffusion's evaluator
  writes it.
"""
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image, ImageDraw

SD_VAE_FT_EMA = dict(  # stabilityai/sd-vae-ft-ema's config.json (architecture keys)
    in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
NARROW = {**SD_VAE_FT_EMA, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
MODES = ["RGB", "L", "RGBA", "P", "CMYK"]  # colour, greyscale, with alpha, palette, CMYK (JPEG only)


def photo(rng, size, label: int) -> Image.Image:
    """A picture with structure (a gradient sky, shapes), its hue set by the label so classes differ."""
    w, h = size
    base = np.array([[40, 90, 160], [160, 80, 40], [60, 150, 70], [150, 150, 60]][label % 4])
    gradient = np.linspace(0.4, 1.2, h)[:, None, None] * base[None, None, :]
    array = np.clip(gradient + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = x0 + int(rng.integers(4, max(5, w // 2))), y0 + int(rng.integers(4, max(5, h // 2)))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_photos(folder: Path, count: int, classes: list[str] | None = None, seed: int = 0) -> Path:
    """count photos under folder (flat, or one sub-folder per class name), plus one unreadable file; returns folder."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % len(classes) if classes else 0
        size = (int(rng.integers(48, 400)), int(rng.integers(48, 400)))  # odd sizes and aspect ratios, some below 64
        mode = MODES[i % len(MODES)]
        image = photo(rng, size, label).convert(mode)
        suffix = ".jpg" if mode in ("CMYK", "L") or i % 3 == 0 else ".png"
        if mode == "RGBA":
            suffix = ".png"
        if mode == "P":
            image.info["transparency"] = 0
            suffix = ".png"
        target = folder / (classes[label] if classes else "") / f"img_{i:04d}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, quality=90) if suffix == ".jpg" else image.save(target)
    broken = folder / (classes[0] if classes else "") / "broken_download.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")  # cut off mid-header
    return folder


def write_pretrained_vae(folder: Path, config: dict = NARROW, seed: int = 0) -> Path:
    """A random-weight AutoencoderKL saved as diffusers saves sd-vae-ft-ema (config.json + safetensors)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**config).save_pretrained(folder)
    return folder


def _inception_without_weights():
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None):
        return fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])


def write_inception_weights(path: Path, photos: list[Path], seed: int = 0) -> Path:
    """A torch-fidelity Inception-v3 state dict with random weights, calibrated on the photos (see the module docstring)."""
    torch.manual_seed(seed)
    net = _inception_without_weights()
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((128, 128)))).permute(2, 0, 1)
                          for p in photos])
    batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in batch_norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batch
    with torch.no_grad():
        net.train()
        net(images)
        net.eval()
        pool, logits = net(images)
        net.fc.weight.mul_(1.0 / logits.std().item())
    torch.save(net.state_dict(), path)
    return path


def write_adm_batch(path: Path, inception: Path, images: np.ndarray) -> Path:
    """An ADM reference batch of uint8 NHWC images: their Inception pool features' mu and sigma, and the images."""
    from speedpipe.fidelity import UInt8Images, stream_features

    features = stream_features(UInt8Images(images), "inception-v3-compat", inception, ["fid"])[0]["2048"].double().numpy()
    np.savez(path, arr_0=images, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    return path


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png") and "broken" not in p.name)
