"""Settings applied the right way round, and the contracts between stages.

- Each stage passes a directional setting (a rate, a signed or scale parameter, a choice, a pair) to the library as
  given: recorded where the stage calls the library, against the config (a stage that passed 1 - decay, -p_mean,
  another choice or the pair swapped fails; the library's own formulas are tested in test_diffusion, test_timesteps,
  test_consistency). `tests/mutation_check.py` injects those defects at the stage's view of its config.
- What one stage writes, the next reads back and interprets the same way: image layout, pixel scale and orientation
  (reference vs evaluate), latent scale and mirror (encode vs the autoencoder), the latent normalisation (train vs
  sample), the labels (sample vs evaluate), the random stream of a seed.
"""
import json

import numpy as np
from PIL import Image
import pytest
import torch

from speedpipe.config import load_config
from speedpipe.stages import STAGES
from stage_inputs import DISTILL, SAMPLE, Recorder


def run(stage, inputs, *overrides, tmp=None):
    cfg = load_config(inputs["base"], [f"output_dir={tmp}", *overrides], phase=STAGES[stage].phase)
    return cfg, STAGES[stage].run(cfg)


TRAIN = ["data.source=synthetic"]
DISTILL_RUN = lambda p: [*DISTILL, f"distill.teacher={p['teacher_A']}", f"data.latents_dir={p['store_A']}"]  # noqa: E731
SAMPLE_RUN = lambda p: [*SAMPLE, f"sampling.checkpoint={p['teacher_A']}", f"autoencoder.path={p['ae_A']}"]  # noqa: E731
# (stage, key, a non-default value, where the stage passes it: module, callable, which argument), the overrides of the run
PLUMBING = [
    ("train", "trainer.ema_decay", 0.7, "speedpipe.stages.train", "update_ema", 2, TRAIN),
    ("train", "model.class_dropout_prob", 0.3, "speedpipe.stages.train", "StepRandomness", 3, TRAIN),
    ("train", "data.random_flip", False, "speedpipe.stages.train", "StepRandomness", 4, TRAIN),
    ("train", "trainer.precision", "bf16", "speedpipe.stages.train", "hybrid_loss", 8, TRAIN),
    ("train", "optim.grad_clip", 0.2, "speedpipe.stages.train", "optimizer_step", 3, TRAIN),
    ("train", "trainer.global_batch_size", 16, "speedpipe.stages.train", "EpochBatches", 1, TRAIN),
    ("train", "diffusion.noise_schedule", "cosine", "speedpipe.stages.train", "create_diffusion", "noise_schedule", TRAIN),
    ("train", "diffusion.learn_sigma", False, "speedpipe.stages.train", "create_diffusion", "learn_sigma", TRAIN),
    ("distill", "distill.ema_decay", 0.7, "speedpipe.stages.distill", "update_ema", 2, None),
    ("distill", "distill.sigma_d", 0.8, "speedpipe.stages.distill", "TimeProposal", 0, None),
    ("distill", "distill.p_mean", -0.3, "speedpipe.stages.distill", "TimeProposal", 1, None),
    ("distill", "distill.p_std", 0.9, "speedpipe.stages.distill", "TimeProposal", 2, None),
    ("distill", "distill.warm_start_target", "data", "speedpipe.stages.distill", "TrigFlowDiffusionLoss", 1, None),
    ("distill", "distill.precision", "bf16", "speedpipe.consistency.methods.scd", "SCDLoss", 3, None),
    ("distill", "distill.tangent_warmup", 7, "speedpipe.consistency.methods.scd", "SCDLoss", 1, None),
    ("distill", "distill.tangent_c", 0.3, "speedpipe.consistency.methods.scd", "SCDLoss", 2, None),
    ("distill", "distill.method", "sct", "speedpipe.stages.distill", "consistency_method", 0, None),
    ("distill", "distill.time_scale", 2.0, "speedpipe.stages.distill", "TrigFlowStudent", 2, None),
    ("sample", "sampling.cfg_scale", 2.5, "speedpipe.stages.sample", "cfg_model_fn", 2, None),
    ("sample", "sampling.labels", "random", "speedpipe.stages.sample", "make_labels", 2, None),
    ("sample", "sampling.precision", "bf16", "speedpipe.stages.sample", "torch.autocast", "enabled", None),
]


