"""Every setting a stage reads changes what it writes.

For every stage of the registry (speedpipe.stages) and every config key it reads (its `reads`, sections expanded to
their keys), the stage runs twice on tiny inputs, in its own sandbox folder: with the case's context, then with the key
changed to another valid value. What it writes must differ: a file's content (checkpoint tensors, latents, samples,
metrics, logs; provenance files, timings and the sandbox's own path left out) or where it writes; a stage that stops
counts by its error. A stage that ignored the key -- or read its default instead -- writes the same twice:
`python tests/mutation_check.py --keys` injects exactly that defect, key by key, where the stage reads its config
(`Stage.view`), and runs that key's test here. A key added to a stage's reads without a case below fails
`test_every_read_key_has_a_case`, so it is covered by construction. The few keys whose change cannot show on a CPU are
listed in NOT_ON_CPU with the reason, and checked to change nothing here; inference batch sizes (BATCHING), whose
effect on the bits depends on the machine's kernels, are checked to reach the stage's data loaders.
"""
import filecmp
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO
from stage_inputs import DISTILL, SAMPLE, Recorder
from speedpipe.config import load_config
from speedpipe.config_schema import Config
from speedpipe.config import leaves
from speedpipe.stages import STAGES

NOT_ON_CPU = {  # (stage, key) -> why its change cannot show on a CPU (tests assert that it indeed changes nothing here)
    ("train", "trainer.device"): "auto is the CPU on a machine without CUDA",
    ("train", "trainer.tf32"): "TF32 matmuls exist only on CUDA",
    ("distill", "distill.device"): "auto is the CPU on a machine without CUDA",
    ("encode", "encode.device"): "auto is the CPU on a machine without CUDA",
    ("sample", "sampling.device"): "auto is the CPU on a machine without CUDA",
    ("reference", "eval.device"): "auto is the CPU on a machine without CUDA",
    ("evaluate", "eval.device"): "auto is the CPU on a machine without CUDA",
}
BATCHING = {  # (stage, key): a batch size of inference only. Whether it changes the bits depends on the machine's
    # kernels (this CPU's convolutions give each image the same bits in any batch, another 2-core CPU's do not; cuDNN
    # picks algorithms by batch size), so its test is that the value reaches the stage's data loaders
    ("encode", "encode.batch_size"), ("reference", "eval.batch_size"), ("evaluate", "eval.batch_size"),
}
STOPS = {  # key, or stage:key -> (the run of its case that stops: before, after or both; why: the inputs are made for
    # it); every other run must not stop
    "data.strict": ("after", "strict reading of a folder with an unreadable photo"),
    "eval.extractor": ("after", "Inception-v3 from a weights file that is no Inception state dict"),
    "eval.inception_weights": ("both", "two weights files that do not exist: the error names the one read"),
    "evaluate:eval.reference": ("after", "reference statistics that do not exist (the reference stage writes them)"),
    "autoencoder.name": ("after", "the pretrained VAE, not in the (empty) Hugging Face cache, or not trainable"),
    "distill.skip_nonfinite": ("before", "a NaN teacher stops sCD unless non-finite steps are skipped"),
    "evaluate:eval.classifier_weights": ("after", "reference statistics made with the other classifier's features: "
                                                  "evaluation refuses them"),
}
NOT_RUN = {  # key -> why it has no test here (the mutation check lists it as not pinned, with this reason)
    "trainer.compile": "torch.compile of the DiT takes minutes on this CPU; its effect (rounding) is measured by "
                       "benchmarks/train_step.py --compile on a GPU",
}


