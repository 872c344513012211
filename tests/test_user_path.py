"""A real user's path, end to end at toy size: the shipped FFHQ and ImageNet experiment files on folders of photos, with a
pretrained-format VAE folder, Inception-v3 weights in torch-fidelity's format and (ImageNet) an ADM reference batch --
made by tests/user_data.py, nothing downloaded -- shrunk by tests/data/laptop_try.yaml, as docs/your_data.md says.
"""
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, snakemake
from speedpipe.experiment_file import CONSISTENCY_KEYS
from user_data import (SD_VAE_FT_EMA, image_files, write_adm_batch, write_inception_weights, write_photos,
                       write_pretrained_vae)

IMAGENET_CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="session")
def user_inputs(tmp_path_factory):
    from speedpipe.data.images import center_crop_arr, to_rgb

    root = tmp_path_factory.mktemp("user")
    faces = write_photos(root / "faces", 40)
    imagenet = write_photos(root / "imagenet", 42, classes=IMAGENET_CLASSES, seed=1)
    inception = write_inception_weights(root / "pt_inception-random.pth", image_files(faces)[:24])
    crops = np.stack([np.array(center_crop_arr(to_rgb(Image.open(p)), 64)) for p in image_files(imagenet)[:30]])
    return {"faces": faces, "imagenet": imagenet, "vae": write_pretrained_vae(root / "sd-vae-narrow"), "inception": inception,
            "adm": write_adm_batch(root / "VIRTUAL_imagenet64_fixture.npz", inception, crops)}