@pytest.mark.parametrize("stage,key,value,module,name,argument,overrides", PLUMBING, ids=[f"{p[0]}:{p[1]}" for p in PLUMBING])
def test_a_stage_passes_a_directional_setting_as_given(stage, key, value, module, name, argument, overrides, inputs, tmp_path,
                                                       monkeypatch):
    import importlib

    target = importlib.import_module(module)
    if name == "torch.autocast":  # recorded as whether the network's autocast is on
        target, name = torch, "autocast"
    recorder = Recorder(monkeypatch, target, name)
    base = overrides if overrides is not None else {"distill": DISTILL_RUN, "sample": SAMPLE_RUN}[stage](inputs)
    extra = [f"sampling.out={tmp_path / 's.npz'}"] if stage == "sample" else []
    literal = str(value).lower() if isinstance(value, bool) else value
    run(stage, inputs, *base, *extra, f"{key}={literal}", tmp=tmp_path)
    assert recorder.calls, f"{module}.{name} was not called"
    seen = [c[0][argument] if isinstance(argument, int) else c[1].get(argument) for c in recorder.calls]
    expected = True if name == "autocast" else value  # bf16 asked: the network's autocast is on
    assert expected in seen, f"{stage} passed {key} as {seen}, the config says {value!r}"


def test_the_ema_moves_towards_the_weights_by_one_minus_its_decay():
    from speedpipe.training import update_ema

    ema, model = [torch.zeros(3)], [torch.ones(3)]
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema[0], torch.full((3,), 0.1))  # 0.9 * 0 + 0.1 * 1


def _marked_photos(folder, count=24):
    """Noisy photos with a bright L in the top-left corner: a mirrored or transposed reading of them is another
    distribution (the uniform noise of the stage inputs is its own mirror image as a distribution)."""
    rng = np.random.default_rng(5)
    for i in range(count):
        pixels = rng.integers(0, 96, (20, 18, 3), dtype=np.uint8)
        pixels[:3, :14], pixels[:10, :3] = 255, 255
        path = folder / f"c{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return folder


def test_real_images_evaluated_as_samples_match_their_own_reference(inputs, tmp_path):
    """The reference stage's pixels (the dataset) and the evaluate stage's (a samples npz, NHWC uint8, as the sample
    stage writes it) go through the extractor the same way: the images as samples are at FID ~0 of their reference,
    with precision and recall 1. A transposed or mirrored reading on one side moves them."""
    from speedpipe.data.images import ImageFolder, to_uint8
    from speedpipe.data.samples import write_npz

    folder = _marked_photos(tmp_path / "marked")
    dataset = ImageFolder(folder, 16)
    images = to_uint8(torch.stack([dataset[i][0] for i in range(len(dataset))])).numpy()
    labels = np.array([dataset[i][1] for i in range(len(dataset))])
    reference = tmp_path / "stats.pt"
    run("reference", inputs, f"data.root={folder}", "eval.extractor=classifier", f"eval.classifier_weights={inputs['classifier_A']}",
        f"eval.reference={reference}", tmp=tmp_path)
    fids = {}
    for variant, array in (("as written", images), ("mirrored", images[:, :, ::-1]), ("transposed", images.transpose(0, 2, 1, 3))):
        write_npz(tmp_path / f"{variant}.npz", np.ascontiguousarray(array), labels)
        _, out = run("evaluate", inputs, "eval.extractor=classifier", f"eval.classifier_weights={inputs['classifier_A']}",
                     f"eval.reference={reference}", f"eval.samples={tmp_path / f'{variant}.npz'}", f"eval.out={tmp_path / f'{variant}.json'}",
                     tmp=tmp_path)
        metrics = json.loads(out.read_text())["metrics"]
        fids[variant] = metrics["frechet_inception_distance"]
        if variant == "as written":
            assert abs(fids[variant]) < 1e-3 and metrics["precision"] == metrics["recall"] == 1.0, metrics
    # rounding against a wrong reading (measured: 6e-12 as written; 3e-3 mirrored, 1.5e-3 transposed with this briefly
    # trained classifier's small features)
    assert min(fids["mirrored"], fids["transposed"]) > max(1e3 * abs(fids["as written"]), 1e-4), fids


