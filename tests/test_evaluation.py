import json

import numpy as np
import pytest
import torch
import torch_fidelity
from diffusers import AutoencoderKL
from PIL import Image

from conftest import run_python
from speedpipe.config import load_config
from speedpipe.fidelity import EvaluationError, UInt8Images, fidelity_kwargs, label_accuracy, stream_features
from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config
from speedpipe.models.classifier import ClassifierFeatureExtractor
from speedpipe.stages import evaluate, reference, sample, train
from speedpipe.data.samples import write_npz


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
    """The classifier stage, briefly trained (features that tell digits apart; accuracy is not the point here)."""
    from speedpipe.stages import classifier

    root = tmp_path_factory.mktemp("clf")
    (root / "c.yaml").write_text(f"experiment: clf\noutput_dir: {root}\ndata: {{name: mnist5k}}\neval: {{classifier_steps: 40}}\n")
    out = classifier.run(load_config(root / "c.yaml"))
    assert json.loads((out / "metrics.json").read_text())["heldout_accuracy"] > 0.3
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def digits():
    from speedpipe.data.images import Mnist5k
    from speedpipe.data.images import to_uint8

    return to_uint8(Mnist5k(32).images[:500]).numpy()  # the first 500 real digits, all zeros, uint8 NHWC


@pytest.fixture(scope="module")
def reference_digits():
    """The reference stage's images at eval.reference_max_images=500: 500 spread evenly over the class-sorted dataset."""
    from speedpipe.data.images import Mnist5k
    from speedpipe.data.images import to_uint8

    images = Mnist5k(32).images
    return to_uint8(images[np.linspace(0, len(images) - 1, 500).round().astype(int)]).numpy()


def features_of(images, *args):
    """{layer: features} of uint8 NHWC images."""
    return stream_features(UInt8Images(images), *args)[0]


def _fid(a, b, weights):
    fa = features_of(a, "classifier", weights, ["fid"])["features"].numpy()
    fb = features_of(b, "classifier", weights, ["fid"])["features"].numpy()
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    stats = lambda f: {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}  # noqa: E731
    return fid_statistics_to_metric(stats(fa), stats(fb), False)["frechet_inception_distance"]


def test_fid_is_zero_on_itself_and_grows_with_noise(digits, classifier_weights):
    assert abs(_fid(digits, digits, classifier_weights)) < 1e-6
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (10, 40, 80, 160):
        noisy = np.clip(digits + rng.normal(0, sigma, digits.shape), 0, 255).astype(np.uint8)
        fids.append(_fid(noisy, digits, classifier_weights))
    assert all(a < b for a, b in zip(fids, fids[1:])) and fids[0] > 0


def test_classifier_extractor_is_registered(classifier_weights, digits):
    assert ClassifierFeatureExtractor.NAME in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    feats = features_of(digits[:7], "classifier", classifier_weights, ["fid", "isc"])
    assert feats["features"].shape == (7, 128) and feats["logits"].shape == (7, 10)


def test_unknown_torch_fidelity_arguments_are_refused():
    with pytest.raises(EvaluationError, match="kid_subset_sise"):
        fidelity_kwargs(kid_subset_sise=10)


def _eval_config(tmp_path, classifier_weights, *extra):
    path = tmp_path / "eval.yaml"
    path.write_text(f"experiment: ev\noutput_dir: {tmp_path}\ndata: {{name: mnist5k}}\n")
    return path, ["eval.extractor=classifier", f"eval.classifier_weights={classifier_weights}",
                  "eval.reference_max_images=500", "eval.kid_subset_size=100", *extra]


def test_stage_metrics_equal_torch_fidelity(tmp_path, classifier_weights, digits, reference_digits):
    path, overrides = _eval_config(tmp_path, classifier_weights)
    reference.run(load_config(path, overrides))
    rng = np.random.default_rng(1)
    fake = np.clip(digits[::-1] + rng.normal(0, 30, digits.shape), 0, 255).astype(np.uint8)[:300]
    samples = tmp_path / "ev" / "samples" / "run" / "0000010" / "ddpm250.npz"
    write_npz(samples, fake, np.zeros(300, dtype=np.int64))
    out = evaluate.run(load_config(path, overrides + [f"eval.samples={samples}"]))
    assert out == tmp_path / "ev" / "standalone" / "metrics" / "run" / "0000010" / "ddpm250.json"  # run alone: not the pipeline's
    ours = json.loads(out.read_text())["metrics"]

    theirs = torch_fidelity.calculate_metrics(**fidelity_kwargs(
        input1=UInt8Images(fake), input2=UInt8Images(reference_digits), fid=True, kid=True, isc=True, prc=True, cuda=False,
        feature_extractor=ClassifierFeatureExtractor.NAME, feature_extractor_weights_path=str(classifier_weights),
        kid_subset_size=100, cache=False, verbose=False, save_cpu_ram=True))
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-6), key


