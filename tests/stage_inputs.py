"""The inputs every stage reads, made once by the stages themselves (tests/test_settings.py, tests/test_contracts.py)."""
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from speedpipe.config import load_config
from speedpipe.stages import STAGES


class Recorder:
    """Wraps module.name (a function or class the stage calls) and keeps the arguments of every call."""

    def __init__(self, monkeypatch, module, name):
        self.calls, original = [], getattr(module, name)

        def recording(*args, **kwargs):
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)


def _photos(folder, seed, count=24, broken=False):
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"c{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(path)
    if broken:
        (folder / "c0" / "broken.png").write_bytes(b"not a png")
    return folder


def inputs_in(tmp_path_factory):
    """Everything the stages read, made once by the stages themselves. With SPEEDPIPE_SETTINGS_INPUTS (the mutation
    check sets it), made in that folder once, by the unchanged code, and reused: a mutated stage never makes the inputs
    of its own test."""
    import os

    shared = os.environ.get("SPEEDPIPE_SETTINGS_INPUTS")
    if shared and (Path(shared) / "inputs.json").is_file():
        return {k: Path(v) for k, v in json.loads((Path(shared) / "inputs.json").read_text()).items()}
    root = Path(shared) if shared else tmp_path_factory.mktemp("settings")
    paths = make_inputs(root)
    (root / "inputs.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def make_inputs(root) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    from diffusers import AutoencoderKL

    from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config
    from speedpipe.models.dit import DiT_models

    paths = {"root": root, "A": _photos(root / "A", 0), "B": _photos(root / "B", 1), "S": _photos(root / "S", 2, broken=True)}
    for name, seed in (("ae_A", 0), ("ae_B", 1)):
        torch.manual_seed(seed)
        save_tiny_autoencoder(AutoencoderKL(**tiny_autoencoder_config([8, 8, 8], 4)), 0.8, root / f"{name}.safetensors")
        paths[name] = root / f"{name}.safetensors"
    torch.manual_seed(123)  # not the train stage's own initialisation (seed 0)
    torch.save(DiT_models["DiT-T/4"](input_size=8, in_channels=4, num_classes=3).state_dict(), root / "init.pt")
    paths["init"] = root / "init.pt"
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump(BASE, sort_keys=False))
    paths["base"] = base

    def stage(name, *overrides):
        cfg = load_config(base, [f"output_dir={root / 'made'}", *overrides], phase=STAGES[name].phase)
        return STAGES[name].run(cfg)

    for store, images in (("store_A", "A"), ("store_B", "B")):
        paths[store] = stage("encode", f"data.root={paths[images]}", f"autoencoder.path={paths['ae_A']}",
                             f"data.latents_dir={root / store}")
    latents = ["data.source=latents", f"data.latents_dir={paths['store_A']}", "model.name=DiT-T/2", "model.input_size=4"]
    for teacher, seed in (("teacher_A", 0), ("teacher_B", 1)):
        run_dir = stage("train", *latents, f"seed={seed}", f"trainer.run_dir={root / teacher}")
        paths[teacher] = run_dir / "ckpt-0000002.pt"
    state = torch.load(paths["teacher_A"], weights_only=True)
    state["ema"] = {k: v * float("nan") for k, v in state["ema"].items()}
    torch.save(state, root / "teacher_nan.pt")
    paths["teacher_nan"] = root / "teacher_nan.pt"
    paths["student"] = stage("distill", *DISTILL, f"distill.teacher={paths['teacher_A']}", f"data.latents_dir={paths['store_A']}",
                             f"distill.run_dir={root / 'student'}") / "ckpt-0000002.pt"
    for name, seed in (("classifier_A", 0), ("classifier_B", 1)):
        out = stage("classifier", f"data.root={paths['A']}", f"seed={seed}", "eval.classifier_steps=3", f"experiment={name}")
        paths[name] = out / "model.safetensors"
    paths["reference"] = stage("reference", f"data.root={paths['A']}", "eval.extractor=classifier",
                               f"eval.classifier_weights={paths['classifier_A']}", f"eval.reference={root / 'stats.pt'}")
    stats = torch.load(paths["reference"], weights_only=True)
    np.savez(root / "adm.npz", mu=stats["mu"].numpy(), sigma=stats["sigma"].numpy())
    paths["adm"] = root / "adm.npz"
    paths["samples"] = stage("sample", *SAMPLE, f"sampling.checkpoint={paths['teacher_A']}", f"autoencoder.path={paths['ae_A']}",
                             f"sampling.out={root / 'samples.npz'}")
    paths["samples_B"] = stage("sample", *SAMPLE, f"sampling.checkpoint={paths['teacher_B']}", f"autoencoder.path={paths['ae_A']}",
                               f"sampling.out={root / 'samples_B.npz'}")
    (root / "empty.pth").write_bytes(b"")
    paths["broken_weights"] = root / "empty.pth"
    return paths


BASE = {  # what every run starts from; each stage's base and each case override it
    "experiment": "x",
    "data": {"name": "image_folder", "image_size": 16, "random_flip": True, "synthetic_size": 32},
    "autoencoder": {"name": "tiny", "block_out_channels": [8, 8, 8], "latent_channels": 4, "steps": 2, "batch_size": 4,
                    "log_every": 1, "ckpt_every": 2, "progress": False},
    "encode": {"shard_size": 16, "dtype": "fp32", "batch_size": 8, "device": "cpu", "progress": False},
    "model": {"name": "DiT-T/4", "input_size": 8, "in_channels": 4, "num_classes": 3, "class_dropout_prob": 0.1},
    "diffusion": {"timestep_sampler": {"name": "uniform"}, "loss_weighting": {"name": "none"}},
    "optim": {"lr": 1.0e-3},
    "trainer": {"steps": 2, "global_batch_size": 8, "ema_decay": 0.9, "log_every": 1, "ckpt_every": 2, "device": "cpu",
                "progress": False},
    "distill": {"progress": False, "device": "cpu"},
    "sampling": {"progress": False, "device": "cpu"},
    "eval": {"device": "cpu", "batch_size": 8, "classifier_batch_size": 8, "classifier_steps": 3},
}
DISTILL = ["data.source=latents", "distill.warm_start_steps=1", "distill.steps=1", "distill.global_batch_size=8",
           "distill.log_every=1", "distill.ckpt_every=2", "distill.tangent_warmup=2"]
SAMPLE = ["autoencoder.name=tiny", "sampling.sampler=ddim5", "sampling.num_samples=6", "sampling.batch_size=3"]