def test_the_latent_store_holds_the_scaled_posterior_of_each_image_and_its_mirror(inputs, tmp_path):
    """encode (posterior mode) -> the store: mean[:, 0] = scale x the autoencoder's posterior mean of the image,
    mean[:, 1] = that of its mirror, labels = the class folders' indices; what training and sampling decode by."""
    from speedpipe.data.images import ImageFolder
    from speedpipe.data.latents import LatentStore
    from speedpipe.models.autoencoder import load_tiny_autoencoder

    _, out = run("encode", inputs, f"data.root={inputs['A']}", f"autoencoder.path={inputs['ae_A']}", "encode.mode=posterior",
                 f"data.latents_dir={tmp_path / 'lat'}", tmp=tmp_path)
    store, dataset = LatentStore(out), ImageFolder(inputs["A"], 16)
    vae, scale = load_tiny_autoencoder(inputs["ae_A"])
    assert store.scale_factor == scale
    idx = torch.arange(len(dataset))
    for mirror in (False, True):
        z, y = store.get_batch(idx, torch.full((len(idx),), mirror), eps=torch.zeros(len(idx), *store.latent_shape))
        x = torch.stack([dataset[i][0] for i in idx])
        with torch.no_grad():
            expected = vae.encode(x.flip(-1) if mirror else x).latent_dist.mean * scale
        assert torch.allclose(z, expected, atol=1e-5), mirror
        assert y.tolist() == [dataset[i][1] for i in idx]


def test_sampling_undoes_the_normalisation_training_applied(inputs, tmp_path, monkeypatch):
    """train (data.latent_norm: channel) records the store's per-channel statistics in its checkpoint; the sample stage
    maps generated latents back with exactly those, and decodes what that gives."""
    import speedpipe.stages.sample as sample_stage
    from speedpipe.data.latents import LatentNormalization, LatentStore

    _, run_dir = run("train", inputs, "data.source=latents", f"data.latents_dir={inputs['store_A']}", "model.name=DiT-T/2",
                     "model.input_size=4", "data.latent_norm=channel", f"trainer.run_dir={tmp_path / 'run'}", tmp=tmp_path)
    state = torch.load(run_dir / "ckpt-0000002.pt", weights_only=True)
    manifest = LatentStore(inputs["store_A"]).manifest
    assert state["latent_norm"] == {"mean": pytest.approx(manifest["channel_mean"]), "std": pytest.approx(manifest["channel_std"])}
    mapped, decoded = [], []
    real_denormalize, real_decode = LatentNormalization.denormalize, sample_stage.decode_latents
    monkeypatch.setattr(LatentNormalization, "denormalize",
                        lambda self, x: mapped.append((self.mean.tolist(), self.std.tolist(), x, real_denormalize(self, x))) or mapped[-1][3])
    monkeypatch.setattr(sample_stage, "decode_latents", lambda vae, z, scale: decoded.append(z) or real_decode(vae, z, scale))
    run("sample", inputs, *SAMPLE, f"sampling.checkpoint={run_dir / 'ckpt-0000002.pt'}", f"autoencoder.path={inputs['ae_A']}",
        f"sampling.out={tmp_path / 's.npz'}", tmp=tmp_path)
    assert mapped and len(mapped) == len(decoded)
    for (mean, std, x, _), z in zip(mapped, decoded):
        assert mean == pytest.approx(manifest["channel_mean"]) and std == pytest.approx(manifest["channel_std"])
        assert torch.allclose(z, x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1), atol=1e-6)


def test_samples_carry_the_labels_they_were_generated_for(inputs, tmp_path, monkeypatch):
    """The sample stage's arr_1 is the label each image was conditioned on (what label accuracy and the class-row grids
    read): recorded from the model's own input."""
    import speedpipe.stages.sample as sample_stage
    from speedpipe.data.samples import read_labels

    conditioned = []
    real_fn = sample_stage.cfg_model_fn
    monkeypatch.setattr(sample_stage, "cfg_model_fn", lambda model, y, *a, **k: conditioned.append(y.clone()) or real_fn(model, y, *a, **k))
    _, out = run("sample", inputs, *SAMPLE_RUN(inputs), "sampling.labels=random", f"sampling.out={tmp_path / 's.npz'}", tmp=tmp_path)
    assert read_labels(out).tolist() == torch.cat(conditioned).tolist()


def test_a_seed_owns_its_random_stream(inputs, tmp_path):
    """Two runs of one seed train the same weights, two seeds different ones: a run's random stream is its seed's."""
    states = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _, run_dir = run("train", inputs, *TRAIN, f"seed={seed}", f"trainer.run_dir={tmp_path / name}", tmp=tmp_path)
        states[name] = torch.load(run_dir / "ckpt-0000002.pt", weights_only=True)
    assert all(torch.equal(states["a"]["model"][k], states["b"]["model"][k]) for k in states["a"]["model"])
    assert not all(torch.equal(states["a"]["model"][k], states["c"]["model"][k]) for k in states["a"]["model"])
