import json
import os
import stat

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from conftest import events, run_python
from speedpipe.config import load_config
from speedpipe.data.images import DataError, ImageFolder, Mnist5k, center_crop_arr
from speedpipe.data.latents import LatentStore, mmap_safetensors, shard_name
from speedpipe.models.autoencoder import (AutoencoderError, load_pretrained_autoencoder, save_tiny_autoencoder,
                                          tiny_autoencoder_config)
from speedpipe.stages import encode


def test_mnist5k_has_500_digits_per_class():
    d = Mnist5k(image_size=32, fit="pad")
    assert len(d) == 5000 and torch.equal(torch.bincount(d.labels), torch.full((10,), 500))
    img, label = d[1234]
    assert img.shape == (3, 32, 32) and img.min() == -1.0 and img.max() <= 1.0 and 0 <= label < 10
    assert torch.all(img[:, :2, :] == -1.0), "2-pixel padding on each side is background"
    assert Mnist5k(image_size=16, fit="resize")[0][0].shape == (3, 16, 16)
    with pytest.raises(DataError, match="mnist_fit=resize"):
        Mnist5k(image_size=16, fit="pad")


def _adm_reference_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's guided_diffusion/image_datasets.py center_crop_arr, step by step."""
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), resample=Image.BOX)
    s = size / min(w, h)
    img = img.resize((round(w * s), round(h * s)), resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@pytest.mark.parametrize("shape", [(300, 200), (64, 64), (129, 515), (31, 40)])
def test_center_crop_matches_adm(shape):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    out = np.array(center_crop_arr(img, 32))
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out, _adm_reference_crop(img, 32))


@pytest.fixture
def image_tree(tmp_path):
    """Two classes of mixed sizes and modes, with one corrupt file."""
    root = tmp_path / "imgs"
    (root / "b_dogs").mkdir(parents=True)
    (root / "a_cats").mkdir()
    Image.new("RGB", (48, 40), (255, 0, 0)).save(root / "a_cats" / "red.png")
    Image.new("L", (20, 20), 128).save(root / "a_cats" / "grey.jpg", quality=100)
    Image.new("RGBA", (64, 32), (0, 0, 255, 10)).save(root / "b_dogs" / "blue_rgba.png")
    Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(root / "b_dogs" / "white_cmyk.jpg", quality=100)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 255, 0] * 256)
    pal.save(root / "b_dogs" / "green_palette.png")
    good = root / "b_dogs" / "truncated.JPEG"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good)
    good.write_bytes(good.read_bytes()[:200])
    (root / "b_dogs" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_tensors_and_skips(image_tree):
    d = ImageFolder(image_tree, image_size=16)
    assert d.classes == ["a_cats", "b_dogs"] and len(d) == 6
    items = {d.path(i).split("/")[-1]: d[i] for i in range(len(d))}
    assert items["truncated.JPEG"] is None
    red, label = items["red.png"]
    assert label == 0 and red.shape == (3, 16, 16)
    assert torch.allclose(red[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(items["grey.jpg"][0][:, 8, 8], torch.full((3,), 128 / 127.5 - 1), atol=0.02)
    assert torch.allclose(items["blue_rgba.png"][0][:, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    assert items["white_cmyk.jpg"][0].min() > 0.95
    assert torch.allclose(items["green_palette.png"][0][:, 3, 3], torch.tensor([-1.0, 1.0, -1.0]))
    with pytest.raises(DataError, match="truncated.JPEG"):
        ImageFolder(image_tree, image_size=16, strict=True)[[d.path(i) for i in range(6)].index(str(image_tree / "b_dogs" / "truncated.JPEG"))]


def test_image_folder_bad_roots(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", 16)


def _encode_config(tmp_path, image_tree, **extra):
    weights = tmp_path / "ae.safetensors"
    torch.manual_seed(0)
    save_tiny_autoencoder(AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)), 0.5, weights)
    overrides = [f"output_dir={tmp_path / 'results'}", "data.name=image_folder", f"data.root={image_tree}",
                 "data.image_size=16", "autoencoder.name=tiny", f"autoencoder.path={weights}", "encode.shard_size=2",
                 "encode.batch_size=2", "encode.progress=false", "model.in_channels=4", "model.input_size=8",
                 "model.num_classes=2"] + [f"{k}={v}" for k, v in extra.items()]
    path = tmp_path / "enc.yaml"
    path.write_text("experiment: enc\n")
    return path, overrides


def test_encode_writes_verifiable_shards_resumes_and_refuses_tampering(tmp_path, image_tree):
    path, overrides = _encode_config(tmp_path, image_tree)
    out = encode.run(load_config(path, overrides))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 5 and manifest["latent_shape"] == [4, 8, 8] and manifest["num_classes"] == 2
    assert manifest["skipped"] == {"count": 1, "files": [str(image_tree / "b_dogs" / "truncated.JPEG")]}
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(3)]
    assert manifest["encoder"]["name"] == "tiny" and len(manifest["encoder"]["sha256"]) == 64
    assert manifest["dataset"].startswith("image_folder-16-") and len(manifest["channel_std"]) == 4

    store = LatentStore(out)
    assert len(store) == 5
    x, y = store.get_batch(torch.tensor([0, 4]), torch.tensor([False, True]))
    assert x.shape == (2, 4, 8, 8) and y.tolist() == [0, 1]

    before = (out / shard_name(1)).read_bytes()
    (out / shard_name(1)).unlink()
    encode.run(load_config(path, overrides))
    assert (out / shard_name(1)).read_bytes() == before
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]

    data = bytearray((out / shard_name(2)).read_bytes())
    data[-1] ^= 0xFF
    (out / shard_name(2)).write_bytes(bytes(data))
    with pytest.raises(DataError, match=shard_name(2)):
        LatentStore(out)
    with pytest.raises(DataError, match=f"{shard_name(2)} does not match the sha256 recorded in .*manifest.json"):
        encode.run(load_config(path, overrides))  # a re-run refuses the altered shard instead of re-recording it
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_encode_encodes_again_when_its_settings_changed(tmp_path, image_tree):
    """Shards made with other settings (what Snakemake leaves when it re-runs encode after an edit: it removes only the
    manifest) are not kept: the store is made again with the new settings."""
    path, overrides = _encode_config(tmp_path, image_tree)
    out = encode.run(load_config(path, overrides))
    seed0 = LatentStore(out).manifest["shards"]
    (out / "manifest.json").unlink()
    encode.run(load_config(path, overrides + ["seed=1"]))  # flip mode: the seed draws the stored posterior samples
    assert LatentStore(out).manifest["shards"] != seed0
    (out / "manifest.json").unlink()
    encode.run(load_config(path, overrides + ["encode.mode=posterior"]))
    assert LatentStore(out).mode == "posterior" and {"mean", "std"} <= set(mmap_safetensors(out / shard_name(0)))


def test_posterior_store_samples_with_given_noise(tmp_path, image_tree):
    path, overrides = _encode_config(tmp_path, image_tree, **{"encode.mode": "posterior", "encode.dtype": "fp32"})
    store = LatentStore(encode.run(load_config(path, overrides)))
    idx, flip = torch.tensor([1, 2]), torch.tensor([False, False])
    mean, _ = store.get_batch(idx, flip, torch.zeros(2, 4, 8, 8))
    z, _ = store.get_batch(idx, flip, torch.ones(2, 4, 8, 8))
    assert torch.all(z > mean)
    with pytest.raises(ValueError, match="needs eps"):
        store.get_batch(idx, flip)


def test_two_rank_encode_writes_disjoint_shards_identical_to_one_rank(tmp_path, image_tree):
    path, overrides = _encode_config(tmp_path, image_tree)
    one = json.loads((encode.run(load_config(path, overrides)) / "manifest.json").read_text())
    two_overrides = [o.replace("output_dir=", "output_dir=") for o in overrides] + [f"data.latents_dir={tmp_path / 'two'}"]
    result = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "speedpipe.cli",
                         "encode", "--config", str(path), *two_overrides], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two["shards"] == one["shards"]


def test_pretrained_autoencoder_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    local = tmp_path / "sd-vae-local"
    AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)).save_pretrained(local)
    assert isinstance(load_pretrained_autoencoder(str(local)), AutoencoderKL)
    with pytest.raises(AutoencoderError, match=r"stabilityai/sd-vae-ft-ema.*huggingface-cli download.*autoencoder\.path"):
        load_pretrained_autoencoder("stabilityai/sd-vae-ft-ema")