def laptop_experiment(name: str, work, inputs, **changes):
    """The steps of docs/your_data.md: copy the dataset's configs, put the paths in its base.yaml, copy the experiment file and apply
    tests/data/laptop_try.yaml (then the given top-level changes, None removing a key); returns the experiment file's path."""
    configs = work / "configs" / "image"
    shutil.copytree(REPO / "configs/image" / name, configs / name)
    shutil.copy(REPO / "configs/image/base.yaml", configs / "base.yaml")
    base = yaml.safe_load((configs / name / "base.yaml").read_text())
    base["data"]["root"] = str(inputs["faces" if name == "ffhq_256" else "imagenet"])
    base["autoencoder"] = {"path": str(inputs["vae"])}
    base.setdefault("eval", {})["inception_weights"] = str(inputs["inception"])
    if name == "imagenet_256":
        base["model"]["num_classes"] = len(IMAGENET_CLASSES)
        base["eval"]["reference_npz"] = str(inputs["adm"])
    (configs / name / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    pipe = yaml.safe_load((REPO / f"configs/pipeline/{name}.yaml").read_text())
    pipe.update(output_dir=str(work / "results"), base_config=str(configs / name / "base.yaml"),
                methods={m: str(configs / name / spec.split("/")[-1]) for m, spec in pipe["methods"].items()})
    laptop = yaml.safe_load((REPO / "tests/data/laptop_try.yaml").read_text())
    pipe.update(laptop["top_level"])
    for stage, items in laptop["overrides"].items():
        pipe["overrides"][stage] = [*pipe["overrides"].get(stage, []), *items]
    pipe.update(changes)
    pipe = {k: v for k, v in pipe.items() if v is not None}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    return work / f"{name}.yaml"


def test_the_full_sd_vae_folder_loads_without_accelerate(tmp_path, capfd):
    """sd-vae-ft-ema's whole architecture, saved as diffusers saves it, loads through the pipeline's path (no download,
    no warning) and maps 64x64 images to 4x8x8 latents and back."""
    import torch
    from omegaconf import OmegaConf

    from speedpipe.models.autoencoder import decode_latents, encode_posterior, open_autoencoder

    folder = write_pretrained_vae(tmp_path / "sd-vae-ft-ema", SD_VAE_FT_EMA)
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    cfg = OmegaConf.create({"experiment": "x", "output_dir": str(tmp_path),
                            "autoencoder": {"name": "sd-vae-ft-ema", "path": str(folder), "allow_download": False}})
    capfd.readouterr()
    vae, scale, identity = open_autoencoder(cfg)
    assert "accelerate" not in capfd.readouterr().err  # diffusers warns on stderr when a load would need it
    assert sum(p.numel() for p in vae.parameters()) > 80e6 and scale == 0.18215 and identity["source"] == str(folder)
    mean, std = encode_posterior(vae, torch.zeros(1, 3, 64, 64), scale)
    assert mean.shape == (1, 4, 8, 8) and decode_latents(vae, mean, scale).shape == (1, 3, 64, 64)


def test_the_random_inception_features_neither_vanish_nor_saturate(user_inputs):
    from speedpipe.fidelity import UInt8Images, stream_features

    images = np.stack([np.array(Image.open(p).convert("RGB").resize((64, 64))) for p in image_files(user_inputs["faces"])[:20]])
    features = stream_features(UInt8Images(images), "inception-v3-compat", user_inputs["inception"], ["fid", "isc"])[0]
    pool, logits = features["2048"], features["logits_unbiased"]
    assert 0.01 < pool.std(0).mean().item() < 10  # features differ from image to image, at a usable scale
    confidence = logits.softmax(1).max(1).values
    assert 1 / 1008 * 2 < confidence.mean().item() < 0.9  # neither uniform over the 1008 classes nor one-hot


def _metrics_files_are_finite(root) -> list[dict]:
    files = sorted((root / "metrics").rglob("*.json"))
    assert files
    out = []
    for f in files:
        m = json.loads(f.read_text())
        assert m["metrics"] and all(np.isfinite(v) for v in m["metrics"].values()), (f, m["metrics"])
        assert all(isinstance(reason, str) and reason for reason in m["unavailable"].values()), (f, m["unavailable"])
        out.append(m)
    return out


# the consistency models left out of a laptop try (the class-conditional one: the micro experiment's sCD is too)
WITHOUT_TEACHERS = {"teachers": [], **dict.fromkeys(CONSISTENCY_KEYS)}


@pytest.mark.parametrize("name", ["ffhq_256", "imagenet_256"])
def test_a_shipped_image_experiment_runs_on_photos(name, user_inputs, tmp_path):
    """FFHQ: unconditional, FID against the photos' own Inception statistics, sCD of an unconditional teacher. ImageNet:
    class folders, FID against an ADM reference batch, no consistency model. Every metric finite or left out with its
    reason."""
    conditional = name == "imagenet_256"
    experiment = laptop_experiment(name, tmp_path, user_inputs, **(WITHOUT_TEACHERS if conditional else {}))
    result = snakemake(tmp_path, "--configfile", str(experiment), timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    root = tmp_path / "results" / name
    metrics = _metrics_files_are_finite(root)
    # 2 runs at their last step (ddim5, also the teacher's ODE); the teacher's ddpm5 and ddim2, its student's scm1 and scm2
    assert len(metrics) == (2 if conditional else 2 + 2 + 2)
    assert all(m["extractor"] == "inception-v3-compat" for m in metrics)
    assert all("label_accuracy" not in m["metrics"] for m in metrics)  # no classifier of the photos: none shown
    for table in ("fid.md", "metrics.md") if conditional else ("fid.md", "scm.md", "metrics.md"):
        text = (root / "tables" / table).read_text()
        assert "nan" not in text.lower() and "label acc." not in text, (table, text)
    manifest = json.loads((root / "latents/manifest.json").read_text())
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["files"][0].endswith("broken_download.jpg")
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["encoder"]["source"] == str(user_inputs["vae"])
    assert "accelerate" not in (root / "logs/encode/encode.log").read_text()
    if conditional:
        assert manifest["num_classes"] == 3
        assert all(m["reference"]["source"].startswith("adm:VIRTUAL_imagenet64_fixture.npz") for m in metrics)
    else:
        assert manifest["num_classes"] == 1 and all(m["reference"]["count"] == 40 for m in metrics)  # 40 photos (+1 unreadable)


def test_a_batch_larger_than_the_photos_is_refused_before_anything_runs(user_inputs, tmp_path):
    """Without the laptop list's distill.global_batch_size, sCD would draw batches of 256 from 41 files: the run stops
    before its first job, naming the key (the same run once failed in sCD, after the teacher had trained)."""
    experiment = laptop_experiment("ffhq_256", tmp_path, user_inputs)
    pipe = yaml.safe_load(experiment.read_text())
    pipe["overrides"]["distill"].remove("distill.global_batch_size=8")
    experiment.write_text(yaml.safe_dump(pipe, sort_keys=False))
    result = snakemake(tmp_path, "--configfile", str(experiment))
    assert result.returncode != 0
    assert "distill run scd-speed-s0: config key 'distill.global_batch_size': a batch of 256 is larger than the 41 images" in result.stderr
    assert not (tmp_path / "results").exists()  # nothing ran


def test_guidance_on_a_teacher_without_a_null_class_is_refused_when_planned(user_inputs, tmp_path):
    experiment = laptop_experiment("ffhq_256", tmp_path, user_inputs, teacher_sampler="ddpm10-cfg2")
    result = snakemake(tmp_path, "--configfile", str(experiment))
    assert result.returncode != 0 and not (tmp_path / "results").exists()
    assert "sampler 'ddpm10-cfg2' of speed-s0: guidance needs a null class" in result.stderr
    assert "model.class_dropout_prob is 0" in result.stderr


def test_the_readme_shows_the_laptop_list_the_tests_run():
    laptop = (REPO / "tests/data/laptop_try.yaml").read_text()
    assert f"```yaml\n{laptop[laptop.index('top_level:'):]}```" in (REPO / "docs/your_data.md").read_text()
