"""A long run's state where no cleanup removes it, and the run folder's files made from it.

Snakemake removes a job's declared outputs before it re-runs the job, after the job fails, and under
--rerun-incomplete. A long stage therefore keeps everything that took compute in a store beside its declared files,
one state folder per run settings, and makes the declared files from it:

    {run folder}/ckpt-{step:07d}.pt    hard links to the current state's checkpoints (a copy where links fail)
    {run folder}/log.csv, config.yaml  copies of the current state's files;  events.csv: a link to its events
    {run folder}/store/{identity}/     ckpt-*.pt, latest.pt, log.csv, events.csv, config.yaml, settings.json
    {run folder}/store/current         the identity of the state the last run opened
    {run folder}/.lock                 held by the one process that writes the run (an flock: a dead process holds none)

`identity` hashes what a resumed run must share with the run it resumes (the stage's version, its settings, its
data's and teacher's content): a re-run with the same identity resumes from its state's newest valid file and
re-makes every declared file; a run of other settings gets a state folder of its own, and the old one stays (listed
by `python -m speedpipe.runstore list`, removed only by its `prune` command). Removing a declared file removes a link,
never the data.
"""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from speedpipe.layout import CKPT_NAME

STORE = "store"
LOCK = ".lock"
SETTINGS = "settings.json"
CURRENT = "current"
RESUME_FILE = "latest.pt"
COPIED = ("log.csv", "config.yaml")  # rewritten in place by a resumed run: published as copies
LINKED = ("events.csv",)
_HELD: set[str] = set()  # the run folders this process holds the lock of (flock is per open file: never twice)  # only appended to: published as a link, so it shows a running job's events too


def identity(settings: dict) -> str:
    """The state folder name of a run's settings (12 hex digits of their sha256)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class RunFolder:
    """A run folder (train/{run}, distill/{student}, autoencoder/) and the state of one run settings in its store."""

    def __init__(self, path, settings: dict | None):
        self.path = Path(path)
        self.settings = settings or {}
        self.state_dir = self.path / STORE / identity(self.settings)
        self._lock_file = None

    # ----- one writer
    def lock(self, log=print):
        """Take the run folder's lock; while another live process holds it (a job whose Snakemake driver died, a second
        command on the same run), wait for it to end and say whose it is. The kernel releases the lock of a process
        that ends, SIGKILL included (on a network file system, as its lock manager does: a dead node's lock can outlive
        it on NFSv3). A file system without locks (Lustre mounted noflock) runs without one, and says so."""
        self.path.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:
            raise RuntimeError(f"{self.path} is already locked by this process (a run folder has one writer)")
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                log(f"speedpipe: {self.path}: the file system refuses locks ({err.strerror}); running without the one-writer "
                    f"lock: do not start a second run of this folder")
                f.close()
                return
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            log(f"speedpipe: {self.path} is being written by {holder}; waiting for it to end before resuming its state")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        self._lock_file = f
        _HELD.add(key)

    def unlock(self):
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
            _HELD.discard(str(self.path.resolve()))

    # ----- the store
    def open_state(self) -> list[str]:
        """Create the state folder (recording its settings), remove what a killed write left there (.tmp-* files: the lock
        is held, so no write is under way), adopt the files of a run folder written before the store existed, and return
        the other states' folders with the settings in which they differ."""
        from speedpipe.io import atomic_write_text

        self.state_dir.mkdir(parents=True, exist_ok=True)
        for partial in self.state_dir.glob(".tmp-*"):
            partial.unlink()
        if not (self.state_dir / SETTINGS).is_file():
            atomic_write_text(self.state_dir / SETTINGS, json.dumps(self.settings, indent=1, sort_keys=True, default=str))
        atomic_write_text(self.path / STORE / CURRENT, self.state_dir.name + "\n")
        self._adopt_loose_files()
        return [f"{STORE}/{other.name} ({', '.join(differ) or 'the same settings'})"
                for other, differ in superseded(self.path, self.settings)]

    def _published(self, path: Path) -> bool:
        """Whether a run folder's file is one of the store's files (a published link)."""
        return any((state / path.name).exists() and os.path.samefile(state / path.name, path) for state in states(self.path))

    def _adopt_loose_files(self):
        """Checkpoints that are files of their own in the run folder (made before the store): moved into the store, to the
        current state if they recorded the current settings (with the run's log.csv and events.csv), else to a state
        folder of the settings they recorded."""
        loose = [p for p in self.path.iterdir() if (CKPT_NAME.fullmatch(p.name) or p.name == RESUME_FILE)
                 and p.is_file() and not self._published(p)]
        for path in loose:
            from speedpipe.io import safe_torch_load

            try:
                recorded = safe_torch_load(path).get("settings") or {}
            except ValueError:
                recorded = {"unreadable": path.name}
            same = all(recorded.get(k) == v for k, v in self.settings.items() if k != "version")
            target = self.state_dir if same else self.path / STORE / f"adopted-{identity(recorded)}"
            target.mkdir(parents=True, exist_ok=True)
            for name in (path.name, *(("log.csv", "events.csv") if same else ())):
                if (self.path / name).is_file() and not (target / name).exists() and not self._published(self.path / name):
                    shutil.copy2(self.path / name, target / name) if name != path.name else os.replace(path, target / name)

    # ----- the declared files
    def publish_file(self, name: str):
        """Make {run folder}/{name} the state's file of that name (a hard link; a copy where the file system has none)."""
        _link(self.state_dir / name, self.path / name)

    def publish(self):
        """Re-make every declared file from the state (a re-run after Snakemake removed them recomputes nothing) and
        remove the run folder's links to other states' checkpoints (their data stays in the store)."""
        from speedpipe.io import atomic_path

        current = {p.name for p in self.state_dir.iterdir() if CKPT_NAME.fullmatch(p.name)}
        for path in self.path.iterdir():
            if CKPT_NAME.fullmatch(path.name) and path.name not in current and self._published(path):
                path.unlink()  # a link into another state folder
        for name in sorted(current):
            self.publish_file(name)
        for name in COPIED:
            if (self.state_dir / name).is_file():
                with atomic_path(self.path / name) as tmp:
                    shutil.copyfile(self.state_dir / name, tmp)
        for name in LINKED:
            if (self.state_dir / name).is_file():
                self.publish_file(name)