def test_tiny_autoencoder_trains_and_resumes_bit_identical(tmp_path):
    from speedpipe.stages import autoencoder

    path = tmp_path / "ae.yaml"
    path.write_text(f"experiment: ae\noutput_dir: {tmp_path}\ndata: {{name: mnist5k}}\n"
                    "autoencoder: {name: tiny, block_out_channels: [8, 8], steps: 4, batch_size: 8, ckpt_every: 2, progress: false}\n")
    straight = autoencoder.run(load_config(path))
    reference = torch.load(straight / "ckpt-0000004.pt", weights_only=True)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["heldout_images"] == 500 and metrics["scale_factor"] > 0 and np.isfinite(metrics["psnr_heldout_db"])
    assert (straight / "recon.png").stat().st_size > 0 and (straight / "model.safetensors").exists()

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed_cfg = load_config(path, [f"output_dir={resumed_dir}"])
    autoencoder.run(load_config(path, [f"output_dir={resumed_dir}", "autoencoder.steps=2"]))
    out = autoencoder.run(resumed_cfg)
    assert [(e["event"], e["step"], e["steps_performed"]) for e in events(out)][-2:] == [("resume", 2, ""), ("finished", 4, "2")]
    resumed = torch.load(out / "ckpt-0000004.pt", weights_only=True)
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])


@pytest.mark.parametrize("stage", ["classifier", "autoencoder"])
def test_image_stages_skip_and_count_unreadable_files(tmp_path, image_tree, stage):
    """The classifier and autoencoder stages skip an image folder's corrupt file and count it (it is a training image)."""
    import importlib

    path = tmp_path / "c.yaml"
    path.write_text(f"experiment: x\noutput_dir: {tmp_path}\ndata: {{name: image_folder, root: {image_tree}, image_size: 32}}\n"
                    "eval: {classifier_steps: 3, classifier_batch_size: 4}\n"
                    "autoencoder: {name: tiny, block_out_channels: [8, 8], steps: 3, batch_size: 4, progress: false}\n")
    out = importlib.import_module(f"speedpipe.stages.{stage}").run(load_config(path))
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["skipped_images"], metrics["heldout_images"]) == (1, 1), metrics


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    from speedpipe.io import atomic_torch_save, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_torch_save({"x": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.txt", "b.pt")] == [mode, mode]
