"""Samples files in the ADM layout: an npz with arr_0 (uint8 images [N, H, W, 3]) and arr_1 (their labels [N]).

The sample stage writes them (np.savez: uncompressed zip members); the evaluate and reference stages read them image by
image from the file (`NpzImages`), so evaluating FID-50K at 256² never holds the 9.8 GB of images in memory, and the
content hash is computed from the same stream.
"""
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from speedpipe.io import atomic_path


class SamplesError(ValueError):
    """A samples or reference npz that cannot be read as the ADM layout; the message names the file."""


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file f, read up to the start of its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def write_npz(path, images: np.ndarray, labels: np.ndarray):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels)


class NpzImages(torch.utils.data.Dataset):
    """The uint8 images of an npz member (arr_0), read one at a time from the file: item i -> (i, uint8 CHW tensor)."""

    def __init__(self, path, member: str = "arr_0"):
        self.path, self.member = Path(path), f"{member}.npy"
        try:
            with zipfile.ZipFile(self.path) as npz, npz.open(self.member) as f:
                shape, fortran_order, dtype = _npy_header(f)
                self._data_start = f.tell()
                compressed = npz.getinfo(self.member).compress_type != zipfile.ZIP_STORED
        except KeyError:
            raise SamplesError(f"{self.path}: no array {member} (an ADM samples npz holds arr_0, uint8 [N, H, W, 3])") from None
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise SamplesError(f"{self.path}: not a readable npz ({err})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran_order:
            raise SamplesError(f"{self.path}: {member} holds {dtype} {tuple(shape)}{' (Fortran order)' if fortran_order else ''}; "
                               f"expected uint8 images of shape [N, H, W, 3] in C order")
        if compressed:
            raise SamplesError(f"{self.path}: {member} is compressed (np.savez_compressed); write samples with np.savez")
        self.shape = tuple(shape)
        self._file = None

    def __len__(self):
        return self.shape[0]

    def _open(self):
        if self._file is None:  # opened lazily: in each data-loader worker process of its own
            self._zip = zipfile.ZipFile(self.path)
            self._file = self._zip.open(self.member)
        return self._file

    def _read(self, start: int, count: int) -> np.ndarray:
        size = int(np.prod(self.shape[1:]))
        f = self._open()
        f.seek(self._data_start + start * size)
        return np.frombuffer(f.read(count * size), dtype=np.uint8).reshape(count, *self.shape[1:])

    def __getitem__(self, i):
        return i, torch.from_numpy(self._read(i, 1)[0].copy()).permute(2, 0, 1)

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_zip": None}

    def sha256(self, chunk: int = 256) -> str:
        """The sha256 of the images' bytes (as of images.tobytes()), read in chunks of images."""
        h = hashlib.sha256()
        for start in range(0, len(self), chunk):
            h.update(self._read(start, min(chunk, len(self) - start)).tobytes())
        return h.hexdigest()

    def array(self) -> np.ndarray:
        """Every image at once (for small files: grids, tests)."""
        return self._read(0, len(self))


def npz_members(path) -> dict[str, tuple[tuple, np.dtype]]:
    """{array name: (shape, dtype)} of an npz, from the members' headers only (nothing is loaded)."""
    members = {}
    try:
        with zipfile.ZipFile(path) as npz:
            for name in npz.namelist():
                with npz.open(name) as f:
                    shape, _, dtype = _npy_header(f)
                members[name.removesuffix(".npy")] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise SamplesError(f"{path}: not a readable npz ({err})") from None
    return members


def read_labels(path) -> np.ndarray | None:
    """arr_1 of an ADM samples npz (the labels the samples were generated for), or None when it has none."""
    with np.load(path, allow_pickle=False) as npz:
        return npz["arr_1"] if "arr_1" in npz else None
