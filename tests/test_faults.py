"""No lost work: the faults of a real cluster, through the command a user runs (docs/faults.md).

One experiment (tests/data/faults.yaml: a SpeeD run of 100 iterations and its sCD student of 60 steps, on the micro
experiment's data) is run once without a fault: the reference. Each test then makes the same experiment again, faults it
the way clusters do -- SIGKILL of a job after its first checkpoint, SIGKILL of the Snakemake driver, a longer run asked
of a finished one, `scancel` of a SLURM job -- and runs the same `snakemake` command again. Each asserts what a user
whose week-long run died needs: every tensor of the final checkpoints equals the uninterrupted run's, log.csv too but
for its timing columns; the re-run resumed at or after the last state saved before the fault and performed fewer
steps than the whole run; and the checkpoints saved before the fault were not written again.
"""
import contextlib
import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, SNAKEMAKE, events, require_slurm, run_python
from speedpipe.config import load_config
from speedpipe.io import safe_torch_load
from speedpipe.runstore import current_state
from speedpipe.stages import train

TRAIN, STUDENT = "results/faults/train/speed-s0", "results/faults/distill/scd-speed-s0"
TARGET = f"{STUDENT}/log.csv"
TIMING = {"steps_per_s", "images_per_s"}  # log.csv columns that measure the machine, not the run


def command(work, *targets, extra=()):
    return [*SNAKEMAKE, *(targets or [TARGET]), "--directory", str(work), "--cores", "2", "--configfile",
            str(work / "faults.yaml"), *extra]


