"""The launcher: validation without a cluster, and real jobs on the local one-node SLURM cluster.

`.ci/run` starts that cluster (slurm/local-cluster/start.sh); on a machine where it is not running the
SLURM tests are skipped with that reason.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO, require_nodes, slurm
from speedpipe.config import load_config, to_plain
from speedpipe.errors import ConfigError
from speedpipe.launch import SlurmJobFailed, job_state, launch_many, queued_job_ids
from speedpipe.launcher_settings import parse_launcher

SLURM = {"executor": "slurm", "cpus_per_task": 1, "mem_gb": 1, "time_min": 10, "poll_seconds": 0.5}


@pytest.mark.parametrize("settings,message", [
    ({"executor": "slurm", "partition": "gpu\n#SBATCH --x"}, "launcher.partition"),
    ({"executor": "slurm", "account": "a;rm -rf /"}, "shell metacharacters"),
    ({"executor": "slurm", "nodes": -1}, "non-negative integer"),
    ({"executor": "slurm", "gpus": 2}, "unknown key 'gpus'"),
    ({"executor": "slurm", "additional": {"comment": "two words"}}, "launcher.additional.comment"),
    ({"executor": "kubernetes"}, "launcher.executor"),
])
def test_invalid_submission_parameters_are_refused_before_submission(settings, message, tiny_train_config):
    before = _queue_length()
    cfg = to_plain(load_config(tiny_train_config))
    with pytest.raises(ConfigError, match=message):
        launch_many([("train", cfg)], settings)
    assert _queue_length() == before
    assert parse_launcher({"executor": "slurm", "additional": {"exclusive": ""}}).additional == {"exclusive": ""}


def _queue_length():
    if shutil.which("squeue") is None:
        return 0
    return len(subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.splitlines())


def _train_cfg(tiny_train_config, tmp_path, name, *extra):
    return to_plain(load_config(tiny_train_config, [f"trainer.run_dir={tmp_path / name}", *extra], phase="train"))


@slurm
def test_failing_job_reports_state_and_stderr_tail(tmp_path):
    cfg = to_plain(load_config(REPO / "configs/mnist5k/base.yaml", [f"output_dir={tmp_path}", "data.name=image_folder",
                                                                    f"data.root={tmp_path / 'no-such-folder'}"]))
    with pytest.raises(SlurmJobFailed, match=r"(?s)SLURM job \d+ ended in state FAILED.*no-such-folder does not exist"):
        launch_many([("classifier", cfg)], SLURM)


def _last_logged_step(run_dir) -> int:
    """The last step a running job logged (its run store's log.csv: the run folder's copy is made when it ends)."""
    from speedpipe.runstore import current_state

    state = current_state(run_dir)
    log = state / "log.csv" if state is not None else run_dir / "log.csv"
    lines = log.read_text().splitlines() if log.exists() else []
    return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0


@slurm
@pytest.mark.parametrize("interrupt,nodes", [("pre-timeout signal", 1), ("scontrol requeue", 2)])
def test_interrupted_job_is_requeued_and_resumes_bit_identical(tiny_train_config, tmp_path, interrupt, nodes):
    """A training job interrupted between evaluation checkpoints (only the last step is one) by SLURM's pre-timeout
    signal (USR2) or by `scontrol requeue` redoes at most the resume interval (25 steps) and ends bit-identical to an
    uninterrupted run: one process, or for a job on two nodes (one task each) the same job uninterrupted. (A one-node
    job's requeue is the same restart and resume: the two-node case covers it.)"""
    from conftest import events
    from speedpipe.checkpoint import load_checkpoint
    from speedpipe.stages import train

    launcher = {**SLURM, "nodes": nodes}
    require_nodes(nodes)
    steps = ["trainer.steps=200", "trainer.ckpt_every=200", "trainer.log_every=5", "trainer.resume_every_steps=25",
             "trainer.resume_every_minutes=0"]
    if nodes == 1:
        reference = train.run(load_config(tiny_train_config, [f"trainer.run_dir={tmp_path / 'ref'}", *steps], phase="train"))
    else:
        launch_many([("train", _train_cfg(tiny_train_config, tmp_path, "ref", *steps))], launcher)
        reference = tmp_path / "ref"
    run_dir = tmp_path / "slurm"
    cfg = _train_cfg(tiny_train_config, tmp_path, "slurm", *steps)
    interrupted = {}

    def watch_and_interrupt():
        deadline = time.time() + 120
        while time.time() < deadline and _last_logged_step(run_dir) < 100:
            time.sleep(0.02)
        ids = queued_job_ids(_job_name("train", cfg))
        if ids and not (run_dir / "ckpt-0000200.pt").exists():
            interrupted["step"] = _last_logged_step(run_dir)
            command = ["scontrol", "requeue", ids[0]] if interrupt == "scontrol requeue" else ["scancel", "--signal=USR2", ids[0]]
            subprocess.run(command, check=True)
            _start_when_requeued(ids[0])

    watcher = threading.Thread(target=watch_and_interrupt)
    watcher.start()
    launch_many([("train", cfg)], launcher)
    watcher.join()
    assert interrupted, "the job finished before it could be interrupted"
    resume = [e for e in events(run_dir) if e["event"] == "resume"]
    assert len(resume) == 1, events(run_dir)
    assert interrupted["step"] - 25 <= resume[0]["step"] and resume[0]["step"] >= 100, (interrupted, resume)
    if interrupt == "pre-timeout signal":  # saved at the step boundary after the signal: nothing is redone
        preempted = next(e for e in events(run_dir) if e["event"] == "preempted")
        assert preempted["step"] == resume[0]["step"] >= interrupted["step"] and preempted["source"] == "latest.pt"
    if nodes == 2:  # the start and the resume each ran a rank on each node
        ranks = [e["source"] for e in events(run_dir) if e["event"] == "ranks"]
        assert len(ranks) == 2 and all(len({r.split("@")[1].split(":")[0] for r in row.split()}) == 2 for row in ranks), ranks
    a, b = load_checkpoint(reference / "ckpt-0000200.pt"), load_checkpoint(run_dir / "ckpt-0000200.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


@slurm
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_ends_its_two_node_job_with_an_error_naming_it(tiny_train_config, tmp_path, fault):
    """Rank 1 on the second node SIGKILLed (dead: the job fails at once, naming the task and its node) or SIGSTOPped
    (hung, as behind a lost network: rank 0's all-reduce gives up after the launcher's collective timeout, and srun
    --kill-on-bad-exit ends the stopped peer) -- never a hang: a job still queued a minute after the timeout is
    cancelled and the test fails."""
    require_nodes(2)
    timeout = 20
    run_dir = tmp_path / "dead"
    cfg = _train_cfg(tiny_train_config, tmp_path, "dead", "trainer.steps=1000000", "trainer.ckpt_every=1000000")
    signalled = {}

    def signal_rank_1():
        deadline = time.time() + 120
        while time.time() < deadline and not signalled:
            rows = [e for e in _running_events(run_dir) if e["event"] == "ranks"]
            if rows:
                rank, where = rows[0]["source"].split()[1].split("@")
                os.kill(int(where.split(":")[1]), getattr(signal, fault))
                signalled.update(rank=rank, host=where.split(":")[0], at=time.time())
            time.sleep(0.1)
        if not ended.wait(timeout + 60):  # the job still runs: it hangs
            for job_id in queued_job_ids(_job_name("train", cfg)):
                subprocess.run(["scancel", job_id])

    ended = threading.Event()
    watcher = threading.Thread(target=signal_rank_1)
    watcher.start()
    try:
        with pytest.raises(SlurmJobFailed) as failure:
            launch_many([("train", cfg)], {**SLURM, "nodes": 2, "collective_timeout_s": timeout})
    finally:
        ended.set()
        end = time.time()
        watcher.join()
    assert signalled["rank"] == "1" and "ended in state FAILED." in str(failure.value)
    if fault == "SIGKILL":  # the dead task named; its peer ended at once by srun
        assert f"Task(s) 1 (on {signalled['host']}) ended without a result or an error" in str(failure.value)
    else:  # no process knows which rank hangs: rank 0's all-reduce gives up after the launcher's timeout
        assert f"Timed out waiting {timeout * 1000}ms" in str(failure.value)
        assert end - signalled["at"] > timeout
    assert end - signalled["at"] < timeout + 30, f"the job outlived its {fault} rank by {end - signalled['at']:.0f} s"


def _running_events(run_dir) -> list[dict]:
    """The rows of a running job's events.csv (in its run store)."""
    import csv

    from speedpipe.runstore import current_state

    state = current_state(run_dir)
    if state is None or not (state / "events.csv").exists():
        return []
    with open(state / "events.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_local_job_stopped_by_a_signal_saves_its_step_and_resumes_bit_identical(tiny_train_config, tmp_path, signum):
    """A stage run in a local process (a Snakemake job, a command) stopped by SIGTERM (Snakemake stopping its jobs,
    kill) or SIGINT (Ctrl-C) saves its state at the step boundary instead of dying mid-step; the same command resumes
    from exactly that step and ends bit-identical to an uninterrupted run."""
    from conftest import events
    from speedpipe.checkpoint import load_checkpoint
    from speedpipe.stages import train

    steps = ["trainer.steps=200", "trainer.ckpt_every=200", "trainer.log_every=5", "trainer.resume_every_minutes=0"]
    reference = train.run(load_config(tiny_train_config, [f"trainer.run_dir={tmp_path / 'ref'}", *steps], phase="train"))
    overrides = [str(tiny_train_config), f"trainer.run_dir={tmp_path / 'local'}", *steps]
    code = ("import sys; from speedpipe.config import load_config, to_plain; from speedpipe.launch import launch_many; "
            "launch_many([('train', to_plain(load_config(sys.argv[1], sys.argv[2:], phase='train')))])")
    job = subprocess.Popen([sys.executable, "-c", code, *overrides], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and _last_logged_step(tmp_path / "local") < 50:
        time.sleep(0.02)
    job.send_signal(signum)
    output = job.communicate(timeout=60)[0]
    assert job.returncode != 0 and f"stopped by {signal.Signals(signum).name} after step" in output, output[-2000:]
    stopped = [e for e in events(tmp_path / "local") if e["event"] == "terminated"]
    assert len(stopped) == 1 and 50 <= stopped[0]["step"] < 200 and stopped[0]["source"] == "latest.pt", stopped

    launch_many([("train", _train_cfg(tiny_train_config, tmp_path, "local", *steps))])
    resume = [e for e in events(tmp_path / "local") if e["event"] == "resume"]
    assert [(e["step"], e["source"]) for e in resume] == [(stopped[0]["step"], "latest.pt")]
    a, b = load_checkpoint(reference / "ckpt-0000200.pt"), load_checkpoint(tmp_path / "local" / "ckpt-0000200.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_saved_step(tiny_train_config, tmp_path):
    """Two local ranks (as torchrun starts them); SIGTERM reaches rank 1 only: the ranks agree at the next step
    boundary, rank 0 saves that step, and both stop there (a rank stopping alone would leave the other in an
    all-reduce it never joins, its step unsaved)."""
    import socket

    from conftest import events

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [str(tiny_train_config), f"trainer.run_dir={tmp_path / 'two'}", "trainer.steps=100000",
                 "trainer.ckpt_every=100000", "trainer.log_every=5", "trainer.resume_every_minutes=0"]
    code = ("import sys; from speedpipe.config import load_config, to_plain; from speedpipe.launch import launch_many; "
            "launch_many([('train', to_plain(load_config(sys.argv[1], sys.argv[2:], phase='train')))])")
    ranks = [subprocess.Popen([sys.executable, "-c", code, *overrides], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    deadline = time.time() + 120
    while time.time() < deadline and _last_logged_step(tmp_path / "two") < 30 and all(r.poll() is None for r in ranks):
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGTERM)
    outputs = [r.communicate(timeout=60)[0] for r in ranks]
    stopped = [re.search(r"stopped by SIGTERM after step (\d+)", out) for out in outputs]
    assert all(stopped), outputs[0][-1500:] + outputs[1][-1500:]
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step >= 30
    assert [(e["event"], e["step"], e["source"]) for e in events(tmp_path / "two") if e["event"] == "terminated"] == \
        [("terminated", step, "latest.pt")]
    from speedpipe.io import safe_torch_load
    from speedpipe.runstore import current_state

    assert safe_torch_load(current_state(tmp_path / "two") / "latest.pt")["step"] == step


def _start_when_requeued(job_id, timeout=60):
    """SLURM holds a requeued job for two minutes (pending, reason BeginTime); the test cluster is idle, so the hold
    only costs time: start the job as soon as it is held."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout.split()
        if state == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.1)


def _job_name(stage, cfg):
    from speedpipe.launch import config_hash

    return f"speedpipe-{stage}-{config_hash(stage, cfg)}"


def _launch_in_subprocess(cfg_path_overrides, tmp_path):
    code = ("import sys; from speedpipe.config import load_config, to_plain; from speedpipe.launch import launch_many; "
            f"cfg = to_plain(load_config(sys.argv[1], sys.argv[2:], phase='train')); launch_many([('train', cfg)], {SLURM!r})")
    return subprocess.Popen([sys.executable, "-c", code, *cfg_path_overrides], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_until_running(name, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = queued_job_ids(name)
        if ids and job_state(ids[0]) == "RUNNING":
            return ids[0]
        time.sleep(0.2)
    raise AssertionError(f"job {name} did not start running")


@slurm
def test_scancel_fails_the_launch_within_a_minute(tiny_train_config, tmp_path):
    overrides = [f"trainer.run_dir={tmp_path / 'cancel'}", "trainer.steps=1000000"]
    cfg = to_plain(load_config(tiny_train_config, overrides, phase="train"))
    proc = _launch_in_subprocess([str(tiny_train_config), *overrides], tmp_path)
    job_id = _wait_until_running(_job_name("train", cfg))
    subprocess.run(["scancel", job_id], check=True)
    start = time.time()
    out, _ = proc.communicate(timeout=60)
    assert time.time() - start < 60
    assert proc.returncode != 0 and f"SLURM job {job_id} ended in state CANCELLED" in out


@slurm
def test_relaunch_after_the_launcher_died_reattaches(tiny_train_config, tmp_path):
    overrides = [f"trainer.run_dir={tmp_path / 'attach'}", "trainer.steps=300", "trainer.ckpt_every=300"]
    cfg = to_plain(load_config(tiny_train_config, overrides, phase="train"))
    proc = _launch_in_subprocess([str(tiny_train_config), *overrides], tmp_path)
    job_id = _wait_until_running(_job_name("train", cfg))
    proc.send_signal(signal.SIGKILL)  # the process that submitted (Snakemake's job) dies; the SLURM job runs on
    proc.wait()
    messages = []
    launch_many([("train", cfg)], SLURM, log=messages.append)
    assert messages[0] == f"speedpipe: re-attaching to SLURM job {job_id} ({_job_name('train', cfg)}), still in the queue"
    assert not [m for m in messages if "submitted SLURM job" in m]
    assert (tmp_path / "attach" / "ckpt-0000300.pt").exists()
    assert job_state(job_id) == "COMPLETED"


@slurm
def test_two_task_slurm_job_runs_ddp_like_one_process(tiny_train_config, tmp_path):
    import csv

    from speedpipe.stages import train

    steps = ["trainer.steps=6", "trainer.log_every=1", "trainer.ckpt_every=6"]
    single = train.run(load_config(tiny_train_config, [f"trainer.run_dir={tmp_path / 'one'}", *steps], phase="train"))
    launch_many([("train", _train_cfg(tiny_train_config, tmp_path, "two", *steps))], {**SLURM, "tasks_per_node": 2})
    read = lambda d: [float(r["loss"]) for r in csv.DictReader(open(d / "log.csv"))]  # noqa: E731
    assert read(tmp_path / "two") == pytest.approx(read(single), rel=1e-5)