# stage -> (the stage's base overrides, given the inputs), and its cases: key -> (another value, context overrides)
STAGE_BASE = {
    "autoencoder": lambda p: [f"data.root={p['A']}"],
    "encode": lambda p: [f"data.root={p['A']}", f"autoencoder.path={p['ae_A']}"],
    "classifier": lambda p: [f"data.root={p['A']}", "eval.classifier_steps=3", "eval.classifier_batch_size=8"],
    "reference": lambda p: [f"data.root={p['A']}", "eval.extractor=classifier", f"eval.classifier_weights={p['classifier_A']}"],
    "train": lambda p: ["data.source=synthetic"],
    "distill": lambda p: [*DISTILL, f"distill.teacher={p['teacher_A']}", f"data.latents_dir={p['store_A']}"],
    "sample": lambda p: [*SAMPLE, f"sampling.checkpoint={p['teacher_A']}", f"autoencoder.path={p['ae_A']}", "sampling.out=s/out.npz"],
    "evaluate": lambda p: ["eval.extractor=classifier", f"eval.classifier_weights={p['classifier_A']}", f"eval.reference={p['reference']}",
                           f"eval.samples={p['samples']}", "eval.out=m/out.json"],
}
IMAGES = lambda p: {  # noqa: E731 -- the keys of data.images.open_image_dataset, in every stage that reads images
    "data.name": ("mnist5k", ["data.image_size=32"]),
    "data.root": (p["B"], []),
    "data.image_size": (20, []),
    "data.mnist_fit": ("resize", ["data.name=mnist5k", "data.image_size=32"]),
    "data.strict": (True, [f"data.root={p['S']}"]),
}
IDENTITY = {"experiment": ("y", []), "output_dir": ("out2", [])}  # output_dir is relative to the run's sandbox
CASES = {
    "autoencoder": lambda p: {
        **IDENTITY, **IMAGES(p), "seed": (1, []),
        "autoencoder.name": ("sd-vae-ft-ema", []), "autoencoder.block_out_channels": ([8, 16, 8], []),
        "autoencoder.latent_channels": (3, []), "autoencoder.steps": (3, []), "autoencoder.batch_size": (6, []),
        "autoencoder.lr": (1.0e-2, []), "autoencoder.kl_weight": (1.0, []), "autoencoder.log_every": (2, []),
        "autoencoder.ckpt_every": (1, []),
    },
    "encode": lambda p: {
        **IDENTITY, **IMAGES(p), "seed": (1, []), "data.latents_dir": ("lat", []),
        "autoencoder.name": ("sd-vae-ft-ema", []), "autoencoder.path": (p["ae_B"], []),
        "encode.mode": ("posterior", []), "encode.shard_size": (8, []), "encode.dtype": ("fp16", []),
        "encode.batch_size": (5, []), "encode.device": ("auto", []), "encode.precision": ("bf16", []),
    },
    "classifier": lambda p: {
        **IDENTITY, **IMAGES(p), "seed": (1, []), "eval.classifier_steps": (4, []), "eval.classifier_batch_size": (6, []),
        "eval.classifier_lr": (1.0e-2, []),
    },
    "reference": lambda p: {
        **IDENTITY, **{k: v for k, v in IMAGES(p).items()}, "data.mnist_fit": ("resize", ["data.name=mnist5k", "data.image_size=32",
                                                                                             "eval.reference_max_images=24"]),
        "data.name": ("mnist5k", ["data.image_size=32", "eval.reference_max_images=24"]),
        "eval.extractor": ("inception-v3-compat", [f"eval.inception_weights={p['broken_weights']}"]),
        "eval.inception_weights": (p["root"] / "missing-B.pth", ["eval.extractor=inception-v3-compat",
                                                                 f"eval.inception_weights={p['root'] / 'missing-A.pth'}"]),
        "eval.classifier_weights": (p["classifier_B"], []), "eval.reference": ("ref/stats.pt", []),
        "eval.reference_npz": (p["adm"], []), "eval.reference_max_images": (10, []), "eval.batch_size": (5, []),
        "eval.device": ("auto", []),
    },
    "train": lambda p: {
        **IDENTITY, "method": ("other", []), "seed": (1, []),
        "data.source": ("latents", [f"data.latents_dir={p['store_A']}", "model.input_size=4"]),
        "data.latents_dir": (p["store_B"], ["data.source=latents", f"data.latents_dir={p['store_A']}", "model.input_size=4"]),
        "data.random_flip": (False, []), "data.latent_norm": ("channel", []), "data.synthetic_size": (48, []),
        "model.name": ("DiT-T/2", []), "model.input_size": (4, []), "model.in_channels": (3, []), "model.num_classes": (5, []),
        "model.class_dropout_prob": (0.5, []), "model.fused_attn": (False, []), "model.init_from": (p["init"], []),
        "diffusion.noise_schedule": ("cosine", []), "diffusion.diffusion_steps": (500, []), "diffusion.learn_sigma": (False, []),
        "diffusion.timestep_sampler.name": (Mapping(name="speed", k=5, tau=700), []),
        "diffusion.timestep_sampler.k": (25, ["diffusion.timestep_sampler={name: speed, k: 5, tau: 700}"]),
        "diffusion.timestep_sampler.tau": (300, ["diffusion.timestep_sampler={name: speed, k: 5, tau: 700}"]),
        "diffusion.timestep_sampler.dual": (False, ["diffusion.timestep_sampler={name: speed, k: 5, tau: 700, dual: true}"]),
        "diffusion.timestep_sampler.p_mean": (0.5, ["diffusion.timestep_sampler={name: lognormal, p_mean: -1.2, p_std: 1.2}"]),
        "diffusion.timestep_sampler.p_std": (0.4, ["diffusion.timestep_sampler={name: lognormal, p_mean: -1.2, p_std: 1.2}"]),
        "diffusion.timestep_sampler.m": (1.0, ["diffusion.timestep_sampler={name: logit_normal, m: 0.0, s: 1.0}"]),
        "diffusion.timestep_sampler.s": (0.5, ["diffusion.timestep_sampler={name: logit_normal, m: 0.0, s: 1.0}"]),
        "diffusion.timestep_sampler.mu": (700, ["diffusion.timestep_sampler={name: clts, mu: 300, sigma: 100, ramp_steps: 2}"]),
        "diffusion.timestep_sampler.sigma": (20, ["diffusion.timestep_sampler={name: clts, mu: 300, sigma: 100, ramp_steps: 2}"]),
        "diffusion.timestep_sampler.ramp_steps": (100, ["diffusion.timestep_sampler={name: clts, mu: 300, sigma: 100, ramp_steps: 2}"]),
        "diffusion.loss_weighting.name": (Mapping(name="min_snr", gamma=5.0), []),
        "diffusion.loss_weighting.b": (3.0, ["diffusion.loss_weighting={name: sigmoid, b: 0.0}"]),
        "diffusion.loss_weighting.lam": (0.9, ["diffusion.loss_weighting={name: speed, lam: 0.6, tau: 700}"]),
        "diffusion.loss_weighting.tau": (300, ["diffusion.loss_weighting={name: speed, lam: 0.6, tau: 700}"]),
        "diffusion.loss_weighting.k": (5.0, ["diffusion.loss_weighting={name: p2, k: 1.0, gamma: 1.0}"]),
        "diffusion.loss_weighting.gamma": (0.5, ["diffusion.loss_weighting={name: min_snr, gamma: 5.0}"]),
        "optim.lr": (1.0e-2, []), "optim.weight_decay": (0.5, []), "optim.betas": ([0.5, 0.9], []), "optim.eps": (1.0e-2, []),
        "optim.grad_clip": (1.0e-3, []), "optim.warmup_steps": (2, []), "optim.fused": (False, []),
        "trainer.steps": (3, []), "trainer.global_batch_size": (16, []), "trainer.ema_decay": (0.5, []),
        "trainer.log_every": (2, []), "trainer.ckpt_every": (1, []), "trainer.ckpt_steps": ([1], []),
        "trainer.precision": ("bf16", []), "trainer.compile": (True, []), "trainer.tf32": (False, []), "trainer.device": ("auto", []),
        "trainer.run_dir": ("runs/custom", []),
    },
    "distill": lambda p: {
        **IDENTITY, "seed": (1, []),
        "data.source": ("synthetic", []), "data.latents_dir": (p["store_B"], []), "data.random_flip": (False, []),
        "data.synthetic_size": (40, ["data.source=synthetic"]),
        "distill.teacher": (p["teacher_B"], []), "distill.sigma_d": (1.0, []), "distill.time_scale": (3.0, []),
        "distill.warm_start_steps": (2, []), "distill.warm_start_target": ("data", []), "distill.p_mean": (0.5, []),
        "distill.p_std": (0.3, []), "distill.tangent_warmup": (5, []), "distill.tangent_c": (5.0, []),
        "distill.cfg_scale": (3.0, []), "distill.steps": (2, []), "distill.global_batch_size": (16, []), "distill.lr": (1.0e-2, []),
        "distill.betas": ([0.5, 0.9], []), "distill.ema_decay": (0.5, []),
        "distill.log_every": (2, ["distill.steps=3"]), "distill.ckpt_every": (1, ["distill.steps=3"]),  # (the warm start and
        "distill.ckpt_steps": ([3], ["distill.steps=3"]), "distill.precision": ("bf16", []),           # the end: checkpoints)
        "distill.skip_nonfinite": (True, [f"distill.teacher={p['teacher_nan']}"]), "distill.run_dir": ("runs/student", []),
        "distill.device": ("auto", []), "distill.method": ("sct", []),
        # MeanFlow's section, read by its jobs: a case runs the method (guidance keys with guidance on)
        **{f"distill.meanflow.{key}": (value, ["distill.method=meanflow", *context]) for key, (value, context) in {
            "p_mean": (0.5, []), "p_std": (0.3, []), "r_neq_t": (1.0, []), "adaptive_p": (0.0, []), "adaptive_c": (10.0, []),
            "omega": (2.0, []), "kappa": (0.5, []), "guidance_t": ([0.5, 1.0], ["distill.meanflow.omega=2.0"]),
            "label_dropout": (0.5, [])}.items()},
        # without a teacher the student is the run's own DiT on latents normalised per data.latent_norm
        **{key: (value, ["distill.teacher=null", "distill.method=sct", "distill.warm_start_target=data", "data.source=synthetic"])
           for key, value in {"model.name": "DiT-T/2", "model.input_size": 4, "model.in_channels": 3, "model.num_classes": 5,
                              "model.class_dropout_prob": 0.0, "model.fused_attn": False, "model.init_from": p["init"],
                              "diffusion.learn_sigma": False, "data.latent_norm": "channel"}.items()},
    },
    "sample": lambda p: {
        "experiment": ("y", ["sampling.out=null", "autoencoder.path=null"]),
        "output_dir": ("out2", ["sampling.out=null", "autoencoder.path=null"]),
        "autoencoder.name": ("sd-vae-ft-ema", []), "autoencoder.path": (p["ae_B"], []),
        "sampling.checkpoint": (p["teacher_B"], []), "sampling.sampler": ("ddpm5", []), "sampling.ddim_eta": (1.0, []),
        "sampling.cfg_scale": (3.0, []), "sampling.dit_compat": (True, ["sampling.cfg_scale=100.0"]), "sampling.use_ema": (False, []),  # (cfg 100: a 2-step teacher barely conditions)
        "sampling.num_samples": (4, []), "sampling.batch_size": (2, []), "sampling.labels": ("random", []),
        "sampling.seed": (1, []), "sampling.scm_mid_t": (0.5, [f"sampling.checkpoint={p['student']}", "sampling.sampler=scm2"]),
        "sampling.out": ("s/other.npz", []), "sampling.device": ("auto", []), "sampling.precision": ("bf16", []),
    },
    "evaluate": lambda p: {
        "experiment": ("y", ["eval.reference=null"]), "output_dir": ("out2", ["eval.reference=null"]),
        "eval.extractor": ("inception-v3-compat", [f"eval.inception_weights={p['broken_weights']}"]),
        "eval.inception_weights": (p["root"] / "missing-B.pth", ["eval.extractor=inception-v3-compat",
                                                                 f"eval.inception_weights={p['root'] / 'missing-A.pth'}"]),
        "eval.classifier_weights": (p["classifier_B"], ["eval.label_accuracy=true"]),
        "eval.reference": (p["root"] / "missing-stats.pt", []), "eval.samples": (p["samples_B"], []),
        "eval.out": ("m/other.json", []), "eval.metrics": (["fid", "kid"], []), "eval.label_accuracy": (True, []),
        "eval.batch_size": (4, []), "eval.kid_subset_size": (3, []), "eval.device": ("auto", []),
    },
}
PLACED = {  # stage -> the inputs a run whose paths are null finds where the layout puts them (under its sandbox)
    "sample": lambda p, layout: [(p["ae_A"], layout.autoencoder_dir() / "model.safetensors")],
    "evaluate": lambda p, layout: [(p["reference"], layout.reference("classifier"))],
}


