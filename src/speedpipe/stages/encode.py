"""Stage `encode`: the whole image dataset -> latent store (shards + manifest.json), once.

Shard i holds dataset items [i·S, (i+1)·S); rank r of W writes the shards with i mod W = r, so no two
ranks ever write the same file. Shards are written atomically and an existing shard is kept (after
checking it was made from the same dataset and encoder), so an interrupted run resumes at the first
missing shard; when a manifest exists, every kept shard must still match the checksum recorded there. Rank 0
writes the manifest last: counts, shapes, checksums, latent statistics, skips.
"""
import json
import math
import time
from pathlib import Path
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from speedpipe.config import save_config
from speedpipe.data.images import DataError, open_image_dataset
from speedpipe.data.latents import mmap_safetensors, shard_name
from speedpipe.distributed import barrier, setup_device, shutdown
from speedpipe.io import atomic_path, atomic_write_text, sha256_file
from speedpipe.layout import latents_dir
from speedpipe.models.autoencoder import encode_posterior, open_autoencoder
from speedpipe.stages import STAGES, Stage


class _Indexed(torch.utils.data.Dataset):
    """Items of `indices` as (dataset index, item-or-None), so skipped files can be named."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        return i, self.dataset[i]


def _collate(items):
    kept = [(i, item) for i, item in items if item is not None]
    skipped = [i for i, item in items if item is None]
    images = torch.stack([item[0] for _, item in kept]) if kept else None
    labels = torch.tensor([item[1] for _, item in kept], dtype=torch.long)
    return images, labels, skipped


def encode_shard(vae, scale, dataset, indices, cfg, device, generator):
    """Encode one shard's items: tensors to store, and the paths of skipped (unreadable) files. Each batch's latents
    are copied into buffers of the shard's size (nothing of a batch's own tensors is kept: see fidelity.stream_features)."""
    enc = cfg.encode
    loader = torch.utils.data.DataLoader(_Indexed(dataset, indices), batch_size=enc.batch_size,
                                         num_workers=enc.num_workers, collate_fn=_collate)
    store_dtype = torch.float16 if enc.dtype == "fp16" else torch.float32
    buffers, count, skipped = {}, 0, []
    for images, batch_labels, batch_skipped in loader:
        skipped += [dataset.path(i) for i in batch_skipped]
        if images is None:
            continue
        x = images.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enc.precision == "bf16"):
            mean, std = encode_posterior(vae, torch.cat([x, x.flip(-1)]), scale)
        mean, std = (v.float().unflatten(0, (2, -1)).transpose(0, 1) for v in (mean, std))  # [n, 2, C, H, W]
        if enc.mode == "flip":
            batch = {"latents": mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)}
        else:
            batch = {"mean": mean, "std": std}
        batch["labels"] = batch_labels
        for key, value in batch.items():
            if key not in buffers:
                buffers[key] = torch.empty((len(indices), *value.shape[1:]), dtype=torch.long if key == "labels" else store_dtype)
            buffers[key][count : count + len(value)] = value
        count += len(batch_labels)
    if not buffers:
        return {"labels": torch.zeros(0, dtype=torch.long)}, skipped
    return {k: v[:count].clone() if count < len(v) else v for k, v in buffers.items()}, skipped


@STAGES["encode"].entry
def run(cfg, provenance):
    device, env = setup_device(cfg.encode.device, "encode.device")
    out = latents_dir(cfg)
    dataset = open_image_dataset(cfg.data)
    vae, scale, identity = open_autoencoder(cfg)
    vae = vae.to(device)
    # what each shard records of how it was made: the dataset, the encoder and the stage's settings; shards made
    # otherwise (Snakemake re-runs encode after an edit and removes only the manifest) are removed and re-encoded
    made_by = {"dataset": dataset.fingerprint(), "encoder": identity, "settings": STAGES["encode"].run_settings(provenance)}
    if env.is_main:
        save_config(provenance, out / "config.yaml")

    manifest = out / "manifest.json"
    recorded = {sh["file"]: sh["sha256"] for sh in json.loads(manifest.read_text())["shards"]} if manifest.is_file() else {}
    stale = sorted(out.glob("shard-*.safetensors"))
    if env.is_main and stale and any(_made_otherwise(_shard_info(p), made_by) for p in stale):
        print(f"encode: the shards in {out} were made from another dataset, encoder or settings: encoding again", flush=True)
        for path in stale:
            path.unlink()
        manifest.unlink(missing_ok=True)
        recorded = {}
    barrier(env)
    size = cfg.encode.shard_size
    num_shards = math.ceil(len(dataset) / size)
    mine = [i for i in range(num_shards) if i % env.world_size == env.rank]
    from tqdm.auto import tqdm

    start, encoded = time.perf_counter(), 0
    for i in tqdm(mine, desc=f"encode (rank {env.rank})", disable=not (cfg.encode.progress and env.is_main)):
        path = out / shard_name(i)
        if path.exists():  # made as this run would make it (see above): kept, if it is still what the manifest recorded
            _check_recorded_checksum(path, recorded)
            continue
        indices = range(i * size, min((i + 1) * size, len(dataset)))
        generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + i)  # per shard: rank-independent
        tensors, skipped = encode_shard(vae, scale, dataset, indices, cfg, device, generator)
        with atomic_path(path) as tmp:
            # One metadata key: safetensors writes metadata from a hash map, so several keys would be in random order.
            info = {**made_by, "skipped": skipped, "first_index": indices[0]}
            save_file(tensors, str(tmp), metadata={"speedpipe": json.dumps(info, sort_keys=True)})
        encoded += len(indices)
    seconds = time.perf_counter() - start
    barrier(env)
    if env.is_main:
        manifest = build_manifest(out, num_shards, dataset, scale, identity, cfg)
        manifest["encode_seconds_rank0"] = seconds
        manifest["encode_images_per_s_rank0"] = encoded / seconds if encoded else None
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    barrier(env)
    shutdown(env)
    return out


def _check_recorded_checksum(path, recorded: dict):
    """A shard the existing manifest lists must still have the checksum recorded there (else it was altered)."""
    if path.name in recorded and sha256_file(path) != recorded[path.name]:
        raise DataError(f"{path} does not match the sha256 recorded in {path.parent / 'manifest.json'} (modified or corrupt "
                        f"since it was written); delete it to re-encode it")


def _made_otherwise(info: dict, made_by: dict) -> bool:
    """Whether a shard was made from another dataset or encoder, or with other settings."""
    return (any(info.get(k) != v for k, v in made_by.items() if k != "settings")
            or bool(Stage.settings_differ(info.get("settings", {}), made_by["settings"])))


def _shard_info(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("speedpipe", "{}"))


def build_manifest(out: Path, num_shards, dataset, scale, identity, cfg) -> dict:
    shards, skipped = [], []
    total, channel_sum, channel_sq = 0, 0.0, 0.0
    key = "latents" if cfg.encode.mode == "flip" else "mean"
    latent_shape = None
    for i in range(num_shards):
        path = out / shard_name(i)
        arrays = mmap_safetensors(path)
        skipped += _shard_info(path)["skipped"]
        count = len(arrays["labels"])
        if count:
            z = np.asarray(arrays[key], dtype=np.float64)  # [n, 2, C, H, W]
            latent_shape = list(z.shape[2:])
            channel_sum = channel_sum + z.sum(axis=(0, 1, 3, 4))
            channel_sq = channel_sq + (z**2).sum(axis=(0, 1, 3, 4))
        shards.append({"file": path.name, "count": count, "sha256": sha256_file(path)})
        total += count
    if total == 0:
        raise DataError(f"encode: every image was unreadable ({len(skipped)} skipped); nothing to train on")
    n_values = total * 2 * latent_shape[1] * latent_shape[2]
    mean = channel_sum / n_values
    std = np.sqrt(channel_sq / n_values - mean**2)
    return {
        "count": total,
        "latent_shape": latent_shape,
        "dtype": cfg.encode.dtype,
        "mode": cfg.encode.mode,
        "scale_factor": scale,
        "encoder": identity,
        "dataset": dataset.fingerprint(),
        "num_classes": dataset.num_classes,
        "channel_mean": mean.tolist(),
        "channel_std": std.tolist(),
        "skipped": {"count": len(skipped), "files": skipped},
        "shards": shards,
    }
