"""Autoencoders for latent diffusion: diffusers AutoencoderKL, pretrained (SD-VAE) or tiny and pipeline-trained.

Latents are stored scaled: z = scale_factor · sample (0.18215 for the SD VAEs; measured as 1/std of the
latents for the tiny one), and decoded as vae.decode(z / scale_factor).
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file

from speedpipe.io import atomic_path, sha256_tree
from speedpipe.layout import tiny_autoencoder_weights

SD_VAE_SCALE = 0.18215


class AutoencoderError(ValueError):
    """Missing or unusable autoencoder weights; the message says where they should be."""


def tiny_autoencoder_config(block_out_channels, latent_channels, image_channels=3) -> dict:
    n = len(block_out_channels)
    return dict(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(16, min(block_out_channels)),
    )


def save_tiny_autoencoder(vae: AutoencoderKL, scale_factor: float, path, extra: dict | None = None):
    """One safetensors file: weights, with the AutoencoderKL config and the latent scale factor as metadata."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    metadata = {"config": json.dumps(config), "scale_factor": repr(float(scale_factor)), **(extra or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp), metadata=metadata)


def load_tiny_autoencoder(path) -> tuple[AutoencoderKL, float]:
    path = Path(path)
    if not path.is_file():
        raise AutoencoderError(f"tiny autoencoder weights not found: {path} (run the autoencoder stage first)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    vae = AutoencoderKL(**json.loads(meta["config"]))
    vae.load_state_dict(state)
    return vae.eval(), float(meta["scale_factor"])


def load_pretrained_autoencoder(name_or_path: str, allow_download: bool = False) -> AutoencoderKL:
    """AutoencoderKL.from_pretrained from a local directory or the HF cache; downloads only if allowed. The weights are
    loaded into an initialised model (low_cpu_mem_usage=False), which needs no `accelerate`: the same weights, and no
    warning on every load."""
    offline = not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return AutoencoderKL.from_pretrained(name_or_path, local_files_only=offline, low_cpu_mem_usage=False).eval()
    except (OSError, ValueError) as err:
        cache = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
        raise AutoencoderError(
            f"autoencoder weights {name_or_path!r} not found locally ({type(err).__name__}). Put them in the Hugging Face "
            f"cache ({cache}, e.g. `huggingface-cli download {name_or_path}` on a machine with network), or set "
            f"autoencoder.path to a directory holding config.json and diffusion_pytorch_model.safetensors"
            + ("" if allow_download else ", or set autoencoder.allow_download=true")
        ) from None


def open_autoencoder(cfg) -> tuple[AutoencoderKL, float, dict]:
    """(vae, scale_factor, identity) for the experiment's autoencoder config."""
    ae = cfg.autoencoder
    if ae.name == "tiny":
        path = tiny_autoencoder_weights(cfg)
        vae, scale = load_tiny_autoencoder(path)
        return vae, scale, {"name": "tiny", "sha256": sha256_tree(path)}
    source = ae.path or f"stabilityai/{ae.name}"
    vae = load_pretrained_autoencoder(source, ae.allow_download)
    local = Path(source) if Path(source).is_dir() else None
    digest = sha256_tree(local) if local else hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode()).hexdigest()
    return vae, SD_VAE_SCALE, {"name": ae.name, "source": source, "sha256": digest}


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images: torch.Tensor, scale: float):
    """Scaled posterior (mean, std) of images in [-1, 1]."""
    dist = vae.encode(images).latent_dist
    return dist.mean * scale, dist.std * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor, scale: float) -> torch.Tensor:
    return vae.decode(z / scale).sample.clamp(-1, 1)
