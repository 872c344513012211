"""torch-fidelity glue: feature extraction with validated arguments, and metrics from stored features.

torch-fidelity silently ignores unknown keyword arguments and caches by name only, so this module checks
every argument against torch_fidelity.defaults.DEFAULTS and never uses its cache: reference features are
stored by the reference stage under results/{exp}/reference/ with the dataset and extractor identity.
"""
import contextlib
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from speedpipe.distributed import resolve_device
from speedpipe.layout import classifier_weights
from speedpipe.models.classifier import ClassifierFeatureExtractor

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
EXTRACTOR_NAMES = {"inception-v3-compat": "inception-v3-compat", "classifier": ClassifierFeatureExtractor.NAME}
LAYERS = {  # metric -> feature layer, per extractor
    "inception-v3-compat": {"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"},
    "classifier": {"fid": "features", "kid": "features", "prc": "features", "isc": "logits"},
}

if ClassifierFeatureExtractor.NAME not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(ClassifierFeatureExtractor.NAME, ClassifierFeatureExtractor)


class EvaluationError(ValueError):
    """Unusable evaluation input (weights, samples, reference); the message names the file."""


def fidelity_kwargs(**kwargs) -> dict:
    """Keyword arguments for torch-fidelity, refused if it would not recognise them."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise EvaluationError(f"torch-fidelity does not know the argument(s) {unknown}")
    return kwargs


def inception_weights_path(configured: str | None) -> Path:
    path = Path(configured) if configured else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise EvaluationError(
            f"Inception-v3 weights not found at {path}. Download {INCEPTION_FILE} (torch-fidelity's release) on a machine "
            f"with network and put it there (torch hub cache: $TORCH_HOME/hub/checkpoints/) or set eval.inception_weights"
        )
    return path


class UInt8Images(torch.utils.data.Dataset):
    """uint8 NHWC array -> uint8 CHW tensors (torch-fidelity's input format)."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise EvaluationError(f"expected uint8 images of shape [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


@contextlib.contextmanager
def no_tf32():
    """Evaluation in full fp32: TF32 matmuls would change features in the 3rd digit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def extractor_kwargs(extractor: str, weights: Path, cuda: bool) -> dict:
    return fidelity_kwargs(feature_extractor=EXTRACTOR_NAMES[extractor], feature_extractor_weights_path=str(weights),
                           cuda=cuda, verbose=False)


def _readable(items):
    """Collate (index, uint8 CHW tensor or None) items: the readable images stacked, and the unreadable indices."""
    kept = [image for _, image in items if image is not None]
    return (torch.stack(kept) if kept else None), [i for i, image in items if image is None]


def stream_features(dataset, extractor: str, weights: Path, metrics, batch_size=100, cuda=False, num_workers=0):
    """({layer: features [N, D]}, skipped indices) of a dataset of (index, uint8 CHW image or None) items, or of
    uint8 CHW images, batch by batch (torch-fidelity's own loop, get_featuresdict_from_dataset, with decoding in worker
    processes and unreadable items skipped and counted). Memory holds the features, never the images: each batch's
    features are copied into one [N, D] buffer per layer, so nothing of a batch's buffers is kept (a kept view, or
    many small kept tensors between freed activations, holds on to memory that grows with N)."""
    layers = sorted({LAYERS[extractor][m] for m in metrics})
    kwargs = extractor_kwargs(extractor, weights, cuda)
    try:
        fe = create_feature_extractor(kwargs["feature_extractor"], layers, **kwargs)
    except Exception as err:  # an unreadable or foreign weights file fails deep inside torch.load or load_state_dict
        raise EvaluationError(f"{extractor} weights {weights}: not a loadable state dict of the extractor "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty or cut-off file'})") from err
    indexed = _Indexed(dataset) if isinstance(dataset, UInt8Images) else dataset
    loader = torch.utils.data.DataLoader(indexed, batch_size=batch_size, num_workers=num_workers, collate_fn=_readable,
                                         pin_memory=cuda)
    buffers, count, skipped = {}, 0, []
    torch.manual_seed(0)
    with no_tf32(), torch.no_grad():
        for batch, unreadable in loader:
            skipped += unreadable
            if batch is None:
                continue
            features = fe.convert_features_tuple_to_dict(fe(batch.cuda(non_blocking=True) if cuda else batch))
            for layer, value in features.items():
                if layer not in buffers:
                    buffers[layer] = torch.empty((len(indexed), *value.shape[1:]), dtype=value.dtype)
                buffers[layer][count : count + len(value)] = value
            count += len(batch)
    if not count:
        raise EvaluationError(f"no readable images among {len(skipped)}")
    return {layer: b[:count].clone() if count < len(b) else b for layer, b in buffers.items()}, skipped


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


PRC_NEIGHBORHOOD = DEFAULTS["prc_neighborhood"]  # k of the k-NN manifolds of precision and recall
ISC_SPLITS = DEFAULTS["isc_splits"]
PRC_BLOCK = 1000


def compute_metrics(sample_feats: dict, reference: dict, extractor: str, metrics, kid_subset_size=1000) -> tuple[dict, dict, dict]:
    """(metrics, the settings they were computed with, {metric: why it was left out}) from torch-fidelity's metric
    functions on stored features; FID against the reference mu/sigma. A metric the sample count does not support is
    computed with a setting it supports (IS with fewer splits, KID with a smaller subset) or left out with the reason:
    never NaN."""
    layers, out, settings, unavailable = LAYERS[extractor], {}, {}, {}
    n = len(next(iter(sample_feats.values())))
    ref_feats = reference.get("features") or {}
    if "fid" in metrics:
        if n < 2:
            unavailable["fid"] = f"{n} sample: a covariance needs at least 2"
        else:
            ref_stats = {"mu": reference["mu"].numpy(), "sigma": reference["sigma"].numpy()}
            stats = fid_features_to_statistics(sample_feats[layers["fid"]])
            stats = {k: v.astype(ref_stats[k].dtype) for k, v in stats.items()}  # an ADM batch stores float64 mu
            out.update(fid_statistics_to_metric(stats, ref_stats, verbose=False))
    for metric in ("kid", "prc"):
        if metric in metrics and layers[metric] not in ref_feats:
            raise EvaluationError(f"{metric}: the reference holds no features (an imported ADM batch has only mu/sigma)")
    if "kid" in metrics:
        subset = min(kid_subset_size, n, len(ref_feats[layers["kid"]]))
        if subset < 2:
            unavailable["kid"] = f"subsets of {subset} sample: an MMD estimate needs at least 2"
        else:
            out.update(kid_features_to_metric(sample_feats[layers["kid"]], ref_feats[layers["kid"]],
                                              **fidelity_kwargs(kid_subset_size=subset, verbose=False)))
            settings["kid_subset_size"] = subset
    if "isc" in metrics:
        splits = min(ISC_SPLITS, n // 2)  # at least 2 samples per split (an empty split would give NaN)
        if splits < 1:
            unavailable["isc"] = f"{n} sample: a split needs at least 2"
        else:
            out.update(isc_features_to_metric(sample_feats[layers["isc"]], splits=splits))
            settings["isc_splits"] = splits
    if "prc" in metrics:
        smallest = min(n, len(ref_feats[layers["prc"]]))
        if smallest <= PRC_NEIGHBORHOOD:
            unavailable["prc"] = f"{smallest} samples: the {PRC_NEIGHBORHOOD}-nearest-neighbour manifolds need more"
        else:
            # k-NN distances in blocks of PRC_BLOCK rows (torch-fidelity's save_cpu_ram path): memory grows as N x PRC_BLOCK,
            # where the full matrices need N x N (3 GB more at 15,000 samples)
            out.update(prc_features_to_metric(sample_feats[layers["prc"]], ref_feats[layers["prc"]],
                                              **fidelity_kwargs(save_cpu_ram=True, prc_batch_size=PRC_BLOCK, verbose=False)))
    settings["prc_neighborhood"] = PRC_NEIGHBORHOOD
    return {k: float(v) for k, v in out.items()}, settings, unavailable


def label_accuracy(logits: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict:
    """Fraction of samples whose classifier prediction (argmax of the logits) is the label they were generated
    for, overall and per label (None for a label with no samples)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels) != len(logits):
        raise EvaluationError(f"label accuracy: {len(logits)} samples but {len(labels)} labels")
    correct = (logits.argmax(dim=1) == labels).double()
    per_class = {}
    for c in range(num_classes):
        mine = labels == c
        per_class[str(c)] = correct[mine].mean().item() if mine.any() else None
    return {"accuracy": correct.mean().item(), "per_class": per_class}


def classifier_weights_path(cfg) -> Path:
    path = classifier_weights(cfg)
    if not path.is_file():
        raise EvaluationError(f"classifier weights not found: {path} (run the classifier stage: speedpipe classifier)")
    return path


def weights_for(cfg) -> Path:
    if cfg.eval.extractor == "inception-v3-compat":
        return inception_weights_path(cfg.eval.inception_weights)
    return classifier_weights_path(cfg)


def use_cuda(device_name: str) -> bool:
    """Whether eval.device puts the extractor on the GPU: auto where one is visible; cuda where none is, refused (naming
    the key) before anything is read."""
    return resolve_device(device_name, "eval.device").type == "cuda"
