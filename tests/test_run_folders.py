"""Who writes where: standalone commands beside the pipeline's runs, one writer per run folder, the samples a failed
grouped job finished, superseded states removed only when asked, SLURM jobs of one checkout and one user
(speedpipe.runstore, speedpipe.launch; the faults themselves: tests/test_faults.py)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from diffusers import AutoencoderKL

from conftest import events, run_python, slurm
from speedpipe.config import load_config
from speedpipe.launch import config_hash, queued_job_ids
from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config
from speedpipe.runstore import RunFolder, current_state, main as runstore_main, states
from speedpipe.stages import sample, train
from speedpipe.reporting.readme import kept_runs


def test_a_standalone_command_never_writes_into_a_pipeline_run(tiny_train_config, tmp_path):
    """After the pipeline trained results/tiny/train/baseline-s0, the SpeeD-style command with one setting changed
    trains under results/tiny/standalone/: the pipeline run's files are untouched and its events show no other run."""
    pipeline_run = tmp_path / "results/tiny/train/baseline-s0"
    train.run(load_config(tiny_train_config, ["trainer.steps=2", f"trainer.run_dir={pipeline_run}"], phase="train"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pipeline_run.rglob("*") if p.is_file()}
    result = run_python(["main.py", "-c", str(tiny_train_config), "-p", "train", "trainer.steps=2", "optim.lr=2e-3"])
    assert result.returncode == 0, result.stderr[-3000:]
    standalone = tmp_path / "results/tiny/standalone/train/baseline-s0"
    assert sorted(p.name for p in standalone.glob("ckpt-*.pt")) == ["ckpt-0000002.pt"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pipeline_run.rglob("*") if p.is_file()} == before
    assert [e["event"] for e in events(pipeline_run)] == ["start", "finished"]


def test_a_second_writer_waits_for_the_first_and_names_it(tmp_path, capsys):
    """A run folder whose lock another live process holds (a job whose Snakemake driver died) is not written beside it:
    the second writer waits until the first ends, and says so."""
    import threading

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 1234 on node7');"
        " f.flush(); print('locked', flush=True); sys.stdin.readline()"), str(tmp_path / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    folder, taken = RunFolder(tmp_path, {"a": 1}), threading.Event()
    writer = threading.Thread(target=lambda: (folder.lock(), taken.set()))
    writer.start()
    assert not taken.wait(1.0), "the second writer did not wait for the first"
    holder.communicate("go\n")  # the first writer ends
    assert taken.wait(30)
    writer.join()
    folder.unlock()
    assert f"{tmp_path} is being written by pid 1234 on node7; waiting" in capsys.readouterr().out


def test_one_process_never_takes_a_run_folders_lock_twice(tmp_path):
    """flock is per open file: a second lock() in the same process would wait for itself forever; it is refused."""
    first = RunFolder(tmp_path, {})
    first.lock()
    with pytest.raises(RuntimeError, match="already locked by this process"):
        RunFolder(tmp_path, {}).lock()
    first.unlock()
    again = RunFolder(tmp_path, {})
    again.lock()
    again.unlock()


def test_a_dead_writer_holds_no_lock(tmp_path):
    """SIGKILL releases the lock: the next writer does not wait for a process that no longer exists."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    folder = RunFolder(tmp_path, {})
    folder.lock()
    folder.unlock()
    assert time.monotonic() - start < 1.0


def test_a_failed_sampling_job_keeps_the_samples_it_finished(tiny_train_config, tmp_path, monkeypatch):
    """Snakemake removes every output of a failed grouped sampling job: a re-run restores each samples file the job had
    finished (the same file, not sampled again) and samples only the rest."""
    run_dir = train.run(load_config(tiny_train_config, ["trainer.steps=4", "trainer.ckpt_every=2",
                                                        f"trainer.run_dir={tmp_path / 'run'}"], phase="train"))
    vae = tmp_path / "vae.safetensors"
    save_tiny_autoencoder(AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)), 0.7, vae)

    def sample_config(step):
        return load_config(tiny_train_config, [f"sampling.checkpoint={run_dir / f'ckpt-{step:07d}.pt'}", "sampling.sampler=ddim2",
                                               "autoencoder.name=tiny", f"autoencoder.path={vae}", "sampling.num_samples=4",
                                               f"sampling.out={tmp_path / f'samples-{step}.npz'}", "sampling.progress=false"],
                           phase="sample")

    first = sample.run(sample_config(2))  # the job's first file; its second then fails and Snakemake removes both
    inode, images = first.stat().st_ino, np.load(first)["arr_0"]
    for ext in (".npz", ".png", ".json"):
        first.with_suffix(ext).unlink()
    sampled = []
    real_build = sample.build_sampler_for
    monkeypatch.setattr(sample, "build_sampler_for", lambda state, *a: sampled.append(state["step"]) or real_build(state, *a))
    assert sample.run(sample_config(2)) == first and sample.run(sample_config(4)).exists()
    assert sampled == [4], "the finished file was sampled again"
    assert first.stat().st_ino == inode and np.array_equal(np.load(first)["arr_0"], images)
    assert all(first.with_suffix(ext).exists() for ext in (".png", ".json"))


def test_superseded_states_are_listed_and_removed_only_with_yes(tiny_train_config, tmp_path, capsys):
    run = tmp_path / "results/tiny/train/baseline-s0"
    for lr in ("1e-3", "2e-3"):
        train.run(load_config(tiny_train_config, ["trainer.steps=2", f"optim.lr={lr}", f"trainer.run_dir={run}"], phase="train"))
    old, new = states(run)
    assert current_state(run) == new
    report = kept_runs({"root": str(tmp_path / "results/tiny"), "train_runs": [{"log": str(run / "log.csv")}], "distill_runs": []})
    assert f"- `train/baseline-s0/store/{old.name}`: optim.lr" in report  # the experiment's README lists the kept run
    runstore_main(["list", str(tmp_path / "results/tiny")])
    listing = capsys.readouterr().out
    assert f"superseded {old}  step 2" in listing and f"current    {new}  step 2" in listing
    runstore_main(["prune", str(tmp_path / "results/tiny")])
    assert old.is_dir() and "would remove" in capsys.readouterr().out
    runstore_main(["prune", str(tmp_path / "results/tiny"), "--yes"])
    assert not old.is_dir() and new.is_dir() and (run / "ckpt-0000002.pt").exists()
    # a superseded state further along than the current one (new settings started, then abandoned) needs --force too
    train.run(load_config(tiny_train_config, ["trainer.steps=4", "optim.lr=3e-3", f"trainer.run_dir={run}"], phase="train"))
    longest = current_state(run)
    train.run(load_config(tiny_train_config, ["trainer.steps=2", "optim.lr=4e-3", f"trainer.run_dir={run}"], phase="train"))
    runstore_main(["prune", str(tmp_path / "results/tiny"), "--yes"])
    assert longest.is_dir() and not new.is_dir()
    assert f"{longest} (step 4, the current one 2)" in capsys.readouterr().out
    runstore_main(["prune", str(tmp_path / "results/tiny"), "--yes", "--force"])
    assert not longest.is_dir() and current_state(run).is_dir()
    assert kept_runs({"root": str(tmp_path / "results/tiny"), "train_runs": [{"log": str(run / "log.csv")}], "distill_runs": []}) == ""


def test_slurm_job_names_differ_between_checkouts(tmp_path, monkeypatch):
    """Two clones of one experiment (the same relative paths in their configs) never share a SLURM job name."""
    config = {"output_dir": "results", "experiment": "demo"}
    names = []
    for clone in ("a", "b", "a"):
        (tmp_path / clone).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / clone)
        names.append(config_hash("train", config))
    assert names[0] != names[1] and names[0] == names[2]


@slurm
def test_another_users_job_of_the_same_name_is_not_attached_to(tmp_path):
    """squeue is asked for the user's own jobs: a job of another user with our job's name is not ours to wait on."""
    name = f"speedpipe-train-{config_hash('train', {'x': str(tmp_path)})}"
    submitted = subprocess.run(["sbatch", "--uid=nobody", "--gid=nogroup", f"--job-name={name}", "--output=/dev/null",
                                "--chdir=/tmp", "--wrap", "sleep 60"], capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[-1]
    try:
        seen = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert seen == [job_id]  # the job is in the queue, under our job's name
        assert queued_job_ids(name) == []
    finally:
        subprocess.run(["scancel", job_id])


def test_the_declared_checkpoints_are_links_to_the_store(tiny_train_config, tmp_path):
    run = train.run(load_config(tiny_train_config, ["trainer.steps=2", f"trainer.run_dir={tmp_path / 'run'}"], phase="train"))
    declared, stored = run / "ckpt-0000002.pt", current_state(run) / "ckpt-0000002.pt"
    assert os.path.samefile(declared, stored)
    declared.unlink()
    assert stored.exists()


def test_an_atomic_write_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """After a crash (power, kernel) a renamed file is the whole new one only if its data was synced before the rename,
    and the rename itself survives only if the folder was synced after it."""
    import stat

    from speedpipe import io

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append((stat.S_ISDIR(os.fstat(fd).st_mode),
                                                                  (tmp_path / "out.txt").exists())) or real_fsync(fd))
    io.atomic_write_text(tmp_path / "out.txt", "done")
    assert synced == [(False, False), (True, True)]  # the file's data before the rename, the folder after it


def test_a_data_stage_run_alone_does_not_replace_the_pipelines_files_of_other_settings(tiny_train_config, tmp_path):
    """`speedpipe autoencoder` with one setting changed writes where the experiment's pipeline keeps its autoencoder:
    refused before it starts, naming the folder and the key; with the same settings it may run (it makes the same)."""
    from speedpipe.cli import _refuse_to_replace
    from speedpipe.config import save_config
    from speedpipe.errors import ConfigError

    made = load_config(tiny_train_config, ["autoencoder.lr=1.0e-3"])
    save_config(made, tmp_path / "results/tiny/autoencoder/config.yaml")
    result = run_python(["-m", "speedpipe.cli", "autoencoder", "--config", str(tiny_train_config), "autoencoder.lr=2.0e-3"])
    assert result.returncode == 2
    assert f"{tmp_path / 'results/tiny/autoencoder'} holds this stage's files made with other settings (autoencoder.lr)" \
        in result.stderr
    _refuse_to_replace("autoencoder", made)  # the same settings: no refusal
    with pytest.raises(ConfigError, match="autoencoder.lr"):
        _refuse_to_replace("autoencoder", load_config(tiny_train_config, ["autoencoder.lr=2.0e-3"]))
