"""The resumable loop shared by the long stages: signal-time saving at step boundaries, cadence, resume source."""
import csv
import os
import signal

import pytest
import torch

from conftest import events
from speedpipe.distributed import DistEnv
from speedpipe.io import safe_torch_load
from speedpipe.loop import Cadence, ResumableLoop, Terminated, defer_signals_to_step_boundaries


class Requeued(Exception):
    """What submitit's handler does after requeueing (it exits the process); here, an exception to catch."""


def _loop(run_dir, steps=10, **cadence):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    loop = ResumableLoop(run_dir, Cadence(steps, log_every=2, ckpt_every=1000, **cadence), {"model": model, "opt": opt},
                         {"gen": gen}, DistEnv(), ["step", "loss", "steps_per_s"])
    return loop, model, opt, gen


def _step_fns(model, opt, gen, signal_at=None, signum=signal.SIGUSR2):
    def forward(step):
        x = torch.randn(8, 3, generator=gen)
        if step == signal_at:
            os.kill(os.getpid(), signum)  # arrives in the middle of the step
        return {"loss": model(x).square().mean()}

    def update(terms):
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()

    return forward, update


def _assert_the_rest_ends_as_an_uninterrupted_run(tmp_path, performed: int):
    """The run in tmp_path/a, stopped part-way, resumed: it performs the rest and ends with an uninterrupted run's
    weights and log rows (but for their timing), the row after the stop included."""
    again, model2, opt2, gen2 = _loop(tmp_path / "a")
    again.resume()
    assert again.run(*_step_fns(model2, opt2, gen2)) == performed
    straight, model3, opt3, gen3 = _loop(tmp_path / "b")
    straight.resume()
    straight.run(*_step_fns(model3, opt3, gen3))
    assert torch.equal(model2.weight, model3.weight) and torch.equal(model2.bias, model3.bias)

    def rows(folder):
        with open(folder / "log.csv") as f:
            return [{k: v for k, v in row.items() if k != "steps_per_s"} for row in csv.DictReader(f)]
    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "b")) == 5


