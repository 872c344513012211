"""The content of a user's input file or folder as one hash, cheap to re-check when planning an experiment.

`content_fingerprint(path, cache_dir)`: sha256 over the sorted (relative path, sha256 of the file's content) pairs of
a file or of every file below a folder (recursive; hidden files and folders and operating-system metadata are left
out as speedpipe.data.folders leaves them out of a photo folder: a .DS_Store changes nothing). Where the data lies
does not enter it: the same files under another path, or on another machine, give the same fingerprint.

Hashing ImageNet's 1.28M files takes minutes, so with a cache_dir each file's content hash is remembered under its
stat key (size, mtime_ns, ctime_ns, inode) in one JSON file per fingerprinted path: a file whose stat key is
unchanged is not read again; a changed or new one is. A rewrite that restores the size and the modification time
still changes the ctime (which no user call can set), so it is read and its content decides. Moved or copied data
has new stat keys: it is hashed again and gives the same fingerprint.

Imports neither torch, numpy nor Pillow: Snakemake calls this while it plans (speedpipe.workflow.Experiment.job_params).
"""
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from speedpipe.data.folders import is_hidden

_CACHE_VERSION = 2  # bump when what a cache file holds, or how a file is hashed, changes
UNREADABLE = "unreadable"  # the content hash of a file that cannot be read (a broken link, no permission): not cached


def _hash_file(path: str) -> str:
    """sha256 of one file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _files(root: Path) -> list[tuple[str, str]]:
    """(relative path with '/' separators, absolute path) of every file below a folder, hidden and OS-metadata entries
    left out at every level; links are followed (a folder reached twice through links is listed once)."""
    found, seen = [], set()

    def walk(folder: str, prefix: str):
        try:
            real = os.path.realpath(folder)
            if real in seen:  # a link back up the tree
                return
            seen.add(real)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            found.append((prefix.rstrip("/") or ".", folder))  # an unreadable folder: hashed as unreadable
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                walk(entry.path, f"{prefix}{entry.name}/")
            else:
                found.append((f"{prefix}{entry.name}", entry.path))

    walk(str(root), "")
    return found


def _cache_file(cache_dir, root: Path, kind: str) -> Path:
    return Path(cache_dir) / f"{hashlib.sha256(f'{kind}:{root}'.encode()).hexdigest()[:32]}.json"


def _read_cache(path: Path | None, root: Path) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or data.get("path") != str(root):
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, root: Path, files: dict):
    """Atomically (a temporary file in the same folder, renamed): a planner killed mid-write leaves the old cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "path": str(root), "files": files}, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def content_fingerprint(path, cache_dir=None) -> str:
    """sha256 (hex) of the contents of a file or a folder (see the module docstring); with cache_dir, the content hashes
    of files whose stat key has not changed are taken from cache_dir instead of being read again."""
    root = Path(os.path.abspath(path))
    if not root.exists():
        raise FileNotFoundError(f"cannot fingerprint {root}: no such file or folder")
    folder = root.is_dir()
    hashes = _content_hashes(root, _files(root) if folder else [("", str(root))], cache_dir, "tree")
    digest = hashlib.sha256(b"folder\n" if folder else b"file\n")
    for relative in sorted(hashes):
        digest.update(f"{relative}\0{hashes[relative]}\n".encode())
    return digest.hexdigest()


def file_contents(root, relative_paths, cache_dir=None) -> dict[str, str]:
    """relative path -> sha256 of the content of the given files below root (a dataset's listed images), with the same
    cache of content hashes under stat keys as content_fingerprint."""
    root = Path(os.path.abspath(root))
    listing = [(str(r), str(root / r)) for r in relative_paths]
    return _content_hashes(root, listing, cache_dir, "files")


def _content_hashes(root: Path, listing, cache_dir, kind: str) -> dict[str, str]:
    cache_path = _cache_file(cache_dir, root, kind) if cache_dir is not None else None
    remembered = _read_cache(cache_path, root)
    files, changed = {}, len(remembered) != len(listing)
    for relative, full in listing:
        try:
            key = _stat_key(os.stat(full))
        except OSError:
            files[relative] = None  # a broken link
            changed = True
            continue
        old = remembered.get(relative)
        if old is not None and old[:4] == key:
            files[relative] = old
            continue
        try:
            files[relative] = [*key, _hash_file(full)]
        except OSError:
            files[relative] = None  # unreadable (permissions): the stage that reads it says so
        changed = True
    if cache_path is not None and changed:
        with contextlib.suppress(OSError):  # a read-only cache folder costs speed, never the answer
            _write_cache(cache_path, root, {k: v for k, v in files.items() if v is not None})
    return {relative: entry[4] if entry is not None else UNREADABLE for relative, entry in files.items()}