def read_keys(stage) -> list[str]:
    from omegaconf import OmegaConf

    keys = leaves(OmegaConf.to_container(OmegaConf.structured(Config)))
    entry = STAGES[stage]
    return [k for k in keys if any(k == r or k.startswith(r + ".") for r in entry.reads) and k not in entry.uses]


READ = [(stage, key) for stage in CASES for key in read_keys(stage)]
ALL = [(stage, key) for stage, key in READ if key not in NOT_RUN]


def test_every_read_key_has_a_case():
    """Every key a stage reads (now, or added to its reads later) has a case here: a test pins it."""
    fake = {k: f"<{k}>" for k in ("A", "B", "S", "ae_A", "ae_B", "init", "store_A", "store_B", "teacher_A", "teacher_B",
                                  "teacher_nan", "student", "classifier_A", "classifier_B", "reference", "adm", "samples",
                                  "samples_B", "broken_weights")}
    fake["root"] = REPO  # only joined with file names
    missing = [(s, k) for s, k in READ if k not in CASES[s](fake)]
    assert not missing, f"read keys without a case in tests/test_settings.py: {missing}"
    assert set(STAGES) - set(CASES) == {"report"}  # the report's config is the experiment's (tests/test_report.py)


def _digest(value) -> str:
    return hashlib.sha256(value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


PROVENANCE = ("config", "teacher_config", "settings")  # what a checkpoint records of how it was made


def _tensors(obj):
    """A checkpoint's content without its provenance (the configs, the settings a resumed run must share): a key the
    stage ignores would still change them."""
    if isinstance(obj, torch.Tensor):
        return _digest(obj.detach().contiguous().cpu().numpy().tobytes() + str(obj.dtype).encode() + str(tuple(obj.shape)).encode())
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in sorted(obj.items()) if k not in PROVENANCE}
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj]
    return obj