@pytest.fixture
def submitit_like_handler():
    """A SIGUSR2 handler standing in for submitit's (which requeues and exits), wrapped as StageJob wraps it."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise Requeued()

    previous = signal.signal(signal.SIGUSR2, handler)
    defer_signals_to_step_boundaries((signal.SIGUSR2,))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_the_signal_waits_for_the_step_boundary_and_its_state_is_saved(tmp_path, submitit_like_handler):
    loop, model, opt, gen = _loop(tmp_path / "a")
    loop.resume()
    with pytest.raises(Requeued):
        loop.run(*_step_fns(model, opt, gen, signal_at=5))
    assert submitit_like_handler == [signal.SIGUSR2] and loop.step == 5  # step 5 finished before the handler ran
    saved = safe_torch_load(loop.state_dir / "latest.pt")
    assert saved["step"] == 5 and torch.equal(saved["model"]["weight"], model.weight.detach())
    assert [(e["event"], e["step"], e["source"], e["steps_performed"]) for e in events(tmp_path / "a")] == [
        ("start", 0, "", ""), ("preempted", 5, "latest.pt", "5")]

    _assert_the_rest_ends_as_an_uninterrupted_run(tmp_path, performed=5)  # the requeued job


def test_sigterm_stops_the_job_at_the_step_boundary_with_its_state_saved(tmp_path):
    """scancel sends SIGTERM, then SIGKILL after KillWait; submitit's handler ignores SIGTERM (it logs and returns), so
    the steps run until the kill would be lost: the loop saves at the step boundary and stops instead. The stop falls
    between two log rows (every 2 steps): the resumed run's rows equal an uninterrupted run's."""
    bypassed = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: bypassed.append(signum))  # submitit's `bypass`
    defer_signals_to_step_boundaries((signal.SIGTERM,))
    try:
        loop, model, opt, gen = _loop(tmp_path / "a")
        loop.resume()
        with pytest.raises(Terminated, match="SIGTERM after step 5.*the same command resumes it"):
            loop.run(*_step_fns(model, opt, gen, signal_at=5, signum=signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert bypassed == [] and loop.step == 5
    saved = safe_torch_load(loop.state_dir / "latest.pt")
    assert saved["step"] == 5 and torch.equal(saved["model"]["weight"], model.weight.detach())
    assert [(e["event"], e["step"], e["source"]) for e in events(tmp_path / "a")] == [
        ("start", 0, ""), ("terminated", 5, "latest.pt")]
    _assert_the_rest_ends_as_an_uninterrupted_run(tmp_path, performed=5)


def test_without_a_running_loop_the_handler_runs_at_once(submitit_like_handler):
    with pytest.raises(Requeued):
        os.kill(os.getpid(), signal.SIGUSR2)
    assert submitit_like_handler == [signal.SIGUSR2]


def test_resume_prefers_the_newest_state(tmp_path):
    loop, model, opt, gen = _loop(tmp_path, steps=9, resume_every_steps=4)
    loop.resume()
    loop.run(*_step_fns(model, opt, gen))
    assert safe_torch_load(loop.state_dir / "latest.pt")["step"] == 8  # step 9 is the final evaluation checkpoint
    fresh, *_ = _loop(tmp_path, steps=12)
    assert fresh.resume()["step"] == 9 and events(tmp_path)[-1]["source"] == "ckpt-0000009.pt"
    fresh.folder.unlock()
    (loop.state_dir / "ckpt-0000009.pt").unlink()
    (tmp_path / "ckpt-0000009.pt").unlink()  # (its published link alone would be adopted back: it holds the data)
    fresh, *_ = _loop(tmp_path, steps=12)
    assert fresh.resume()["step"] == 8 and events(tmp_path)[-1]["source"] == "latest.pt"
    fresh.folder.unlock()


def test_a_corrupt_resume_file_is_passed_over_for_the_newest_valid_checkpoint(tmp_path):
    """A latest.pt cut short (a full disk on a file system without atomic renames, a bad block) does not stop the
    resume: the newest evaluation checkpoint before it is loaded, and events.csv names the unreadable file."""
    loop, model, opt, gen = _loop(tmp_path, steps=9, resume_every_steps=2, ckpt_steps=(4,))
    loop.resume()
    loop.run(*_step_fns(model, opt, gen))
    (loop.state_dir / "ckpt-0000009.pt").unlink()
    (tmp_path / "ckpt-0000009.pt").unlink()
    latest = loop.state_dir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    fresh, *_ = _loop(tmp_path, steps=9, ckpt_steps=(4,))
    assert fresh.resume()["step"] == 4
    assert [(e["event"], e["source"]) for e in events(tmp_path)[-2:]] == [("unreadable", "latest.pt"), ("resume", "ckpt-0000004.pt")]
    fresh.folder.unlock()


def test_the_declared_files_are_remade_from_the_store(tmp_path):
    """Snakemake removes a job's declared files (before a re-run, after a failure): the re-run finds its state, performs
    no step and links the same checkpoint files (same inode: not rewritten) back into the run folder."""
    loop, model, opt, gen = _loop(tmp_path, steps=6, ckpt_steps=(3,))
    loop.resume()
    loop.run(*_step_fns(model, opt, gen))
    inodes = {p.name: p.stat().st_ino for p in tmp_path.glob("ckpt-*.pt")}
    assert sorted(inodes) == ["ckpt-0000003.pt", "ckpt-0000006.pt"]
    log = (tmp_path / "log.csv").read_text()
    for path in [*tmp_path.glob("ckpt-*.pt"), tmp_path / "log.csv"]:
        path.unlink()
    again, model, opt, gen = _loop(tmp_path, steps=6, ckpt_steps=(3,))
    again.resume()
    assert again.run(*_step_fns(model, opt, gen)) == 0
    assert {p.name: p.stat().st_ino for p in tmp_path.glob("ckpt-*.pt")} == inodes
    assert (tmp_path / "log.csv").read_text() == log


def test_nonfinite_stop_names_the_step_before_any_save(tmp_path):
    loop, model, opt, gen = _loop(tmp_path, resume_every_steps=1)
    loop.resume()
    forward, update = _step_fns(model, opt, gen)

    def poisoned(step):
        terms = forward(step)
        return {"loss": terms["loss"] * (float("nan") if step == 3 else 1.0)}

    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 3.*latest\.pt"):
        loop.run(poisoned, update)
    assert safe_torch_load(loop.state_dir / "latest.pt")["step"] == 2  # nothing saved from step 3 on


def test_a_term_that_first_appears_later_is_checked_too(tmp_path):
    """sCD's tangent exists only after the warm start: a NaN in it (with a finite loss) must still stop the run."""
    loop, model, opt, gen = _loop(tmp_path)
    loop.resume()
    forward, update = _step_fns(model, opt, gen)

    def phases(step):
        terms = forward(step)
        return terms if step < 3 else {**terms, "tangent": torch.full((2,), float("nan") if step == 4 else 1.0)}

    with pytest.raises(FloatingPointError, match=r"non-finite tangent at step 4"):
        loop.run(phases, update)