def test_label_accuracy_by_hand():
    """Six samples of three classes; the classifier's argmax disagrees with the generating label for two of them."""
    logits = torch.tensor([[5.0, 1, 0], [0.2, 0.1, 0], [0, 3, 1], [2, 1, 0], [0, 0, 4], [0, 1, 7]])
    labels = np.array([0, 0, 1, 1, 2, 2])  # predictions 0, 0, 1, 0, 2, 2: sample 3 (label 1) is wrong
    result = label_accuracy(logits, labels, num_classes=4)
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["per_class"] == {"0": 1.0, "1": 0.5, "2": 1.0, "3": None}
    with pytest.raises(EvaluationError, match="6 samples but 5 labels"):
        label_accuracy(logits, labels[:5], num_classes=4)


def test_stage_label_accuracy_counts_mislabelled_samples(tmp_path, classifier_weights):
    """Real digits with their own labels score the classifier's accuracy; the same digits with shifted labels do not."""
    from speedpipe.data.images import Mnist5k, to_uint8

    path, overrides = _eval_config(tmp_path, classifier_weights)
    reference.run(load_config(path, overrides))
    mnist = Mnist5k(32)  # stored by class: every 10th digit covers all ten
    digits, labels = to_uint8(mnist.images[::10]).numpy(), mnist.labels[::10].numpy()
    scores = {}
    for name, given in (("true", labels), ("shifted", (labels + 1) % 10)):
        samples = tmp_path / "ev" / "samples" / name / "0000001" / "ddpm250.npz"
        write_npz(samples, digits, given)
        out = evaluate.run(load_config(path, overrides + [f"eval.samples={samples}", "eval.label_accuracy=true"]))
        scores[name] = json.loads(out.read_text())
    predicted = features_of(digits, "classifier", classifier_weights, ["isc"])["logits"].argmax(1).numpy()
    expected = {"true": (predicted == labels).mean(), "shifted": (predicted == (labels + 1) % 10).mean()}
    assert {k: v["metrics"]["label_accuracy"] for k, v in scores.items()} == pytest.approx(expected)
    assert expected["true"] > 0.3 and expected["shifted"] < expected["true"] - 0.2
    per_class = scores["true"]["label_accuracy_per_class"]
    assert set(per_class) == {str(c) for c in range(10)} and all(0 <= v <= 1 for v in per_class.values())
    samples = tmp_path / "ev" / "samples" / "nolabels" / "0000001" / "ddpm250.npz"
    samples.parent.mkdir(parents=True)
    np.savez(samples, arr_0=digits[:10])
    with pytest.raises(EvaluationError, match="needs the labels"):
        evaluate.run(load_config(path, overrides + [f"eval.samples={samples}", "eval.label_accuracy=true"]))


def test_bad_inputs_write_no_metrics(tmp_path, classifier_weights, digits):
    path, overrides = _eval_config(tmp_path, classifier_weights)
    reference.run(load_config(path, overrides))
    samples = tmp_path / "ev" / "samples" / "r" / "0000001" / "ddpm250.npz"
    write_npz(samples, digits[:20].astype(np.float32), np.zeros(20, dtype=np.int64))
    with pytest.raises(EvaluationError, match=r"ddpm250\.npz.*uint8"):
        evaluate.run(load_config(path, overrides + [f"eval.samples={samples}"]))
    write_npz(samples, digits[:20, :, :, :1], np.zeros(20, dtype=np.int64))
    with pytest.raises(EvaluationError, match=r"\[N, H, W, 3\]"):
        evaluate.run(load_config(path, overrides + [f"eval.samples={samples}"]))
    write_npz(samples, digits[:20], np.zeros(20, dtype=np.int64))
    with pytest.raises(EvaluationError, match=r"Inception-v3 weights not found at .*nowhere\.pth"):
        evaluate.run(load_config(path, [f"eval.samples={samples}", f"eval.inception_weights={tmp_path / 'nowhere.pth'}"]))
    assert not (tmp_path / "ev" / "metrics").exists()


