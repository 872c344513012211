"""Stage `reference`: features and FID statistics of the real images, once per (dataset, extractor).

Writes {output_dir}/{experiment}/reference/stats-{extractor}.pt: {mu, sigma, features: {layer: [N, D]},
count, identity}. With eval.reference_npz an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)
is imported instead: its mu/sigma are the FID reference, and its images (arr_0) give KID/PR/IS features.
"""
from pathlib import Path

import numpy as np
import torch

from speedpipe.data.images import open_image_dataset, to_uint8
from speedpipe.fidelity import LAYERS, extract_features, use_cuda, weights_for
from speedpipe.io import atomic_torch_save, sha256_tree


def reference_path_for(cfg) -> Path:
    return Path(cfg.eval.reference or Path(cfg.output_dir) / cfg.experiment / "reference" / f"stats-{cfg.eval.extractor}.pt")


def real_images(cfg) -> tuple[np.ndarray, str]:
    """uint8 NHWC real images (every readable one, or the first reference_max_images) and the dataset identity."""
    dataset = open_image_dataset(cfg.data)
    n = min(len(dataset), cfg.eval.reference_max_images or len(dataset))
    items = [dataset[i] for i in range(n)]
    images = torch.stack([item[0] for item in items if item is not None])
    return to_uint8(images).numpy(), dataset.fingerprint()


def run(cfg):
    weights = weights_for(cfg)
    if cfg.eval.reference_npz:
        with np.load(cfg.eval.reference_npz, allow_pickle=False) as adm:
            images = adm["arr_0"] if "arr_0" in adm else None
            mu, sigma = adm["mu"], adm["sigma"]
        source = f"adm:{Path(cfg.eval.reference_npz).name}:{sha256_tree(cfg.eval.reference_npz)[:16]}"
        metrics = [m for m in ("kid", "isc", "prc") if images is not None]
    else:
        images, source = real_images(cfg)
        metrics = ["fid", "kid", "isc", "prc"]
    cuda = use_cuda(cfg.eval.device)
    features = extract_features(images, cfg.eval.extractor, weights, metrics, cfg.eval.batch_size, cuda) if metrics else {}
    if not cfg.eval.reference_npz:
        fid_feats = features[LAYERS[cfg.eval.extractor]["fid"]].numpy()
        mu, sigma = np.mean(fid_feats, axis=0), np.cov(fid_feats, rowvar=False)
    reference = {
        "mu": torch.from_numpy(np.asarray(mu)),
        "sigma": torch.from_numpy(np.asarray(sigma)),
        "features": features,
        "count": 0 if images is None else len(images),
        "identity": {"source": source, "extractor": cfg.eval.extractor, "extractor_sha256": sha256_tree(weights)},
    }
    out = reference_path_for(cfg)
    atomic_torch_save(reference, out)
    return out
