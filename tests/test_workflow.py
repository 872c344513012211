import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir, *args, timeout=900):
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--cores", "2", *args],
                            capture_output=True, text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return result


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
                 "figures/timestep_methods.png", "figures/samples_per_method.png", "figures/teacher_vs_scm.png", "README.md"):
        assert (root / name).stat().st_size > 0, name
    scm = (root / "tables/scm.md").read_text()
    assert "scm1" in scm and "scm2" in scm and "ddpm10" in scm
    assert "torch-fidelity" in (root / "README.md").read_text()


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
