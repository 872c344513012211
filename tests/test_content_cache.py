"""The cache tracks the contents of a user's files, as it tracks settings (issue 26, item 4).

A job's params carry the content fingerprint (speedpipe.fingerprint) of each user input its stages read
(speedpipe.stages.INPUT_FILES: the photos, a pretrained VAE folder, Inception weights, an ADM reference batch, an init
checkpoint), not its path: a photo rewritten in place re-runs the jobs that read the photos, the same photos moved
elsewhere re-run nothing. And evaluation refuses reference statistics made with other extractor weights.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, planned_jobs, snakemake
from speedpipe import fingerprint
from speedpipe.fingerprint import content_fingerprint


def rewrite_in_place(path):
    """Change one byte of a file, keeping its size and restoring its access and modification times (what a tool that
    rewrites a photo and keeps its timestamps does); only the ctime, which no user call sets, moves."""
    before = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.fixture
def folder(tmp_path):
    """A small photo-folder-like tree: two class folders of 'images' and a nested folder."""
    root = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"img_{i}.jpg").write_bytes(os.urandom(2048))
    (root / "dog" / "more").mkdir()
    (root / "dog" / "more" / "deep.png").write_bytes(os.urandom(512))
    return root


@pytest.fixture
def hashed(monkeypatch):
    """Count the files content_fingerprint reads (its per-file hash), returning the list of their paths."""
    calls, real = [], fingerprint._hash_file
    monkeypatch.setattr(fingerprint, "_hash_file", lambda path: calls.append(path) or real(path))
    return calls


# --- content_fingerprint

@pytest.mark.parametrize("cached", [False, True], ids=["no cache", "cache"])
def test_a_rewrite_keeping_size_and_mtime_changes_the_fingerprint(folder, tmp_path, cached):
    cache = tmp_path / "cache" if cached else None
    before = content_fingerprint(folder, cache)
    rewrite_in_place(folder / "cat" / "img_1.jpg")
    assert content_fingerprint(folder, cache) != before
    weights = folder / "dog" / "more" / "deep.png"  # a single file (a weights file) too
    single = content_fingerprint(weights, cache)
    rewrite_in_place(weights)
    assert content_fingerprint(weights, cache) != single


def test_an_added_or_removed_file_changes_the_fingerprint(folder, tmp_path):
    cache = tmp_path / "cache"
    before = content_fingerprint(folder, cache)
    (folder / "cat" / "img_9.jpg").write_bytes(os.urandom(100))
    added = content_fingerprint(folder, cache)
    assert added != before
    (folder / "cat" / "img_9.jpg").unlink()
    assert content_fingerprint(folder, cache) == before
    (folder / "dog" / "img_0.jpg").rename(folder / "dog" / "img_renamed.jpg")  # a renamed photo is another dataset
    assert content_fingerprint(folder, cache) != before


def test_hidden_files_and_os_metadata_change_nothing(folder, tmp_path):
    cache = tmp_path / "cache"
    before = content_fingerprint(folder, cache)
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / "cat" / "._img_0.jpg").write_bytes(b"appledouble")
    (folder / "dog" / "Thumbs.db").write_bytes(b"windows")
    (folder / "__MACOSX" / "cat").mkdir(parents=True)
    (folder / "__MACOSX" / "cat" / "img_0.jpg").write_bytes(b"zip metadata")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "x.jpg").write_bytes(b"x")
    assert content_fingerprint(folder, cache) == before
    assert content_fingerprint(folder) == before


def test_the_same_data_elsewhere_has_the_same_fingerprint(folder, tmp_path):
    cache = tmp_path / "cache"
    before = content_fingerprint(folder, cache)
    moved = tmp_path / "elsewhere" / "photos-copy"
    shutil.copytree(folder, moved)  # new paths, inodes and ctimes
    assert content_fingerprint(moved, cache) == before
    assert content_fingerprint(moved) == before
    file = folder / "cat" / "img_0.jpg"
    assert content_fingerprint(shutil.copy(file, tmp_path / "renamed.bin"), cache) == content_fingerprint(file, cache)
    assert content_fingerprint(file) != before  # a file is not the folder that holds only it


def test_the_cache_reads_only_changed_files(folder, tmp_path, hashed):
    cache = tmp_path / "cache"
    first = content_fingerprint(folder, cache)
    assert len(hashed) == 7 and len(list(cache.iterdir())) == 1  # every file read once, one cache file per path
    hashed.clear()
    assert content_fingerprint(folder, cache) == first and hashed == []  # nothing changed: nothing read
    os.utime(folder / "dog" / "img_2.jpg")  # touched: its stat key changed, its content did not
    assert content_fingerprint(folder, cache) == first and hashed == [str(folder / "dog" / "img_2.jpg")]
    hashed.clear()
    rewrite_in_place(folder / "cat" / "img_0.jpg")
    assert content_fingerprint(folder, cache) != first and hashed == [str(folder / "cat" / "img_0.jpg")]
    hashed.clear()
    content_fingerprint(folder)  # without a cache folder: everything is read
    assert len(hashed) == 7


def test_a_corrupt_cache_file_is_recomputed(folder, tmp_path, hashed):
    cache = tmp_path / "cache"
    first = content_fingerprint(folder, cache)
    for f in cache.iterdir():
        f.write_text("{not json")
    hashed.clear()
    assert content_fingerprint(folder, cache) == first and len(hashed) == 7


def test_planning_imports_neither_torch_numpy_nor_pillow():
    code = ("import sys; import speedpipe.fingerprint, speedpipe.workflow; "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- job params

def _image_experiment(work, photos, **base_changes) -> dict:
    """An image-folder experiment on the demo's tiny settings (tiny autoencoder, digit-classifier features), its base
    config written to work/base.yaml; returns the experiment file's data."""
    base = yaml.safe_load((REPO / "configs/mnist5k/base.yaml").read_text())
    base["data"] = {"name": "image_folder", "root": str(photos), "image_size": 32, "source": "latents",
                    "random_flip": False, "latent_norm": "channel"}
    base["model"]["num_classes"] = 3
    base["eval"] = {"label_accuracy": False}
    for section, values in base_changes.items():
        base.setdefault(section, {}).update(values)
    (work / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    pipe = yaml.safe_load((REPO / "tests/data/micro.yaml").read_text())
    for key in ("teachers", "consistency_methods", "teacher_sampler", "teacher_ode_sampler", "teacher_baselines",
                "scm_samplers", "final_samples", "distill_warm_start", "distill_steps", "distill_eval_steps", "tables"):
        pipe.pop(key)
    pipe.update(experiment="photos", output_dir=str(work / "results"), base_config=str(work / "base.yaml"),
                methods={"baseline": str(work / "base.yaml")})
    pipe["overrides"] = {
        "autoencoder": ["autoencoder.steps=2", "autoencoder.batch_size=8", "autoencoder.block_out_channels=[8,8,8]",
                        "autoencoder.progress=false"],
        "encode": ["encode.batch_size=8", "encode.progress=false"],
        "classifier": ["eval.classifier_steps=2", "eval.classifier_batch_size=8"],
        "reference": ["eval.batch_size=8"],
        "train": ["trainer.global_batch_size=8", "trainer.progress=false"],
    }
    return pipe


def _reads(exp, rule, wildcards=None) -> list[dict]:
    return [p["reads"] for p in exp.job_params(rule, wildcards)]


def test_job_params_carry_the_contents_of_user_inputs_not_their_paths(folder, tmp_path, monkeypatch):
    """Each INPUT_FILES key the job's stages read, set to an existing path, is {"content": fingerprint}; the pipeline's
    own files (the tiny autoencoder, the latent store, the reference) stay paths (rule inputs)."""
    from speedpipe.workflow import Experiment

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".snakemake").mkdir()
    vae, inception, init = tmp_path / "vae", tmp_path / "inception.pth", tmp_path / "dit.pt"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(64))
    inception.write_bytes(os.urandom(64))
    init.write_bytes(os.urandom(64))
    pretrained = Experiment(_image_experiment(tmp_path, folder, autoencoder={"name": "sd-vae-ft-ema", "path": str(vae)},
                                              eval={"label_accuracy": False, "inception_weights": str(inception),
                                                    "reference_npz": str(inception)},
                                              model={"init_from": str(init)}) | {"extractor": "inception-v3-compat"})
    content = lambda path: {"content": content_fingerprint(path)}  # noqa: E731
    (encode,) = _reads(pretrained, "encode")
    assert encode["data.root"] == content(folder) and encode["autoencoder.path"] == content(vae)
    assert encode["data.latents_dir"] == str(pretrained.layout.latents_dir())  # a rule input: stays a path
    (reference,) = _reads(pretrained, "reference")
    assert reference["eval.inception_weights"] == content(inception) == reference["eval.reference_npz"]
    assert reference["eval.reference"] == str(pretrained.layout.reference("inception-v3-compat"))
    (train,) = _reads(pretrained, "train", {"run": "baseline-s0"})
    assert train["model.init_from"] == content(init)
    assert all(r["autoencoder.path"] == content(vae) for r in _reads(pretrained, "sample_curve", {"run": "baseline-s0"}))
    assert all(r["eval.inception_weights"] == content(inception) for r in _reads(pretrained, "evaluate_curve", {"run": "baseline-s0"}))
    assert list((tmp_path / ".snakemake" / "speedpipe-fingerprints").iterdir())  # remembered for the next planning

    tiny = Experiment(_image_experiment(tmp_path, folder))
    (encode,) = _reads(tiny, "encode")
    assert encode["autoencoder.path"] == str(tiny.layout.autoencoder_dir() / "model.safetensors")  # the pipeline's own
    assert encode["data.root"] == content(folder)
    (autoencoder,) = _reads(tiny, "autoencoder")
    assert autoencoder["data.root"] == content(folder)


