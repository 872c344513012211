import csv
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, events, run_python
from speedpipe.checkpoint import latest_checkpoint, load_checkpoint
from speedpipe.config import load_config
from speedpipe.layout import train_run_dir
from speedpipe.runstore import current_state
from speedpipe.stages import train


def _losses(run_dir):
    with open(run_dir / "log.csv") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["mse"]), float(r["vlb"])) for r in csv.DictReader(f)]


def _assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for pid, s in a["opt"]["state"].items():
        for k in s:
            assert torch.equal(s[k], b["opt"]["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert a["step"] == b["step"] and a["data_order"] == b["data_order"]


def test_training_reduces_the_loss_and_writes_checkpoints(tiny_train_config):
    cfg = load_config(tiny_train_config, ["trainer.steps=60", "trainer.log_every=10", "trainer.ckpt_every=30"], phase="train")
    run_dir = train.run(cfg)
    assert [p.name for p in sorted(run_dir.glob("ckpt-*.pt"))] == ["ckpt-0000030.pt", "ckpt-0000060.pt"]
    losses = _losses(run_dir)
    assert [s for s, *_ in losses] == [10, 20, 30, 40, 50, 60]
    assert losses[-1][1] < losses[0][1]
    header = (run_dir / "log.csv").read_text().splitlines()[0]
    assert header == "step,loss,mse,vlb,steps_per_s,images_per_s"


def test_killed_run_resumes_bit_identical(tiny_train_config, tmp_path):
    overrides = ["trainer.steps=200", "trainer.ckpt_every=20", "trainer.log_every=20"]
    reference = train.run(load_config(tiny_train_config, overrides + [f"trainer.run_dir={tmp_path / 'ref'}"], phase="train"))

    killed_dir = tmp_path / "killed"
    args = ["main.py", "-c", str(tiny_train_config), "-p", "train", *overrides, f"trainer.run_dir={killed_dir}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed_dir / "ckpt-0000060.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(latest_checkpoint(killed_dir))["step"]
    assert interrupted_at < 200, "the run finished before it could be killed"

    result = run_python(args)
    assert result.returncode == 0, result.stderr
    resumed, finished = events(killed_dir)[-2:]  # the second run started at the checkpoint and ran only the rest
    assert (resumed["event"], resumed["step"], resumed["source"]) == ("resume", interrupted_at, f"ckpt-{interrupted_at:07d}.pt")
    assert (finished["event"], finished["step"], int(finished["steps_performed"])) == ("finished", 200, 200 - interrupted_at)
    _assert_same_state(load_checkpoint(reference / "ckpt-0000200.pt"), load_checkpoint(killed_dir / "ckpt-0000200.pt"))
    assert _losses(reference) == _losses(killed_dir)
    names = lambda run: sorted(p.name for p in run.glob("ckpt-*.pt"))  # noqa: E731
    assert names(killed_dir) == names(reference)  # a write cut by the kill left no file that looks done
    for path in killed_dir.glob("ckpt-*.pt"):
        load_checkpoint(path)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_train_config, poison_third_batch):
    cfg = load_config(tiny_train_config, ["trainer.log_every=2"], phase="train")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss, mse, vlb at step 3.*ckpt-0000002\.pt"):
        train.run(cfg)
    assert latest_checkpoint(train_run_dir(cfg)).name == "ckpt-0000002.pt"


def test_two_process_gloo_ddp_matches_one_process(tiny_train_config, tmp_path):
    overrides = ["seed=1", "trainer.steps=8", "trainer.log_every=1", "trainer.ckpt_every=8"]  # seed 1: the init must not depend on the ranks
    single = train.run(load_config(tiny_train_config, overrides + [f"trainer.run_dir={tmp_path / 'one'}"], phase="train"))
    result = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py", "-c", str(tiny_train_config),
         "-p", "train", *overrides, f"trainer.run_dir={tmp_path / 'two'}"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _losses(single), _losses(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two] == list(range(1, 9))
    for a, b in zip(one, two):
        assert a[1:] == pytest.approx(b[1:], rel=1e-5)
    w1 = load_checkpoint(single / "ckpt-0000008.pt")["model"]
    w2 = load_checkpoint(tmp_path / "two" / "ckpt-0000008.pt")["model"]
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_resume_checkpoint_between_evaluation_checkpoints(tiny_train_config, tmp_path):
    """latest.pt (every resume_every_steps) carries a run across a gap between evaluation checkpoints."""
    import shutil

    overrides = ["trainer.steps=8", "trainer.ckpt_every=1000", "trainer.resume_every_steps=3"]
    full = train.run(load_config(tiny_train_config, overrides + [f"trainer.run_dir={tmp_path / 'full'}"], phase="train"))
    state = current_state(full)
    assert [p.name for p in sorted(full.glob("*.pt"))] == ["ckpt-0000008.pt"]
    assert [p.name for p in sorted(state.glob("*.pt"))] == ["ckpt-0000008.pt", "latest.pt"]
    assert load_checkpoint(state / "latest.pt")["step"] == 6
    (tmp_path / "cut").mkdir()
    # a run that stopped after step 6, its latest.pt in the run folder as written before the store: adopted
    shutil.copy(state / "latest.pt", tmp_path / "cut" / "latest.pt")
    cut = train.run(load_config(tiny_train_config, overrides + [f"trainer.run_dir={tmp_path / 'cut'}"], phase="train"))
    assert [(e["event"], e["step"], e["source"], e["steps_performed"]) for e in events(cut)] == [
        ("resume", 6, "latest.pt", ""), ("finished", 8, "", "2")]
    _assert_same_state(load_checkpoint(full / "ckpt-0000008.pt"), load_checkpoint(cut / "ckpt-0000008.pt"))


@pytest.mark.parametrize("method", [
    [],  # the fixture's SpeeD: speed sampler (k 5, tau 700, dual draws), speed weighting (lam 0.6, tau 700)
    ["diffusion.timestep_sampler={name: uniform}", "diffusion.loss_weighting={name: none}"],
    ["diffusion.timestep_sampler={name: lognormal, p_mean: -1.2, p_std: 1.2}", "diffusion.loss_weighting={name: min_snr, gamma: 5}"],
])
def test_training_uses_the_configured_timestep_sampler_and_weighting(tiny_train_config, monkeypatch, method):
    """The timesteps a step trains on follow the configured sampler's distribution, and the MSE weights it applies are
    the configured weighting (recorded from the diffusion's own loss)."""
    import numpy as np

    from speedpipe.config import named_params
    from speedpipe.diffusion import create_diffusion
    from speedpipe.diffusion.gaussian import GaussianDiffusion
    from speedpipe.diffusion.timesteps import build_sampler, build_weighting

    seen = []
    original = GaussianDiffusion.training_losses

    def recording(self, model_output, x_start, x_t, t, noise, mse_weight=None):
        seen.append((t.clone(), mse_weight.clone()))
        return original(self, model_output, x_start, x_t, t, noise, mse_weight)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", recording)
    cfg = load_config(tiny_train_config, ["trainer.steps=150", "trainer.global_batch_size=64", "data.synthetic_size=128",
                                          "trainer.ckpt_every=150", "trainer.log_every=150", *method], phase="train")
    train.run(cfg)
    diffusion = create_diffusion("")
    sampler, weighting = cfg.diffusion.timestep_sampler, cfg.diffusion.loss_weighting
    assert all(torch.equal(w, build_weighting(weighting.name, diffusion, **named_params(weighting))) for _, w in seen)
    expected = build_sampler(sampler.name, diffusion, **named_params(sampler)).distribution(64).numpy()
    observed = np.bincount(torch.cat([t for t, _ in seen]).numpy(), minlength=1000) / (150 * 64)
    bins = lambda p: p.reshape(20, 50).sum(1)  # noqa: E731
    assert np.abs(bins(observed) - bins(expected)).max() < 0.015, (bins(observed), bins(expected))


def test_checkpoints_land_on_every_evaluation_step_whatever_their_spacing(tiny_train_config):
    """Uneven evaluation steps (the issue's [150, 400, 600] in small): a checkpoint at exactly each, plus the last; steps
    outside the run are refused in the stage config and in the experiment file."""
    import yaml

    from speedpipe.errors import ConfigError
    from speedpipe.workflow import Experiment

    pipe = yaml.safe_load((REPO / "tests/data/micro.yaml").read_text()) | {"train_steps": 6, "eval_steps": [2, 5, 6]}
    del pipe["tables"]  # they name steps 2 and 4
    exp = Experiment(pipe, base_dir=REPO)
    job = exp.stage_config("train", exp.train_runs["speed-s0"])
    assert job["trainer"]["ckpt_steps"] == [2, 5, 6]
    cfg = load_config(tiny_train_config, ["trainer.steps=6", "trainer.ckpt_every=1000", "trainer.ckpt_steps=[2,5]"], phase="train")
    run_dir = train.run(cfg)
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-0000002.pt", "ckpt-0000005.pt", "ckpt-0000006.pt"]
    with pytest.raises(ConfigError, match=r"trainer.ckpt_steps.*\[7\] lie outside 1..6"):
        load_config(tiny_train_config, ["trainer.steps=6", "trainer.ckpt_steps=[2,7]"], phase="train")
    with pytest.raises(ConfigError, match="eval_steps"):
        Experiment(pipe | {"eval_steps": [2, 5, 7]}, base_dir=REPO)


def test_a_resumed_curriculum_draws_as_an_uninterrupted_one(tiny_train_config, tmp_path, monkeypatch):
    """CLTS depends on the training step: a run stopped at step 2 and resumed draws steps 3-4 from the same curriculum
    as an uninterrupted run (the same timesteps, the same final weights)."""
    from speedpipe.diffusion.timesteps import CurriculumSampler

    seen = []
    real = CurriculumSampler.sample
    monkeypatch.setattr(CurriculumSampler, "sample", lambda self, n, generator=None, step=None: seen.append(step) or real(self, n, generator, step))
    clts = ["diffusion.timestep_sampler={name: clts, mu: 300, sigma: 100, ramp_steps: 4}", "trainer.ckpt_every=2"]
    straight = train.run(load_config(tiny_train_config, [*clts, "trainer.steps=4", f"trainer.run_dir={tmp_path / 'a'}"], phase="train"))
    assert seen == [1, 2, 3, 4]
    train.run(load_config(tiny_train_config, [*clts, "trainer.steps=2", f"trainer.run_dir={tmp_path / 'b'}"], phase="train"))
    seen.clear()
    resumed = train.run(load_config(tiny_train_config, [*clts, "trainer.steps=4", f"trainer.run_dir={tmp_path / 'b'}"], phase="train"))
    assert seen == [3, 4]  # the resumed run starts at step 3, not 1
    _assert_same_state(load_checkpoint(straight / "ckpt-0000004.pt"), load_checkpoint(resumed / "ckpt-0000004.pt"))


def test_a_run_of_other_settings_is_not_resumed_and_the_old_run_is_kept(tiny_train_config, tmp_path):
    """Snakemake re-runs a training job whose settings were edited and removes its declared outputs: the run of the new
    settings starts afresh in a state folder of its own (events.csv names the one kept beside it and the key that
    differs), ends as a fresh run of the new settings would, and the old run's checkpoints stay, not rewritten."""
    first = ["trainer.steps=4", "trainer.ckpt_every=1", "optim.lr=1.0e-3", f"trainer.run_dir={tmp_path / 'run'}"]
    train.run(load_config(tiny_train_config, first, phase="train"))
    old_state = current_state(tmp_path / "run")
    old_files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in old_state.glob("*.pt")}
    for stale in ("ckpt-0000004.pt", "ckpt-0000003.pt"):  # the declared outputs Snakemake removes before the re-run
        (tmp_path / "run" / stale).unlink()
    edited = ["trainer.steps=4", "trainer.ckpt_every=1", "optim.lr=5.0e-3"]
    rerun = train.run(load_config(tiny_train_config, [*edited, f"trainer.run_dir={tmp_path / 'run'}"], phase="train"))
    fresh = train.run(load_config(tiny_train_config, [*edited, f"trainer.run_dir={tmp_path / 'fresh'}"], phase="train"))
    assert [e["event"] for e in events(rerun)] == ["start", "finished"]
    assert f"store/{old_state.name} (optim.lr)" in events(rerun)[0]["source"]
    assert current_state(rerun) != old_state
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in old_state.glob("*.pt")} == old_files
    _assert_same_state(load_checkpoint(rerun / "ckpt-0000004.pt"), load_checkpoint(fresh / "ckpt-0000004.pt"))
    # going back to the first settings resumes the kept run: nothing is trained again
    back = train.run(load_config(tiny_train_config, first, phase="train"))
    assert [(e["event"], e["steps_performed"]) for e in events(back)][-2:] == [("resume", ""), ("finished", "0")]
    assert {p.name for p in back.glob("ckpt-*.pt")} == {f"ckpt-{s:07d}.pt" for s in (1, 2, 3, 4)}
    # a continued run (more steps) of the same settings resumes
    longer = train.run(load_config(tiny_train_config, ["trainer.steps=6", "trainer.ckpt_every=1", "optim.lr=5.0e-3",
                                                       f"trainer.run_dir={tmp_path / 'fresh'}"], phase="train"))
    assert [e["event"] for e in events(longer)][-2:] == ["resume", "finished"] and events(longer)[-2]["step"] == 4
