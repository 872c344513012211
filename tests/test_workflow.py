import os
import re
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, slurm

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


@pytest.mark.parametrize("pipeline,expected", [
    ("configs/pipeline/demo.yaml", {"train": 6, "distill": 1, "report": 1, "autoencoder": 1, "classifier": 1}),
    ("configs/pipeline/imagenet_256.yaml", {"train": 2, "distill": 1, "report": 1, "autoencoder": 0, "classifier": 0}),
])
def test_dry_run_dag(tmp_path, pipeline, expected):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / pipeline))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    for rule, count in expected.items():
        assert sum(j.split("[")[0] == rule for j in jobs) == count, (rule, jobs)


def test_bad_experiment_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "tests/data/micro.yaml").read_text().replace("seeds:", "seedz:"))
    result = snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert result.returncode != 0 and "unknown key 'seedz'" in result.stderr + result.stdout


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The micro experiment run end to end through Snakemake, with the method configs copied so tests can edit them."""
    work = tmp_path_factory.mktemp("micro")
    shutil.copytree(REPO / "configs/mnist5k", work / "configs/mnist5k")  # method files inherit configs/**/base.yaml
    pipeline = (REPO / "tests/data/micro.yaml").read_text().replace("configs/mnist5k/", f"{work}/configs/mnist5k/")
    (work / "micro.yaml").write_text(pipeline)
    result = snakemake(work, "--configfile", str(work / "micro.yaml"))
    assert result.returncode == 0, result.stderr[-5000:]
    return work


def test_micro_run_writes_tables_and_figures(micro_run):
    root = micro_run / "results" / "micro"
    for name in ("tables/fid.md", "tables/fid.csv", "tables/fid.tex", "tables/speedup.md", "tables/scm.md",
                 "figures/fid_vs_iterations.png", "figures/fid_vs_iterations.pdf", "figures/training_loss.png",
                 "figures/timestep_methods.png", "figures/samples_per_method.png", "figures/teacher_vs_scm.png",
                 "figures/teacher_grid.png", "figures/distillation.png", "README.md"):
        assert (root / name).stat().st_size > 0, name
    scm = (root / "tables/scm.md").read_text()
    assert "scm1" in scm and "scm2" in scm and "ddpm10-cfg2" in scm and "label acc." in scm
    assert "label acc." in (root / "tables/fid.md").read_text() and "torch-fidelity" in (root / "README.md").read_text()


def test_micro_run_metrics_are_finite_and_the_tables_hold_them(micro_run):
    import json

    import pandas as pd

    root = micro_run / "results" / "micro"
    files = sorted((root / "metrics").rglob("*.json"))
    assert len(files) == 4 + 4 + 4  # 2 runs x 2 steps, 4 teacher samplers, 2 student checkpoints x 2 samplers
    metrics = {}
    for f in files:
        m = json.loads(f.read_text())["metrics"]
        assert all(np.isfinite(v) for v in m.values()), (f, m)
        assert m["frechet_inception_distance"] >= 0 and 0 <= m["label_accuracy"] <= 1, (f, m)
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1, (f, m)
        run, step = f.relative_to(root / "metrics").parts[:2]
        metrics[(run, int(step), f.stem)] = m
    fid = pd.read_csv(root / "tables/fid.csv")
    for _, row in fid.iterrows():
        seeds = [m["frechet_inception_distance"] for (r, s, k), m in metrics.items()
                 if r.rsplit("-s", 1)[0] == row.method and s == row.step and k == "ddim5"]
        assert float(str(row.FID).split(" ")[0]) == pytest.approx(np.mean(seeds), abs=0.005), row
    scm = pd.read_csv(root / "tables/scm.csv")
    assert len(scm) == 4 + 4
    for _, row in scm.iterrows():
        run = "speed-s0" if row.model.startswith("teacher") else "scm-speed-s0"
        m = metrics[(run, int(row.step), row.sampler)]
        assert row.FID == pytest.approx(m["frechet_inception_distance"], abs=5e-4)
        assert row["label acc."] == pytest.approx(m["label_accuracy"], abs=5e-4)


def test_nothing_to_do_after_a_complete_run(micro_run):
    start = time.perf_counter()
    result = snakemake(micro_run, "-n", "--configfile", str(micro_run / "micro.yaml"))
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and planned_jobs(result.stdout) == [], result.stdout[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr
    assert elapsed < 15, elapsed  # includes interpreter start-up; the README quotes the measured time


def test_changing_a_speed_parameter_reruns_only_the_speed_branch(micro_run):
    speed = micro_run / "configs/mnist5k/speed.yaml"
    original = speed.read_text()
    speed.write_text(original.replace("k: 5", "k: 10"))
    try:
        result = snakemake(micro_run, "-n", "--configfile", str(micro_run / "micro.yaml"))
    finally:
        speed.write_text(original)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    assert "train[run=speed-s0]" in jobs and "distill" in jobs and "report" in jobs
    assert not [j for j in jobs if "baseline" in j], jobs
    assert not {j.split("[")[0] for j in jobs} & {"autoencoder", "encode", "classifier", "reference"}
    assert all(("speed" in j) or j in ("distill", "report") for j in jobs), jobs


def test_snakemake_report_builds_html(micro_run):
    result = snakemake(micro_run, "--configfile", str(micro_run / "micro.yaml"), "--report", str(micro_run / "report.html"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (micro_run / "report.html").stat().st_size > 10_000


@slurm
def test_micro_run_on_slurm_survives_a_killed_snakemake(tmp_path):
    """Every stage as a SLURM job; Snakemake is killed while a training job runs, and the re-run re-attaches to it."""

    pipeline = (REPO / "tests/data/micro.yaml").read_text().replace(
        "  default: {executor: local}",
        f"  default: {{executor: slurm, cpus_per_task: 1, mem_gb: 1, time_min: 10, poll_seconds: 0.5, folder: {tmp_path / 'slurm'}}}\n"
        "  report: {executor: local}")
    pipeline = pipeline.replace("train_steps: 4", "train_steps: 1000").replace("\neval_steps: [2, 4]", "\neval_steps: [500, 1000]")
    (tmp_path / "micro.yaml").write_text(pipeline)
    cmd = [*SNAKEMAKE, "--directory", str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "micro.yaml")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and not running:
        out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout.split("\n")
        running = [line.split()[0] for line in out if "speedpipe-train-" in line and line.endswith("RUNNING")]
        time.sleep(0.5)
    assert running, "no training job started"
    os.killpg(first.pid, signal.SIGKILL)  # Snakemake and its job processes die; the SLURM job runs on
    first.wait()

    assert snakemake(tmp_path, "--unlock", "--configfile", str(tmp_path / "micro.yaml")).returncode == 0
    # SLURM jobs use no local cores: start every ready job at once, so the re-run reaches the training job while it runs
    second = snakemake(tmp_path, "--configfile", str(tmp_path / "micro.yaml"), "--rerun-incomplete", cores=8)
    assert second.returncode == 0, second.stderr[-5000:]
    assert f"re-attaching to SLURM job {running[0]}" in second.stdout + second.stderr
    assert (tmp_path / "results/micro/README.md").exists()
    submitted_trains = {p.name for p in (tmp_path / "slurm").glob("train-*")}
    assert len(submitted_trains) == 2  # one job folder per training run: nothing was submitted twice
    assert len(list((tmp_path / "slurm").glob("train-*/*_submitted.pkl"))) == 2


def test_an_experiment_file_plans_only_its_own_methods(tmp_path):
    """The demo's experiment file is the default only when none is given: it is not merged into the user's."""
    own = (REPO / "tests/data/micro.yaml").read_text().replace("  baseline: configs/mnist5k/baseline.yaml\n", "")
    own = own.replace("  speed: configs/mnist5k/speed.yaml", f"  plain: {REPO}/configs/mnist5k/baseline.yaml\n"
                      f"  speed: {REPO}/configs/mnist5k/speed.yaml").replace("configs/mnist5k/base.yaml", f"{REPO}/configs/mnist5k/base.yaml")
    (tmp_path / "own.yaml").write_text(own)
    result = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "own.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    trains = sorted(j for j in planned_jobs(result.stdout) if j.startswith("train["))
    assert trains == ["train[run=plain-s0]", "train[run=speed-s0]"], trains
