"""The latent store: fixed-size safetensors shards plus manifest.json, written by the encode stage.

Each shard holds `labels` [n] and, per example, the latents of the image and of its horizontal flip
(index 0 / 1 on the second axis): `latents` [n, 2, C, H, W] in mode "flip" (one posterior sample,
fixed for all epochs: cheapest), or `mean` and `std` [n, 2, C, H, W] in mode "posterior" (training
samples a fresh z = mean + std·ε every epoch, as encoding on the fly would, at twice the storage).
Latents are stored already multiplied by the autoencoder's scale factor. `LatentNormalization` maps them
to per-channel zero mean and unit variance for training (data.latent_norm: channel), as latent-diffusion
pipelines do; checkpoints carry it so that samplers map generated latents back before decoding.
"""
import json
import struct
from pathlib import Path

import numpy as np
import torch

from speedpipe.data.images import DataError
from speedpipe.errors import ConfigError
from speedpipe.io import sha256_file

SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "BF16": None}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def mmap_safetensors(path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array (no copy, no full read)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise DataError(f"{path}: tensor {name!r} has dtype {info['dtype']}, expected F16, F32 or I64")
        start, end = info["data_offsets"]
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + start, shape=tuple(info["shape"]))
        assert arrays[name].nbytes == end - start
    return arrays


class LatentStore:
    """Training data over a latent store: len, latent_shape, num_classes, get_batch(indices, flip, eps)."""

    def __init__(self, root, verify: bool = True):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"latent store {self.root}: manifest.json missing (run the encode stage: speedpipe encode)")
        self.manifest = json.loads(manifest_path.read_text())
        shards = self.manifest["shards"]
        for shard in shards:
            path = self.root / shard["file"]
            if not path.is_file():
                raise DataError(f"latent store {self.root}: shard {shard['file']} listed in the manifest is missing")
            if verify and sha256_file(path) != shard["sha256"]:
                raise DataError(f"latent store {self.root}: shard {shard['file']} does not match its manifest checksum "
                                f"(modified or corrupt); delete it and re-run the encode stage")
        self.mode = self.manifest["mode"]
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.num_classes = self.manifest["num_classes"]
        self.scale_factor = self.manifest["scale_factor"]
        self._shards = [mmap_safetensors(self.root / s["file"]) for s in shards]
        self._offsets = np.cumsum([0] + [s["count"] for s in shards])

    @property
    def samples_posterior(self) -> bool:
        return self.mode == "posterior"

    def identity(self) -> str:
        """The store's content: a hash of its shards' checksums (a re-encoded store is another dataset)."""
        import hashlib

        return "latents:" + hashlib.sha256(" ".join(s["sha256"] for s in self.manifest["shards"]).encode()).hexdigest()[:16]

    def __len__(self):
        return int(self._offsets[-1])

    def _gather(self, name, shard_ids, indices, second=None) -> np.ndarray:
        rows = [self._shards[s][name][i - self._offsets[s]] for s, i in zip(shard_ids, indices)]
        if second is not None:
            rows = [r[int(f)] for r, f in zip(rows, second)]
        return np.stack([np.asarray(r) for r in rows])

    def get_batch(self, indices: torch.Tensor, flip: torch.Tensor, eps: torch.Tensor | None = None):
        """Latents [n, C, H, W] (float32) of the examples, of their mirror where flip is set, and labels [n]."""
        idx = indices.numpy()
        shard_ids = np.searchsorted(self._offsets, idx, side="right") - 1
        labels = torch.from_numpy(self._gather("labels", shard_ids, idx).astype(np.int64))
        if self.mode == "flip":
            return torch.from_numpy(self._gather("latents", shard_ids, idx, flip.numpy()).astype(np.float32)), labels
        if eps is None:
            raise ValueError("a posterior-mode latent store needs eps (the noise for z = mean + std·eps)")
        mean = torch.from_numpy(self._gather("mean", shard_ids, idx, flip.numpy()).astype(np.float32))
        std = torch.from_numpy(self._gather("std", shard_ids, idx, flip.numpy()).astype(np.float32))
        return mean + std * eps.to(mean.dtype), labels


class LatentNormalization:
    """x = (z − mean_c) / std_c per latent channel c; the identity for mean 0, std 1."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1 or not bool((self.std > 0).all()):
            raise DataError(f"latent normalisation: expected per-channel mean and positive std of one length, got "
                            f"mean {self.mean.tolist()} and std {self.std.tolist()}")

    @classmethod
    def identity(cls, channels: int) -> "LatentNormalization":
        return cls([0.0] * channels, [1.0] * channels)

    @classmethod
    def from_state(cls, state: dict | None, channels: int) -> "LatentNormalization":
        """From a checkpoint's `latent_norm` entry (None: checkpoints trained on the stored latents as they are)."""
        return cls.identity(channels) if state is None else cls(state["mean"], state["std"])

    def state_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def _view(self, v, x):
        return v.to(x.device, x.dtype).view(1, -1, *([1] * (x.ndim - 2)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._view(self.mean, z)) / self._view(self.std, z)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self.std, x) + self._view(self.mean, x)


class NormalizedLatents:
    """A latent dataset (store or synthetic) whose batches come out normalised."""

    def __init__(self, dataset, normalization: LatentNormalization):
        if len(normalization.mean) != dataset.latent_shape[0]:
            raise DataError(f"latent normalisation has {len(normalization.mean)} channels, the latents {dataset.latent_shape[0]}")
        self.dataset, self.normalization = dataset, normalization
        self.latent_shape, self.num_classes = dataset.latent_shape, dataset.num_classes
        self.samples_posterior = getattr(dataset, "samples_posterior", False)

    def __len__(self):
        return len(self.dataset)

    def identity(self) -> str:
        """What the batches are drawn from (a resumed run must draw from the same)."""
        return self.dataset.identity()

    def get_batch(self, indices, flip, eps=None):
        x, y = self.dataset.get_batch(indices, flip, eps)
        return self.normalization.normalize(x), y


def open_training_data(cfg, model_cfg=None, normalization: LatentNormalization | None = None) -> NormalizedLatents:
    """The latent dataset of cfg.data, checked against the model (cfg.model, or a teacher's model_cfg), normalised with
    the given normalization (a consistency student: its teacher's, so that it sees the teacher's data) or else per data.latent_norm."""
    from speedpipe.layout import latents_dir

    m = model_cfg or cfg.model
    latent_shape = (m.in_channels, m.input_size, m.input_size)
    if cfg.data.source == "synthetic":
        from speedpipe.data.synthetic import SyntheticLatents

        dataset = SyntheticLatents(cfg.data.synthetic_size, latent_shape, m.num_classes)
        stats = {"channel_mean": dataset.latents.mean(dim=(0, 2, 3)).tolist(), "channel_std": dataset.latents.std(dim=(0, 2, 3)).tolist()}
    else:
        dataset = LatentStore(latents_dir(cfg))
        if dataset.latent_shape != latent_shape or dataset.num_classes != m.num_classes:
            raise ConfigError(
                f"latent store {dataset.root} holds latents {dataset.latent_shape} with {dataset.num_classes} classes, but the "
                f"model expects {latent_shape} with {m.num_classes} (model.in_channels, model.input_size, model.num_classes)"
            )
        stats = dataset.manifest
    if normalization is None:
        normalization = (LatentNormalization(stats["channel_mean"], stats["channel_std"]) if cfg.data.latent_norm == "channel"
                         else LatentNormalization.identity(m.in_channels))
    return NormalizedLatents(dataset, normalization)