def test_adm_npz_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    write_npz(tmp_path / "s.npz", images, np.arange(5))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        assert npz["arr_0"].dtype == np.uint8 and np.array_equal(npz["arr_0"], images)
        assert np.array_equal(npz["arr_1"], np.arange(5))


@pytest.fixture
def sampling_setup(tiny_train_config, tmp_path):
    """A 2-step trained tiny DiT checkpoint and a tiny autoencoder (16x16 images <-> 4x8x8 latents)."""
    ckpt_dir = train.run(load_config(tiny_train_config, ["trainer.steps=2"], phase="train"))
    vae_path = tmp_path / "vae.safetensors"
    torch.manual_seed(0)
    save_tiny_autoencoder(AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)), 0.7, vae_path)
    overrides = [f"sampling.checkpoint={ckpt_dir / 'ckpt-0000002.pt'}", "autoencoder.name=tiny", f"autoencoder.path={vae_path}",
                 "sampling.sampler=ddpm10", "sampling.num_samples=12", "sampling.batch_size=5", "sampling.progress=false"]
    return tiny_train_config, overrides


def test_same_seed_same_samples_and_sidecar(sampling_setup, tmp_path):
    config, overrides = sampling_setup
    a = sample.run(load_config(config, overrides + [f"sampling.out={tmp_path / 'a.npz'}"], phase="sample"))
    b = sample.run(load_config(config, overrides + [f"sampling.out={tmp_path / 'b.npz'}"], phase="sample"))
    c = sample.run(load_config(config, overrides + [f"sampling.out={tmp_path / 'c.npz'}", "sampling.seed=1"], phase="sample"))
    load = lambda p: np.load(p, allow_pickle=False)["arr_0"]  # noqa: E731
    assert load(a).shape == (12, 16, 16, 3) and load(a).dtype == np.uint8
    assert np.array_equal(load(a), load(b)) and not np.array_equal(load(a), load(c))
    assert np.load(a)["arr_1"].tolist() == [i % 4 for i in range(12)]
    info = json.loads(a.with_suffix(".json").read_text())
    assert info["nfe_per_image"] == 10 and info["step"] == 2 and a.with_suffix(".png").exists()
    guided = sample.run(load_config(config, overrides + [f"sampling.out={tmp_path / 'g.npz'}", "sampling.cfg_scale=4"], phase="sample"))
    assert json.loads(guided.with_suffix(".json").read_text())["nfe_per_image"] == 20


def test_two_rank_sampling_matches_one_rank(sampling_setup, tmp_path):
    """Both under torchrun (one thread per process): the pixels may differ in their last bit between thread counts on
    some CPUs' kernels, never between rank layouts."""
    config, overrides = sampling_setup
    for ranks, name in ((1, "one"), (2, "two")):
        result = run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "main.py", "-c", str(config),
                             "-p", "sample", *overrides, f"sampling.out={tmp_path / name}.npz"], timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (np.load(tmp_path / f"{name}.npz", allow_pickle=False) for name in ("one", "two"))
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert not list(tmp_path.glob(".part-*"))


def test_non_finite_samples_are_refused_and_nothing_is_written(sampling_setup, tmp_path):
    from speedpipe.checkpoint import load_checkpoint
    from speedpipe.io import atomic_torch_save

    config, overrides = sampling_setup
    ckpt = next(o.split("=", 1)[1] for o in overrides if o.startswith("sampling.checkpoint="))
    state = load_checkpoint(ckpt)
    state["ema"]["final_layer.linear.bias"][:] = float("nan")
    atomic_torch_save(state, tmp_path / "ckpt-0000002.pt")
    out = tmp_path / "nan.npz"
    with pytest.raises(FloatingPointError, match=r"non-finite latents .*training step 2.* sampler ddpm10"):
        sample.run(load_config(config, overrides + [f"sampling.checkpoint={tmp_path / 'ckpt-0000002.pt'}", f"sampling.out={out}"],
                               phase="sample"))
    assert not out.exists() and not out.with_suffix(".png").exists()