TIMING = ("seconds", "_per_s", "per_image", "_s_rank0")


def _json(obj, sandbox):
    if isinstance(obj, dict):
        return {k: _json(v, sandbox) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [_json(v, sandbox) for v in obj]
    return obj.replace(str(sandbox), "<run>") if isinstance(obj, str) else obj


def _shard_metadata(metadata):
    """A safetensors file's metadata without a latent shard's provenance (what it was made from and with)."""
    if metadata and "speedpipe" in metadata:
        info = json.loads(metadata["speedpipe"])
        return {**metadata, "speedpipe": {k: v for k, v in info.items() if k not in ("dataset", "encoder", "settings")}}
    return metadata


def fingerprint(sandbox) -> dict:
    """What a run wrote: path (relative to its sandbox) -> content digest; provenance files, events and timings left out."""
    import csv
    import io

    from safetensors import safe_open

    out = {}
    for path in sorted(p for p in sandbox.rglob("*") if p.is_file()):
        # a run store's state folder is named by its identity (provenance: the settings, a device included), its record
        # of them and the lock are provenance too; what the state holds is compared
        rel = re.sub(r"/store/[0-9a-f]{12}/", "/store/STATE/", str(path.relative_to(sandbox)))
        if path.suffix == ".yaml" or path.name in ("events.csv", ".lock", "current", "settings.json"):
            continue
        if path.suffix == ".pt":
            out[rel] = _digest(_tensors(torch.load(path, weights_only=True)))
        elif path.name == "manifest.json":  # a latent store's: its shards' checksums cover their provenance too
            manifest = json.loads(path.read_text())
            manifest["shards"] = [{k: v for k, v in shard.items() if k != "sha256"} for shard in manifest["shards"]]
            out[rel] = _digest(_json(manifest, sandbox))
        elif path.suffix == ".json":
            out[rel] = _digest(_json(json.loads(path.read_text()), sandbox))
        elif path.suffix == ".csv":
            rows = [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in csv.DictReader(io.StringIO(path.read_text()))]
            out[rel] = _digest(rows)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                out[rel] = _digest([_json(_shard_metadata(f.metadata()), sandbox), {k: _tensors(f.get_tensor(k)) for k in f.keys()}])
        elif path.suffix == ".npz":
            with np.load(path) as npz:
                out[rel] = _digest({k: _digest(npz[k].tobytes()) for k in npz.files})
        else:
            out[rel] = _digest(path.read_bytes())
    return out


def run_case(stage, inputs, overrides, sandbox) -> dict:
    """The stage's outputs in a fresh sandbox (or the error it stopped with); the inputs placed there left out unless
    the stage changed them."""
    from speedpipe.layout import Layout

    sandbox.mkdir(parents=True)
    cfg = load_config(inputs["base"], [*STAGE_BASE[stage](inputs), *overrides], phase=STAGES[stage].phase)
    for key in ("output_dir", "trainer.run_dir", "distill.run_dir", "sampling.out", "eval.out", "eval.reference", "data.latents_dir"):
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value is not None and not str(value).startswith("/"):  # relative paths: inside the run's sandbox
            *parents, leaf = key.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[leaf] = str(sandbox / value)
    placed = PLACED.get(stage, lambda p, layout: [])(inputs, Layout.of(cfg))
    for source, target in placed:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    try:
        STAGES[stage].run(cfg)
    except Exception as err:
        return {"stopped": type(err).__name__, "message": str(err).replace(str(sandbox), "<run>")}
    unchanged = {str(target.relative_to(sandbox)) for source, target in placed if filecmp.cmp(source, target, shallow=False)}
    return {path: digest for path, digest in fingerprint(sandbox).items() if path not in unchanged}  # not its inputs


class Mapping(dict):
    """A case's value for a key whose section must change with it (a sampler's name and its parameters): the override
    replaces the whole section."""


def _override(key, value) -> str:
    if isinstance(value, Mapping):
        section = key.rsplit(".", 1)[0]
        return f"{section}={{{', '.join(f'{k}: {v}' for k, v in value.items())}}}"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, list):
        return f"{key}=[{','.join(map(str, value))}]"
    return f"{key}={value}"


