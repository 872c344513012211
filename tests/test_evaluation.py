import json

import numpy as np
import pytest
import torch
import torch_fidelity
from diffusers import AutoencoderKL

from conftest import run_python
from speedpipe.config import load_config
from speedpipe.fidelity import EvaluationError, UInt8Images, extract_features, fidelity_kwargs
from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config
from speedpipe.models.classifier import ClassifierFeatureExtractor
from speedpipe.stages import evaluate, reference, sample, train
from speedpipe.stages.sample import write_npz


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

    return to_uint8(Mnist5k(32).images[:500]).numpy()  # the first 500 real digits (the reference of the tests), uint8 NHWC


def _fid(a, b, weights):
    fa = extract_features(a, "classifier", weights, ["fid"])["features"].numpy()
    fb = extract_features(b, "classifier", weights, ["fid"])["features"].numpy()
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
    feats = extract_features(digits[:7], "classifier", classifier_weights, ["fid", "isc"])
    assert feats["features"].shape == (7, 128) and feats["logits"].shape == (7, 10)


def test_unknown_torch_fidelity_arguments_are_refused():
    with pytest.raises(EvaluationError, match="kid_subset_sise"):
        fidelity_kwargs(kid_subset_sise=10)


def _eval_config(tmp_path, classifier_weights, *extra):
    path = tmp_path / "eval.yaml"
    path.write_text(f"experiment: ev\noutput_dir: {tmp_path}\ndata: {{name: mnist5k}}\n")
    return path, ["eval.extractor=classifier", f"eval.classifier_weights={classifier_weights}",
                  "eval.reference_max_images=500", "eval.kid_subset_size=100", *extra]


def test_stage_metrics_equal_torch_fidelity(tmp_path, classifier_weights, digits):
    path, overrides = _eval_config(tmp_path, classifier_weights)
    reference.run(load_config(path, overrides))
    rng = np.random.default_rng(1)
    fake = np.clip(digits[::-1] + rng.normal(0, 30, digits.shape), 0, 255).astype(np.uint8)[:300]
    samples = tmp_path / "ev" / "samples" / "run" / "0000010" / "ddpm250.npz"
    write_npz(samples, fake, np.zeros(300, dtype=np.int64))
    out = evaluate.run(load_config(path, overrides + [f"eval.samples={samples}"]))
    assert out == tmp_path / "ev" / "metrics" / "run" / "0000010" / "ddpm250.json"
    ours = json.loads(out.read_text())["metrics"]

    theirs = torch_fidelity.calculate_metrics(**fidelity_kwargs(
        input1=UInt8Images(fake), input2=UInt8Images(digits), fid=True, kid=True, isc=True, prc=True, cuda=False,
        feature_extractor=ClassifierFeatureExtractor.NAME, feature_extractor_weights_path=str(classifier_weights),
        kid_subset_size=100, cache=False, verbose=False, save_cpu_ram=True))
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-6), key


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
    config, overrides = sampling_setup
    one = sample.run(load_config(config, overrides + [f"sampling.out={tmp_path / 'one.npz'}"], phase="sample"))
    result = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py", "-c", str(config),
                         "-p", "sample", *overrides, f"sampling.out={tmp_path / 'two.npz'}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = np.load(tmp_path / "two.npz", allow_pickle=False)
    assert np.array_equal(np.load(one)["arr_0"], two["arr_0"]) and np.array_equal(np.load(one)["arr_1"], two["arr_1"])
    assert not list(tmp_path.glob(".part-*"))