def run(work, *targets, extra=(), timeout=600):
    result = subprocess.run(command(work, *targets, extra=extra), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result


def start(work, *targets):
    """The same command, in the background (its own session, so a test can clean up whatever it leaves running)."""
    log = open(work / f"driver-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(command(work, *targets), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for_state_file(work, run_folder, name, proc, timeout=300):
    """Wait until the run's store holds `name` (the job saved it); fail if the driver ended first."""
    deadline = time.time() + timeout
    while not list((work / run_folder).glob(f"store/*/{name}")):
        assert proc.poll() is None, "the command ended before the fault could be made"
        assert time.time() < deadline, f"{name} never appeared in {run_folder}/store"
        time.sleep(0.01)


def saved_before(work, run_folder) -> tuple[int, dict]:
    """(the step of the newest saved state, {checkpoint: (inode, sha256)}) of a run's store. A checkpoint written again
    is a new file (atomic writes rename a new inode over the old); its modification time is not compared: publishing a
    checkpoint touches it, so that Snakemake sees it newer than the job's inputs."""
    state = current_state(work / run_folder)
    files = {p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest()) for p in state.glob("ckpt-*.pt")}
    newest = max(int(safe_torch_load(p)["step"]) for p in state.glob("*.pt"))
    return newest, files


def assert_not_rewritten(work, run_folder, before: dict):
    state = current_state(work / run_folder)
    for name, (inode, digest) in before.items():
        path = state / name
        assert path.stat().st_ino == inode, f"{run_folder}/{name} was written again"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert os.path.samefile(path, work / run_folder / name), f"{run_folder}/{name} is not the stored checkpoint"


def assert_resumed(work, run_folder, at_least: int, total: int):
    """The last run of the folder resumed at or after `at_least` and performed fewer steps than the whole run."""
    rows = events(work / run_folder)
    resume = [i for i, e in enumerate(rows) if e["event"] == "resume"]
    assert resume, f"{run_folder}: no resume in {rows}"
    resumed, finished = rows[resume[-1]], rows[-1]
    assert resumed["step"] >= at_least, f"{run_folder} resumed at {resumed['step']}, before the state saved at {at_least}"
    assert finished["event"] == "finished" and finished["step"] == total
    assert int(finished["steps_performed"]) == total - resumed["step"] < total


def same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_checkpoint(path_a, path_b, provenance=True):
    a, b = safe_torch_load(path_a), safe_torch_load(path_b)
    if not provenance:
        del a["config"], b["config"]
    same_tensors(a, b, Path(path_a).name)


def log_rows(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def assert_equal_to_reference(work, reference, run_folder, provenance=True):
    """Every declared checkpoint of the run holds the reference's tensors and values, and log.csv its rows but for
    timing. provenance=False leaves out the config a checkpoint records (a continued run's early checkpoints record
    the shorter run's length)."""
    names = sorted(p.name for p in (reference / run_folder).glob("ckpt-*.pt"))
    assert names and names == sorted(p.name for p in (work / run_folder).glob("ckpt-*.pt"))
    for name in names:
        same_checkpoint(reference / run_folder / name, work / run_folder / name, provenance)
    assert log_rows(reference / run_folder / "log.csv") == log_rows(work / run_folder / "log.csv")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_run):
    """The experiment run once without a fault, on the micro experiment's data (data_from: micro)."""
    work = tmp_path_factory.mktemp("faults") / "reference"
    shutil.copytree(micro_run, work, symlinks=True)
    (work / "faults.yaml").write_text((REPO / "tests/data/faults.yaml").read_text().replace(
        "configs/mnist5k/", f"{work}/configs/mnist5k/"))
    result = run(work)
    assert result.returncode == 0, result.stderr[-5000:]
    return work


@pytest.fixture
def work(reference, tmp_path):
    """A copy of the reference's folder without its train and distill runs: Snakemake plans only those jobs."""
    work = tmp_path / "work"
    shutil.copytree(reference, work, symlinks=True, ignore=shutil.ignore_patterns("train", "distill"))
    yield work
    for proc in Path("/proc").glob("[0-9]*"):  # whatever a fault left running there (an orphaned job)
        with contextlib.suppress(OSError):
            if Path(os.readlink(proc / "cwd")).is_relative_to(work):
                os.kill(int(proc.name), signal.SIGKILL)


def kill_the_job(work, driver, stage):
    """SIGKILL of the job's processes (an OOM kill, a node failure); Snakemake notices and fails the job."""
    for pid in descendants(driver.pid):
        os.kill(pid, signal.SIGKILL)


def cancel_the_slurm_job(work, driver, stage):
    """`scancel` of the stage's SLURM job (an admin, a node failure); the launcher reports it and the job fails."""
    jobs = subprocess.run(["squeue", "--me", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout.split("\n")
    ours = [line.split()[0] for line in jobs if line.strip() and f"speedpipe-{stage}-" in line]
    assert len(ours) == 1, jobs
    subprocess.run(["scancel", ours[0]], check=True)


@pytest.mark.parametrize("fault", [kill_the_job, cancel_the_slurm_job], ids=["SIGKILL", "scancel"])
def test_a_failed_train_job_and_a_failed_distill_job_are_finished_by_the_same_command(work, reference, fault):
    """The train job fails after its first checkpoint; the same command resumes it, and its student's job fails in its
    turn; the same command again finishes both. With `scancel`, both stages run as jobs on the local SLURM cluster."""
    if fault is cancel_the_slurm_job:
        require_slurm()
        experiment = work / "faults.yaml"
        pipe = yaml.safe_load(experiment.read_text())
        for stage in ("train", "distill"):
            pipe["launcher"][stage] = {"executor": "slurm", "cpus_per_task": 1, "mem_gb": 2, "time_min": 10, "poll_seconds": 0.5}
        experiment.write_text(yaml.safe_dump(pipe, sort_keys=False))
    driver = start(work)
    wait_for_state_file(work, TRAIN, "ckpt-0000025.pt", driver)
    fault(work, driver, "train")
    assert driver.wait(timeout=120) != 0
    assert not (work / TRAIN / "ckpt-0000025.pt").exists(), "Snakemake kept the failed job's outputs: no fault was made"
    train_saved, train_before = saved_before(work, TRAIN)
    assert 25 <= train_saved < 100
    if fault is cancel_the_slurm_job:  # SIGTERM then SIGKILL: the job saved at its step boundary and stopped
        assert events(work / TRAIN)[-1]["event"] == "terminated"

    driver = start(work)  # the same command: train resumes and finishes; distill fails in its turn
    wait_for_state_file(work, STUDENT, "ckpt-0000010.pt", driver)
    fault(work, driver, "distill")
    assert driver.wait(timeout=120) != 0
    student_saved, student_before = saved_before(work, STUDENT)
    assert 10 <= student_saved < 60
    if fault is cancel_the_slurm_job:
        assert events(work / STUDENT)[-1]["event"] == "terminated"

    result = run(work)
    assert result.returncode == 0, result.stderr[-5000:]
    for folder, saved, before, total in ((TRAIN, train_saved, train_before, 100), (STUDENT, student_saved, student_before, 60)):
        assert_equal_to_reference(work, reference, folder)
        assert_resumed(work, folder, saved, total)
        assert_not_rewritten(work, folder, before)


def test_a_killed_snakemake_driver_is_finished_by_the_same_command_after_one_unlock(work, reference):
    """The driver dies (a login node's session ends); its train job goes on as an orphan. The lock Snakemake leaves is
    removed by one --unlock; the same command's train job then waits for the orphan (the run folder's lock) instead
    of writing beside it, and finds the run finished: one writer, nothing trained twice."""
    driver = start(work)
    wait_for_state_file(work, TRAIN, "ckpt-0000025.pt", driver)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    locked = run(work)  # Snakemake's own lock, left by the dead driver
    assert locked.returncode != 0 and "LockException" in locked.stderr, locked.stderr[-3000:]
    assert run(work, extra=["--unlock"]).returncode == 0
    result = run(work)
    assert result.returncode == 0, result.stderr[-5000:]
    assert_equal_to_reference(work, reference, TRAIN)
    assert_equal_to_reference(work, reference, STUDENT)
    rows = [(e["event"], e["step"]) for e in events(work / TRAIN)]
    assert rows[:2] == [("start", 0), ("finished", 100)], "a second writer ran beside the orphaned job"
    assert rows[2:] == [("resume", 100), ("finished", 100)]
    assert events(work / TRAIN)[-1]["steps_performed"] == "0"


def test_a_finished_run_extended_continues_from_its_last_checkpoint(work, reference):
    """train_steps raised on a finished run (what the continuable settings exist for): Snakemake removes the job's
    outputs before re-running it; the run continues from its last checkpoint and keeps every earlier one."""
    experiment = work / "faults.yaml"
    longer = experiment.read_text()
    shorter = yaml.safe_load(longer)
    shorter.update(train_steps=75, eval_steps=[25, 50, 75])
    experiment.write_text(yaml.safe_dump(shorter, sort_keys=False))
    result = run(work, f"{TRAIN}/log.csv")
    assert result.returncode == 0, result.stderr[-5000:]
    saved, before = saved_before(work, TRAIN)
    assert saved == 75

    experiment.write_text(longer)
    result = run(work, f"{TRAIN}/log.csv")
    assert result.returncode == 0, result.stderr[-5000:]
    assert "localrule train:" in result.stdout + result.stderr  # the job was re-run (its params changed), not skipped
    assert_equal_to_reference(work, reference, TRAIN, provenance=False)
    assert_resumed(work, TRAIN, 75, 100)
    assert_not_rewritten(work, TRAIN, before)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MiB tmpfs: a file system that fills (root only, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_keeps_the_previous_state_and_the_same_command_finishes_once_space_is_freed(tiny_train_config, small_disk,
                                                                                             tmp_path):
    """The disk fills while a run trains: the checkpoint write that fails names its path and the free space, leaves the
    state saved before it valid, and the same command, run again after space was freed, resumes from that state and
    ends as an uninterrupted run."""
    steps = ["trainer.steps=300", "trainer.ckpt_every=75", "trainer.log_every=25"]
    reference = train.run(load_config(tiny_train_config, [*steps, f"trainer.run_dir={tmp_path / 'reference'}"], phase="train"))
    run_dir = small_disk / "run"
    args = ["main.py", "-c", str(tiny_train_config), "-p", "train", *steps, f"trainer.run_dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_state_file(small_disk, "run", "ckpt-0000075.pt", proc)
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f:  # the disk fills (another job's output, a log gone wild)
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - 4096)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    state = current_state(run_dir)
    assert f"cannot write {state / 'ckpt-0000150.pt'}" in out and "MiB free on its file system" in out, out[-3000:]
    assert safe_torch_load(state / "ckpt-0000075.pt")["step"] == 75  # the state before the fault loads
    assert not list(state.glob(".tmp-*")), "a half-written file was left behind"

    ballast.unlink()
    result = run_python(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed(small_disk, "run", 75, 300)
    names = sorted(p.name for p in reference.glob("ckpt-*.pt"))
    assert names == sorted(p.name for p in run_dir.glob("ckpt-*.pt"))
    for name in names:  # the run folders differ, and so do the configs the checkpoints record: tensors compared
        same_checkpoint(reference / name, run_dir / name, provenance=False)


def test_a_finished_student_extended_continues_from_its_last_checkpoint(work, reference):
    """distill_steps raised on a finished student (its teacher unchanged): the student continues from its last
    checkpoint and keeps every earlier one."""
    experiment = work / "faults.yaml"
    longer = experiment.read_text()
    shorter = yaml.safe_load(longer)
    shorter.update(distill_steps=25, distill_eval_steps=[10, 35])
    experiment.write_text(yaml.safe_dump(shorter, sort_keys=False))
    result = run(work)
    assert result.returncode == 0, result.stderr[-5000:]
    saved, before = saved_before(work, STUDENT)
    assert saved == 35

    experiment.write_text(longer)
    result = run(work)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "localrule distill:" in result.stdout + result.stderr
    assert_equal_to_reference(work, reference, STUDENT, provenance=False)
    assert_resumed(work, STUDENT, 35, 60)
    assert_not_rewritten(work, STUDENT, before)