class KeptFiles:
    """The files one stage run of a grouped job writes (a sampling job's samples of several checkpoints), kept where
    Snakemake's cleanup of the failed job does not reach: {folder}/store/{identity}/. A re-run of the job restores the
    finished ones (hard links) instead of computing them again."""

    def __init__(self, files: list[Path], settings: dict):
        self.files = [Path(f) for f in files]
        self.dir = self.files[0].parent / STORE / identity(settings)

    def complete(self) -> bool:
        """Whether every file was kept (read only: each rank of a job may ask)."""
        return all((self.dir / f.name).is_file() for f in self.files)

    def restore(self):
        """Re-make the files from the store (one process: a job's rank 0)."""
        for f in self.files:
            _link(self.dir / f.name, f)

    def keep(self):
        """Keep the written files (links into the store)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            _link(f, self.dir / f.name)


def _link(source: Path, target: Path):
    """Make `target` the file `source` (a hard link; a copy where the file system has none), atomically; a target that
    already is that file is left as it is (its time too: Snakemake does not see it changed)."""
    if target.exists() and os.path.samefile(source, target):
        return
    tmp = target.parent / f".tmp-{target.name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)
    os.utime(target)  # newer than the job's inputs: Snakemake's mtime trigger sees a finished output


def states(run_folder) -> list[Path]:
    """The state folders of a run folder's store, oldest first."""
    store = Path(run_folder) / STORE
    return sorted((p for p in store.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if store.is_dir() else []


def recorded_settings(state_dir) -> dict:
    path = Path(state_dir) / SETTINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def superseded(run_folder, settings: dict) -> list[tuple[Path, list[str]]]:
    """The states of a run folder other than the one of `settings`, each with the setting keys in which it differs."""
    current = identity(settings)
    found = []
    for state in states(run_folder):
        if state.name != current:
            recorded = recorded_settings(state)
            found.append((state, sorted(k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k))))
    return found


def current_state(run_folder) -> Path | None:
    """The state the run folder's last run opened (None in a folder without a store)."""
    path = Path(run_folder) / STORE / CURRENT
    return path.parent / path.read_text().strip() if path.is_file() else None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def state_step(state: Path) -> int:
    """The step a state's run reached (its events.csv's last row; 0 for none)."""
    path = state / "events.csv"
    rows = path.read_text().splitlines()[1:] if path.is_file() else []
    return int(rows[-1].split(",")[2]) if rows else 0


def main(argv=None):
    """`python -m speedpipe.runstore list|prune RESULTS`: the states of every run folder under RESULTS (an experiment's
    results folder), with the step each reached; prune removes the superseded ones (other than the state the run
    folder's last run opened), only with --yes, and a superseded state that got further than the current one only with
    --force as well (the current one may be a run of new settings started and abandoned)."""
    parser = argparse.ArgumentParser(prog="python -m speedpipe.runstore", description=main.__doc__)
    parser.add_argument("action", choices=["list", "prune"])
    parser.add_argument("results", help="an experiment's results folder, e.g. results/demo")
    parser.add_argument("--yes", action="store_true", help="prune: really remove the superseded states")
    parser.add_argument("--force", action="store_true", help="prune: also states that got further than the current one")
    args = parser.parse_args(argv)
    folders = sorted({p.parent.parent.parent for p in Path(args.results).rglob(f"{STORE}/*/{SETTINGS}")})
    freed, spared = 0, []
    for folder in folders:
        current = current_state(folder)
        current_step = state_step(current) if current is not None else 0
        for state in states(folder):
            kept, step, size = state == current, state_step(state), _size(state)
            print(f"{'current   ' if kept else 'superseded'} {state}  step {step}  {size / 2**20:.1f} MiB")
            if args.action != "prune" or kept:
                continue
            if step > current_step and not args.force:
                spared.append(f"{state} (step {step}, the current one {current_step})")
                continue
            freed += size
            if args.yes:
                shutil.rmtree(state)
    if args.action == "prune":
        verb = "removed" if args.yes else "would remove (add --yes to remove)"
        print(f"{verb}: {freed / 2**20:.1f} MiB of superseded states")
        if spared:
            print("kept, further along than their folder's current state (--force removes them too):\n  " + "\n  ".join(spared))
    return 0


if __name__ == "__main__":
    sys.exit(main())