# --- black box: a real Snakemake planning after the photos change or move

DATA_JOBS = ["autoencoder", "classifier", "encode", "reference"]  # every job that reads data.root in this experiment


@pytest.mark.slow
def test_snakemake_replans_edited_photos_and_not_moved_ones(tmp_path):
    """The data stages and one training run of a photo-folder experiment, run for real; then dry runs. The same photos
    copied elsewhere (data.root pointing there, the original removed): nothing planned. One photo rewritten in place
    with its size and modification time kept: every job that reads the photos and the training run downstream."""
    from user_data import write_photos

    photos = write_photos(tmp_path / "photos", 24, classes=["cat", "dog", "owl"])
    pipe = _image_experiment(tmp_path, photos)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    root = tmp_path / "results" / "photos"
    targets = [str(root / "latents/manifest.json"), str(root / "reference/stats-classifier.pt"),
               str(root / "train/baseline-s0/ckpt-0000004.pt")]
    plan = lambda: snakemake(tmp_path, "-n", *targets, "--configfile", str(tmp_path / "exp.yaml"))  # noqa: E731

    ran = snakemake(tmp_path, *targets, "--configfile", str(tmp_path / "exp.yaml"), timeout=300)
    assert ran.returncode == 0, ran.stderr[-5000:]
    unchanged = plan()
    assert unchanged.returncode == 0 and planned_jobs(unchanged.stdout) == [], unchanged.stdout[-3000:]

    moved = tmp_path / "elsewhere" / "my-photos"
    shutil.copytree(photos, moved)
    shutil.rmtree(photos)
    (tmp_path / "base.yaml").write_text((tmp_path / "base.yaml").read_text().replace(str(photos), str(moved)))
    after_move = plan()
    assert after_move.returncode == 0, after_move.stderr[-3000:]
    assert planned_jobs(after_move.stdout) == [], planned_jobs(after_move.stdout)

    rewrite_in_place(moved / "dog" / "img_0004.jpg")
    edited = plan()
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert sorted(planned_jobs(edited.stdout)) == [*DATA_JOBS, "train[run=baseline-s0]"], planned_jobs(edited.stdout)
    assert "params have changed" in edited.stdout

    # and the jobs, run, see the new content too: new latents, and the training run starts afresh on them (the old kept)
    from speedpipe.runstore import current_state

    made_from = json.loads((root / "latents/manifest.json").read_text())["dataset"]
    old_run = current_state(root / "train/baseline-s0")
    rerun = snakemake(tmp_path, *targets, "--configfile", str(tmp_path / "exp.yaml"), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert json.loads((root / "latents/manifest.json").read_text())["dataset"] != made_from
    assert current_state(root / "train/baseline-s0") != old_run and (old_run / "ckpt-0000004.pt").is_file()


# --- evaluation against reference statistics of other extractor weights

def _random_classifier(path, seed):
    import torch
    from safetensors.torch import save_file

    from speedpipe.models.classifier import DigitClassifier

    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in DigitClassifier(num_classes=10).state_dict().items()}, str(path))
    return path


