"""Atomic file output: write to a temporary name in the same folder, then rename.

A killed job leaves at most a `.tmp-*` file behind, never a file with the final name that looks finished.
"""
import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """An output could not be written (a full disk, a quota, a lost mount); the message names the file, and the file of
    that name, if there was one, is unchanged."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success its data is synced to disk and it is renamed onto `path` with
    the permissions the umask gives a new file (mkstemp makes it 0600, unreadable to the group on a shared cluster),
    and the rename is synced too (the folder): after a crash the file is either the old one or the whole new one. On
    error the temporary file is removed and a WriteError names the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except Exception as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, WriteError) or not _is_write_failure(err):
            raise
        free = shutil.disk_usage(path.parent).free / 2**20
        raise WriteError(f"cannot write {path}: {err} ({free:.1f} MiB free on its file system); the previous {path.name}, "
                         f"if any, is unchanged") from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_write_failure(err: Exception) -> bool:
    """An OSError, or the RuntimeError torch.save raises when its writes fail (a full disk shows as 'unexpected pos')."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and "inline_container" in str(err))


def _fsync(path, flags):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj, path) -> None:
    """torch.save through a file object: the archive's inner folder is then 'archive', not the temporary file's random
    name. (The bytes of two equal states can still differ, by pickle's memo: compare contents with state_fingerprint.)"""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def safe_torch_load(path, map_location="cpu"):
    """torch.load with weights_only=True and an error that names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as err:
        raise ValueError(f"cannot load {path} (corrupt, truncated or not a weights-only checkpoint): {err}") from None


def state_fingerprint(obj) -> str:
    """sha256 of a checkpoint's contents (nested dicts and lists of tensors and plain values), not of its file's bytes."""
    h = hashlib.sha256()

    def visit(node):
        if isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(node, dict):
            h.update(f"dict {len(node)}".encode())
            for key in sorted(node, key=str):
                h.update(f"key {key!r}".encode())
                visit(node[key])
        elif isinstance(node, (list, tuple)):
            h.update(f"list {len(node)}".encode())
            for item in node:
                visit(item)
        else:
            h.update(f"value {node!r}".encode())

    visit(obj)
    return h.hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path) -> str:
    """sha256 of a weights file, or of every weights file in a directory (sorted by name)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")):
        h.update(sha256_file(f).encode())
    return h.hexdigest()