def test_a_declared_checkpoint_below_the_newest_state_is_made_by_a_replay(tmp_path):
    """An evaluation step added to a finished run, or a shorter run asked of it: the checkpoint is made by replaying from
    the newest checkpoint before it, equal to an uninterrupted run's, and the kept checkpoints are not written again."""
    loop, model, opt, gen = _loop(tmp_path / "run", steps=9, ckpt_steps=(6,))
    loop.resume()
    loop.run(*_step_fns(model, opt, gen))
    kept = {p.name: p.stat().st_ino for p in loop.state_dir.glob("ckpt-*.pt")}
    assert sorted(kept) == ["ckpt-0000006.pt", "ckpt-0000009.pt"]
    fresh, model, opt, gen = _loop(tmp_path / "fresh", steps=9, ckpt_steps=(3, 6))
    fresh.resume()
    fresh.run(*_step_fns(model, opt, gen))

    again, model, opt, gen = _loop(tmp_path / "run", steps=9, ckpt_steps=(3, 6))
    again.resume()
    assert again.step == 0 and events(tmp_path / "run")[-2]["event"] == "replay"
    assert again.run(*_step_fns(model, opt, gen)) == 9
    replayed, reference = (safe_torch_load(d / "ckpt-0000003.pt") for d in (again.state_dir, fresh.state_dir))
    assert torch.equal(replayed["model"]["weight"], reference["model"]["weight"])
    assert {p.name: p.stat().st_ino for p in again.state_dir.glob("ckpt-*.pt") if p.name in kept} == kept
    assert (tmp_path / "run" / "ckpt-0000003.pt").exists()

    shorter, model, opt, gen = _loop(tmp_path / "run", steps=4, ckpt_steps=(3,))
    shorter.resume()
    assert shorter.step == 3 and shorter.run(*_step_fns(model, opt, gen)) == 1
    assert safe_torch_load(shorter.state_dir / "ckpt-0000004.pt")["step"] == 4


def test_a_failed_resume_releases_the_lock_and_a_killed_write_leaves_nothing(tmp_path):
    loop, model, opt, gen = _loop(tmp_path, steps=3)
    loop.resume()
    loop.run(*_step_fns(model, opt, gen))
    (loop.state_dir / ".tmp-ckpt-0000006.pt.abc123").write_bytes(b"half a checkpoint")  # a write killed mid-way
    broken, *_ = _loop(tmp_path, steps=6)
    broken.stateful["model"] = torch.nn.Linear(4, 1)  # its state does not fit: load_state_dict raises
    with pytest.raises(RuntimeError, match="size mismatch"):
        broken.resume()
    assert not list(loop.state_dir.glob(".tmp-*"))
    after, *_ = _loop(tmp_path, steps=6)
    after.resume()  # would wait for ever (or be refused) if the failed resume had kept the lock
    after.folder.unlock()


def test_a_run_folder_written_before_the_store_is_adopted_with_its_log(tmp_path):
    """An upgrade: a run folder whose checkpoints, log.csv and events.csv are files of their own (no store) resumes from
    them, and its log keeps the rows logged before."""
    import shutil

    loop, model, opt, gen = _loop(tmp_path / "made", steps=4, ckpt_steps=(2,))
    loop.resume()
    loop.run(*_step_fns(model, opt, gen))
    old = tmp_path / "old"
    old.mkdir()
    for name in ("ckpt-0000002.pt", "log.csv", "events.csv"):
        shutil.copy(loop.state_dir / name, old / name)  # files of their own, as written before the store
    rows = (old / "log.csv").read_text().splitlines()[:2]  # the header and step 2 (the resume drops step 4's row)
    assert rows[1].startswith("2,")
    later, model, opt, gen = _loop(old, steps=4, ckpt_steps=(2,))
    assert later.resume()["step"] == 2 and (later.state_dir / "ckpt-0000002.pt").is_file()
    later.run(*_step_fns(model, opt, gen))
    assert (old / "log.csv").read_text().splitlines()[:2] == rows
    assert (old / "ckpt-0000002.pt").samefile(later.state_dir / "ckpt-0000002.pt")