def test_evaluation_refuses_reference_statistics_of_other_extractor_weights(tmp_path):
    import numpy as np

    from speedpipe.config import load_config
    from speedpipe.data.samples import write_npz
    from speedpipe.fidelity import EvaluationError
    from speedpipe.io import sha256_tree
    from speedpipe.stages import evaluate, reference

    weights = _random_classifier(tmp_path / "classifier.safetensors", seed=0)
    config = tmp_path / "eval.yaml"
    config.write_text(f"experiment: ev\noutput_dir: {tmp_path}\ndata: {{name: mnist5k}}\n")
    overrides = ["eval.extractor=classifier", f"eval.classifier_weights={weights}", "eval.reference_max_images=40",
                 "eval.kid_subset_size=10", "eval.batch_size=20"]
    stats = reference.run(load_config(config, overrides))
    samples = tmp_path / "ev" / "samples" / "run" / "0000001" / "ddim5.npz"
    rng = np.random.default_rng(0)
    write_npz(samples, rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.zeros(20, dtype=np.int64))
    out = evaluate.run(load_config(config, overrides + [f"eval.samples={samples}"]))  # the same weights: evaluated
    assert json.loads(out.read_text())["reference"]["extractor_sha256"] == sha256_tree(weights)
    out.unlink()

    recorded = sha256_tree(weights)
    _random_classifier(weights, seed=1)  # other weights under the same path
    with pytest.raises(EvaluationError) as refused:
        evaluate.run(load_config(config, overrides + [f"eval.samples={samples}"]))
    message = str(refused.value)
    assert str(stats) in message and recorded[:12] in message and sha256_tree(weights)[:12] in message, message
    assert not out.exists()


def test_a_runs_settings_follow_the_contents_of_its_init_checkpoint(tiny_train_config, tmp_path):
    """model.init_from names a user's file: what a resumed run must share with the run it resumes is its content, as
    for the job's params -- a new file at the same path starts a new run, the same file elsewhere resumes the old."""
    import torch

    from speedpipe.config import load_config
    from speedpipe.stages import STAGES

    init = tmp_path / "init.pt"
    torch.save({"w": torch.zeros(3)}, init)
    settings = lambda path: STAGES["train"].run_settings(load_config(tiny_train_config, [f"model.init_from={path}"], phase="train"))  # noqa: E731
    before = settings(init)
    assert before["model.init_from"] == {"content": content_fingerprint(init)}
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(init, moved)
    assert settings(moved) == before
    torch.save({"w": torch.ones(3)}, init)
    assert settings(init) != before
