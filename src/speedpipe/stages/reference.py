"""Stage `reference`: features and FID statistics of the real images, once per (dataset, extractor).

Writes {output_dir}/{experiment}/reference/stats-{extractor}.pt: {mu, sigma, features: {layer: [N, D]}, count,
skipped, identity}. Images are decoded in batches by worker processes (eval.num_workers) and only their features
are kept, so memory does not grow with the dataset beyond the features themselves; under several ranks (torchrun
or a multi-task SLURM job) each rank extracts a contiguous slice and rank 0 gathers them in order. Unreadable
images are skipped and counted (or stop the run with data.strict).

With eval.reference_npz an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz, the published FIDs'
reference) is imported instead: its mu/sigma are the FID reference, checked against the extractor's feature
dimension, and its images (arr_0, if present) give KID/PR/IS features.
"""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from torch_fidelity.metric_fid import fid_features_to_statistics

from speedpipe.config import save_config
from speedpipe.data.images import open_image_dataset, to_uint8
from speedpipe.distributed import setup_device, shutdown
from speedpipe.data.samples import NpzImages, SamplesError, npz_members
from speedpipe.fidelity import LAYERS, EvaluationError, stream_features, weights_for
from speedpipe.io import atomic_torch_save, sha256_tree
from speedpipe.layout import reference_path
from speedpipe.models.classifier import DigitClassifier
from speedpipe.stages import STAGES

FID_DIMS = {"inception-v3-compat": 2048, "classifier": DigitClassifier.feature_dim}


class RealImages(torch.utils.data.Dataset):
    """(index, uint8 CHW image or None if unreadable) for the given dataset items."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        item = self.dataset[i]
        return i, None if item is None else to_uint8(item[0][None])[0].permute(2, 0, 1)


def check_adm_batch(path, extractor: str):
    """An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) that fits the extractor, from its headers only
    (cheap enough to check when the experiment is planned); errors name the file, the key and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"config key 'eval.reference_npz': ADM reference batch not found: {path}. Download it from "
                              f"the guided-diffusion evaluation suite (e.g. VIRTUAL_imagenet256_labeled.npz) on a machine "
                              f"with network and put it there")
    try:
        members = npz_members(path)
    except SamplesError as err:
        raise EvaluationError(f"config key 'eval.reference_npz': {err}") from None
    missing = [k for k in ("mu", "sigma") if k not in members]
    if missing:
        raise EvaluationError(f"config key 'eval.reference_npz': {path} is not an ADM reference batch: arrays {missing} "
                              f"missing (it has {sorted(members)})")
    dim = FID_DIMS[extractor]
    (mu, _), (sigma, _) = members["mu"], members["sigma"]
    if mu != (dim,) or sigma != (dim, dim):
        raise EvaluationError(f"config key 'eval.reference_npz': {path}: mu {mu} and sigma {sigma} do not fit the "
                              f"{extractor} features of dimension {dim} (expected ({dim},) and ({dim}, {dim}); "
                              f"eval.extractor is {extractor!r})")
    if "arr_0" in members:
        NpzImages(path)  # uint8 [N, H, W, 3], uncompressed


def load_adm_batch(path, extractor: str) -> tuple[np.ndarray, np.ndarray, NpzImages | None]:
    """(mu, sigma, its images read from the file as needed, or None) of an ADM reference batch, validated."""
    check_adm_batch(path, extractor)
    with np.load(path, allow_pickle=False) as adm:
        mu, sigma, images = adm["mu"], adm["sigma"], NpzImages(path) if "arr_0" in adm else None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"config key 'eval.reference_npz': {path}: mu or sigma holds non-finite values")
    return mu, sigma, images


@STAGES["reference"].entry
def run(cfg, provenance):
    device, env = setup_device(cfg.eval.device, "eval.device")
    weights = weights_for(cfg)
    cuda = device.type == "cuda"
    skipped = []
    if cfg.eval.reference_npz:
        mu, sigma, images = load_adm_batch(cfg.eval.reference_npz, cfg.eval.extractor)
        source = f"adm:{Path(cfg.eval.reference_npz).name}:{sha256_tree(cfg.eval.reference_npz)[:16]}"
        metrics = ["kid", "isc", "prc"] if images is not None else []
        features = stream_features(images, cfg.eval.extractor, weights, metrics, cfg.eval.batch_size, cuda)[0] if metrics else {}
        count = 0 if images is None else len(images)
    else:
        dataset = open_image_dataset(cfg.data)
        n = min(len(dataset), cfg.eval.reference_max_images or len(dataset))
        chosen = np.linspace(0, len(dataset) - 1, n).round().astype(int)  # spread over the (class-sorted) dataset
        bounds = [n * r // env.world_size for r in range(env.world_size + 1)]
        mine = RealImages(dataset, chosen[bounds[env.rank] : bounds[env.rank + 1]])
        features, skipped = stream_features(mine, cfg.eval.extractor, weights, ["fid", "kid", "isc", "prc"], cfg.eval.batch_size,
                                            cuda, cfg.eval.num_workers)
        if env.world_size > 1:  # rank order = dataset order
            gathered = [None] * env.world_size
            dist.all_gather_object(gathered, (features, skipped))
            features = {k: torch.cat([g[0][k] for g in gathered]) for k in features}
            skipped = [i for g in gathered for i in g[1]]
        source = dataset.fingerprint()
        stats = fid_features_to_statistics(features[LAYERS[cfg.eval.extractor]["fid"]])
        mu, sigma = stats["mu"], stats["sigma"]
        count = len(features[LAYERS[cfg.eval.extractor]["fid"]])
    if env.is_main:
        save_config(provenance, reference_path(cfg).with_suffix(".yaml"))
        atomic_torch_save({
            "mu": torch.from_numpy(np.asarray(mu)),
            "sigma": torch.from_numpy(np.asarray(sigma)),
            "features": features,
            "count": count,
            "skipped": len(skipped),
            "identity": {"source": source, "extractor": cfg.eval.extractor, "extractor_sha256": sha256_tree(weights)},
        }, reference_path(cfg))
    shutdown(env)
    return reference_path(cfg)
