"""Stage `evaluate`: FID, KID, IS and precision/recall of a samples npz against the reference (torch-fidelity).

Writes metrics/{run}/{step}/{sampler}.json with every metric, the sample count and content hash, the
reference identity, the extractor, and the sampler's NFE and seconds. With eval.label_accuracy, also the
fraction of samples the dataset's classifier assigns to the label they were generated for (overall as the
metric `label_accuracy`, and per class). A metric the sample count cannot support is left out with the reason
(`unavailable`), never written as NaN. The samples are read from the file image by image (memory holds their features
only). Nothing is written when an input is unusable.
"""
import json
from pathlib import Path

from speedpipe.config import save_config
from speedpipe.errors import ConfigError
from speedpipe.data.samples import NpzImages, SamplesError, read_labels
from speedpipe.fidelity import (EvaluationError, LAYERS, classifier_weights_path, compute_metrics, label_accuracy, stream_features,
                                use_cuda, weights_for)
from speedpipe.io import atomic_write_text, safe_torch_load, sha256_tree
from speedpipe.layout import metrics_path, reference_path
from speedpipe.stages import STAGES


def open_samples(path) -> NpzImages:
    """The images of an ADM samples npz, read from the file as they are needed; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"samples file not found: {path}")
    try:
        return NpzImages(path)
    except SamplesError as err:
        raise EvaluationError(str(err)) from None


@STAGES["evaluate"].entry
def run(cfg, provenance):
    e = cfg.eval
    if not e.samples:
        raise ConfigError("config key 'eval.samples': required (a samples npz)")
    cuda = use_cuda(e.device)
    out = metrics_path(cfg)
    images = open_samples(e.samples)
    labels = read_labels(e.samples)
    if e.label_accuracy and labels is None:
        raise EvaluationError(f"{e.samples}: eval.label_accuracy needs the labels the samples were generated for (arr_1)")
    weights = weights_for(cfg)
    reference = safe_torch_load(reference_path(cfg))
    if reference["identity"]["extractor"] != e.extractor:
        raise EvaluationError(f"{reference_path(cfg)} holds {reference['identity']['extractor']} statistics, not {e.extractor}")
    recorded, current = reference["identity"].get("extractor_sha256"), sha256_tree(weights)  # hashed as the reference stage does
    if recorded != current:
        raise EvaluationError(f"{reference_path(cfg)} holds {e.extractor} statistics made with other extractor weights "
                              f"(sha256 {str(recorded)[:12]}) than this evaluation's {weights} (sha256 {current[:12]}): "
                              f"re-run the reference stage with these weights")
    features = stream_features(images, e.extractor, weights, e.metrics, e.batch_size, cuda)[0]
    metrics, settings, unavailable = compute_metrics(features, reference, e.extractor, e.metrics, e.kid_subset_size)
    per_class = None
    if e.label_accuracy:
        logits_layer = LAYERS["classifier"]["isc"]
        if e.extractor != "classifier" or logits_layer not in features:
            features = stream_features(images, "classifier", classifier_weights_path(cfg), ["isc"], e.batch_size, cuda)[0]
        accuracy = label_accuracy(features[logits_layer], labels, features[logits_layer].shape[1])
        metrics["label_accuracy"], per_class = accuracy["accuracy"], accuracy["per_class"]
    sidecar = Path(e.samples).with_suffix(".json")
    sampling = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    result = {
        "metrics": metrics,
        "metric_settings": settings,
        "unavailable": unavailable,  # metric -> why this sample count does not support it
        "label_accuracy_per_class": per_class,
        "num_samples": len(images),
        "samples": str(e.samples),
        "samples_sha256": images.sha256(),
        "reference": {**reference["identity"], "count": reference["count"], "path": str(reference_path(cfg))},
        "extractor": e.extractor,
        "nfe_per_image": sampling.get("nfe_per_image"),
        "sampling_seconds": sampling.get("seconds"),
        "seconds_per_image": sampling.get("seconds_per_image"),
        "step": sampling.get("step"),
        "sampler": sampling.get("sampler"),
    }
    save_config(provenance, out.with_suffix(".yaml"))
    atomic_write_text(out, json.dumps(result, indent=2))
    return out