def _batch_size(call) -> int:
    """The batch size a recorded DataLoader(dataset, batch_size=1, ...) call asked for."""
    args, kwargs = call
    return kwargs.get("batch_size", args[1] if len(args) > 1 else 1)


@pytest.mark.parametrize("stage,key", ALL, ids=[f"{s}:{k}" for s, k in ALL])
def test_a_setting_changes_what_its_stage_writes(stage, key, inputs, tmp_path, monkeypatch):
    value, context = CASES[stage](inputs)[key]
    if (stage, key) in BATCHING:
        loaders = Recorder(monkeypatch, torch.utils.data, "DataLoader")  # the real loaders, their arguments kept
        before = run_case(stage, inputs, context, tmp_path / "before")
        default, loaders.calls[:] = [_batch_size(c) for c in loaders.calls], []
        after = run_case(stage, inputs, [*context, _override(key, value)], tmp_path / "after")
        sizes = [_batch_size(c) for c in loaders.calls]
        assert "stopped" not in before and "stopped" not in after, (before, after)
        assert set(sizes) == {value} and value not in default and default, (key, value, default, sizes)  # every loader
        return
    before = run_case(stage, inputs, context, tmp_path / "before")
    after = run_case(stage, inputs, [*context, _override(key, value)], tmp_path / "after")
    for run, outputs in (("before", before), ("after", after)):  # a stage that misreads a key may stop where it should run
        stops = STOPS.get(f"{stage}:{key}", STOPS.get(key, ("",)))[0]
        assert ("stopped" in outputs) == (stops in (run, "both")), (run, outputs)
    if (stage, key) in NOT_ON_CPU:
        assert before == after, f"{key} changed the outputs on the CPU: NOT_ON_CPU's reason no longer holds"
        return
    assert before != after, f"stage {stage!r}: {key}={value!r} (context {context}) left every output unchanged"