def _adm_batch(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_adm_reference_batch_import_and_its_validation(tmp_path, classifier_weights, digits):
    """An ADM-format reference batch (mu, sigma, arr_0) becomes the FID reference; malformed batches are refused."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(128, 128))
    mu, sigma = rng.normal(size=128), a @ a.T / 128
    good = _adm_batch(tmp_path / "ref.npz", mu=mu, sigma=sigma, arr_0=digits[:200])
    path, overrides = _eval_config(tmp_path, classifier_weights, f"eval.reference_npz={good}")
    stats = torch.load(reference.run(load_config(path, overrides)), weights_only=True)
    assert np.array_equal(stats["mu"].numpy(), mu) and np.array_equal(stats["sigma"].numpy(), sigma)
    assert stats["count"] == 200 and stats["identity"]["source"].startswith("adm:ref.npz:")
    assert stats["features"]["features"].shape == (200, 128)
    bad = {
        "missing.npz": (None, "ADM reference batch not found: .*missing.npz"),
        "nosigma.npz": ({"mu": mu}, r"arrays \['sigma'\] missing"),
        "dim.npz": ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, r"do not fit the classifier features of dimension 128"),
        "nan.npz": ({"mu": np.full(128, np.nan), "sigma": sigma}, "non-finite"),
    }
    for name, (arrays, message) in bad.items():
        npz = tmp_path / name if arrays is None else _adm_batch(tmp_path / name, **arrays)
        with pytest.raises(EvaluationError, match=message):
            reference.run(load_config(path, [*overrides[:-1], f"eval.reference_npz={npz}"]))


MEMORY_SCRIPT = ("import resource, sys; from speedpipe.config import load_config; from speedpipe.stages import {stage}; "
                 "{stage}.run(load_config(sys.argv[1], sys.argv[2:])); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


@pytest.fixture(scope="module")
def photos_64(tmp_path_factory):
    """5,000 64x64 PNG images in 10 class folders, and ADM samples npz files of 500 and 8,000 such images."""
    root = tmp_path_factory.mktemp("photos64")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8000, 64, 64, 3), dtype=np.uint8)
    for c in range(10):
        (root / "imgs" / f"c{c}").mkdir(parents=True)
    for i, image in enumerate(images[:5000]):
        Image.fromarray(image).save(root / "imgs" / f"c{i % 10}" / f"{i:05d}.png")
    for n in (500, 8000):
        write_npz(root / f"samples-{n}.npz", images[:n], np.arange(n) % 10)
    return root


def _peak_rss(stage, config, overrides) -> int:
    result = run_python(["-c", MEMORY_SCRIPT.format(stage=stage), str(config), *overrides], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1]) * 1024


@pytest.mark.parametrize("stage,counts", [("reference", (500, 5000)), ("evaluate", (500, 8000))])
def test_streaming_stages_memory_does_not_grow_with_the_image_count(stage, counts, photos_64, classifier_weights, tmp_path):
    """Peak memory of a stage on few and many 64x64 images differs by about what it must keep, the features (a few MB):
    keeping each batch's features as a tensor of its own grows it by ~110 kB per image (heap fragmentation around
    them: +500 MB at 5,000), loading every sample and a bytes copy of them by 24 kB per image, precision/recall's
    full N x N distance matrices by 4N bytes per sample (+250 MB at 8,000)."""
    config = tmp_path / "m.yaml"
    config.write_text(f"experiment: mem\noutput_dir: {tmp_path}\n")
    common = ["data.name=image_folder", f"data.root={photos_64 / 'imgs'}", "data.image_size=64", "eval.extractor=classifier",
              f"eval.classifier_weights={classifier_weights}", f"eval.reference={tmp_path / 'stats.pt'}"]
    if stage == "evaluate":
        assert _peak_rss("reference", config, [*common, "eval.reference_max_images=500"]) > 0
    peaks = {}
    for n in counts:
        own = [f"eval.reference_max_images={n}", f"eval.reference={tmp_path / f'stats-{n}.pt'}"] if stage == "reference" else \
            [f"eval.samples={photos_64 / f'samples-{n}.npz'}", f"eval.out={tmp_path / f'metrics-{n}.json'}", "eval.metrics=[fid,kid,isc,prc]"]
        peaks[n] = _peak_rss(stage, config, [*common, *own])
    features = (counts[1] - counts[0]) * (128 + 10) * 4  # the extra images' features (float32): a few MB
    assert peaks[counts[1]] - peaks[counts[0]] < features + 150e6, peaks  # the peak varies by about 50 MB from run to run
