import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir, *args, cores=2, timeout=900):
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--cores", str(cores), *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def planned_jobs(output: str) -> list[str]:
    """'rule[wildcards]' for every job a dry run would execute."""
    jobs, current = [], None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            current = m.group(1)
            jobs.append(current)
        w = re.match(r"^wildcards: (.*)$", line.strip())
        if w and current and jobs:
            jobs[-1] = f"{current}[{w.group(1)}]"
    return [j for j in jobs if not j.startswith("all")]


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """The micro experiment run end to end through Snakemake, with its config files copied so tests can edit them."""
    work = tmp_path_factory.mktemp("micro")
    shutil.copytree(REPO / "configs/mnist5k", work / "configs/mnist5k")  # method files inherit configs/**/base.yaml
    pipeline = (REPO / "tests/data/micro.yaml").read_text().replace("configs/mnist5k/", f"{work}/configs/mnist5k/")
    (work / "micro.yaml").write_text(pipeline)
    result = snakemake(work, "--configfile", str(work / "micro.yaml"))
    assert result.returncode == 0, result.stderr[-5000:]
    return work


@pytest.fixture
def tiny_train_config(tmp_path):
    """A config file for a seconds-long training run of a tiny DiT on synthetic latents."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
experiment: tiny
output_dir: {tmp_path / 'results'}
data: {{source: synthetic, synthetic_size: 64, random_flip: true}}
model: {{name: DiT-T/4, input_size: 8, in_channels: 4, num_classes: 4}}
diffusion:
  timestep_sampler: {{name: speed, k: 5, tau: 700}}
  loss_weighting: {{name: speed, lam: 0.6, tau: 700}}
optim: {{lr: 1.0e-3}}
trainer: {{steps: 6, global_batch_size: 8, log_every: 1, ckpt_every: 2, ema_decay: 0.9, device: cpu, progress: false}}
"""
    )
    return path


@pytest.fixture
def poison_third_batch(monkeypatch):
    """Make the 3rd synthetic batch NaN (a data fault in the middle of a run); returns a reset function."""
    from speedpipe.data.synthetic import SyntheticLatents

    real_get_batch = SyntheticLatents.get_batch
    calls = {"n": 0}

    def poisoned(self, indices, flip, eps=None):
        calls["n"] += 1
        x, y = real_get_batch(self, indices, flip)
        return (x * float("nan"), y) if calls["n"] == 3 else (x, y)

    monkeypatch.setattr(SyntheticLatents, "get_batch", poisoned)
    return lambda: calls.update(n=0)


def run_python(args, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kwargs)


def events(run_dir) -> list[dict]:
    """The rows of a long stage's events.csv (speedpipe.loop): start, resume, preempted, finished."""
    import csv

    with open(Path(run_dir) / "events.csv") as f:
        return [{**row, "step": int(row["step"])} for row in csv.DictReader(f)]


def _slurm_cluster_up() -> bool:
    import shutil

    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "alloc"))


MISSING_CLUSTER = "SPEEDPIPE_REQUIRE_SLURM=1 but no local SLURM cluster answers sinfo (slurm/local-cluster/start.sh)"
NO_CLUSTER = "no local SLURM cluster: start it with slurm/local-cluster/start.sh (.ci/run does)"


def slurm(test):
    """Mark a test that needs the local SLURM cluster: skipped without it, unless SPEEDPIPE_REQUIRE_SLURM=1 (as in
    .ci/run), where a missing cluster fails the test instead."""
    if _slurm_cluster_up():
        return test
    if os.environ.get("SPEEDPIPE_REQUIRE_SLURM") == "1":
        def missing(*args, **kwargs):
            pytest.fail(MISSING_CLUSTER)

        missing.__name__ = test.__name__
        return missing
    return pytest.mark.skip(reason=NO_CLUSTER)(test)


def require_slurm():
    """`slurm` inside a test, for one case of a parametrised test."""
    if not _slurm_cluster_up():
        if os.environ.get("SPEEDPIPE_REQUIRE_SLURM") == "1":
            pytest.fail(MISSING_CLUSTER)
        pytest.skip(NO_CLUSTER)


def require_nodes(nodes: int):
    """require_slurm, on a cluster of at least `nodes` nodes (.ci/run starts two: start.sh --nodes 2)."""
    require_slurm()
    have = len(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split())
    if have < nodes:
        message = f"{nodes} nodes asked, the cluster has {have}: slurm/local-cluster/start.sh --nodes {nodes}"
        pytest.fail(message) if os.environ.get("SPEEDPIPE_REQUIRE_SLURM") == "1" else pytest.skip(message)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """Everything the stages read (tests/stage_inputs.py), made once per session."""
    from stage_inputs import inputs_in

    return inputs_in(tmp_path_factory)
