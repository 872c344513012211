"""A user's own photo folders read as the user expects (issue 26, item 6): hidden files and OS metadata are never a class
or an image, every picture format Pillow reads is read, photos are upright by their EXIF orientation, 16-bit and float
greyscale are scaled rather than clipped, and what is left out is counted by reason and printed when the dataset opens.
"""
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from speedpipe.data.folders import (BESIDE_CLASSES, HIDDEN, IMAGE_EXTENSIONS, NESTED, NOT_IMAGE, UNREADABLE,
                                    count_images, list_images, scan_images)
from speedpipe.data.images import ImageFolder, open_image_dataset
from user_data import photo


def _photos(folder, count, seed=0, suffix=".jpg"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(rng, (int(rng.integers(40, 90)), int(rng.integers(40, 90))), i).save(folder / f"photo_{i}{suffix}")
    return folder


def _os_clutter(folder):
    """What a zip made on a Mac, a Jupyter session, Finder and Windows Explorer leave beside photos: each looks like an
    image or a class to a naive listing."""
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._photo_0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (32, 32), (0, 255, 0)).save(folder / ".ipynb_checkpoints" / "x.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._photo_1.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    return 5  # hidden or OS metadata entries


def _flat_folder_with_clutter(tmp_path):
    root = _photos(tmp_path / "holiday", 3)
    hidden = _os_clutter(root)
    (root / "notes.txt").write_text("taken in June")
    return root, hidden


def test_a_flat_folder_with_os_clutter_is_one_class_of_the_real_photos(tmp_path):
    root, hidden = _flat_folder_with_clutter(tmp_path)
    listing = scan_images(root)
    assert listing.classes == ["holiday"]
    assert [(f.name, label) for f, label in listing.files] == [(f"photo_{i}.jpg", 0) for i in range(3)]
    assert listing.skipped == {HIDDEN: hidden, NOT_IMAGE: 1}
    assert list_images(root) == (listing.classes, listing.files)
    dataset = ImageFolder(root, 16)
    assert len(dataset) == 3 and dataset.num_classes == 1 and dataset.skipped == {HIDDEN: hidden, NOT_IMAGE: 1}
    assert all(dataset[i][0].shape == (3, 16, 16) for i in range(3))


def test_a_hidden_folder_beside_class_folders_is_not_a_class(tmp_path):
    root = tmp_path / "pets"
    _photos(root / "cats", 2)
    _photos(root / "dogs", 3, seed=1)
    hidden = _os_clutter(root)
    (root / "cats" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "dogs" / "@eaDir").mkdir()  # Synology thumbnails
    (root / "dogs" / "@eaDir" / "photo_0.jpg").mkdir()
    (root / "dogs" / "best").mkdir()  # not read: classes are one level deep
    Image.new("RGB", (30, 30)).save(root / "stray.png")
    listing = scan_images(root)
    assert listing.classes == ["cats", "dogs"]
    assert [(f.parent.name, f.name, label) for f, label in listing.files] == \
        [("cats", "photo_0.jpg", 0), ("cats", "photo_1.jpg", 0)] + [("dogs", f"photo_{i}.jpg", 1) for i in range(3)]
    assert listing.skipped == {HIDDEN: hidden + 2, NESTED: 1, BESIDE_CLASSES: 1}
    assert count_images(root) == (5, 2)
    assert count_images(root, tmp_path / "cache") == (5, 2) == count_images(root, tmp_path / "cache")  # cached


def test_listing_decodes_nothing_and_stays_free_of_pillow_and_torch(tmp_path, monkeypatch):
    root, _ = _flat_folder_with_clutter(tmp_path)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was opened while listing")

    monkeypatch.setattr(Image, "open", no_decoding)
    assert len(ImageFolder(root, 16)) == 4 and count_images(root, tmp_path / "cache") == (4, 1)
    code = "import sys, speedpipe.data.folders; print(sorted({'PIL', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_a_corrupt_photo_is_counted_when_read_and_strict_still_stops(tmp_path):
    root = _photos(tmp_path / "flat", 2)
    (root / "photo_9.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    dataset = ImageFolder(root, 16)
    assert dataset.skipped == {}
    assert [dataset[i] is None for i in range(3)] == [False, False, True]
    assert dataset.skipped == {UNREADABLE: 1}
    dataset[2]
    assert dataset.skipped == {UNREADABLE: 1}, "a file read twice is one file"
    with pytest.raises(Exception, match="photo_9.jpg"):
        ImageFolder(root, 16, strict=True)[2]


@pytest.mark.parametrize("suffix, colour", [(".tif", (200, 30, 30)), (".tiff", (30, 200, 30)), (".bmp", (30, 30, 200)),
                                            (".gif", (200, 200, 30)), (".ppm", (30, 200, 200)), (".TIF", (120, 60, 10))])
def test_tiff_bmp_and_other_pillow_formats_are_read(tmp_path, suffix, colour):
    root = tmp_path / "scans"
    _photos(root, 1, suffix=".png")
    Image.new("RGB", (40, 30), colour).save(root / f"scan{suffix}")
    dataset = ImageFolder(root, 16)
    assert [f.name for f, _ in dataset.files] == ["photo_0.png", f"scan{suffix}"] and dataset.skipped == {}
    image, label = dataset[1]
    assert label == 0 and torch.allclose(image[:, 8, 8], torch.tensor(colour) / 127.5 - 1, atol=0.02)


def test_every_image_extension_is_one_pillow_opens():
    registered = Image.registered_extensions()  # loads every plugin, filling Image.OPEN
    readable = set(Image.OPEN) | {"MPO"}  # MPO (multi-picture JPEG) files are opened by the JPEG opener
    opened = {ext for ext, fmt in registered.items() if fmt in readable}
    assert IMAGE_EXTENSIONS <= opened, IMAGE_EXTENSIONS - opened
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"} <= IMAGE_EXTENSIONS
    assert not {".pdf", ".mpg", ".mpeg", ".eps", ".h5"} & IMAGE_EXTENSIONS, "not pictures, or not readable here"


def test_a_phone_photo_is_read_upright_by_its_exif_orientation(tmp_path):
    """Stored as the sensor read it (40 wide, 20 high: red left half, blue right half) with orientation 6 ("rotate 90
    degrees clockwise to show"): upright it is 20 wide and 40 high, red on top."""
    root = tmp_path / "phone"
    root.mkdir()
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(root / "IMG_0001.jpg", quality=95, exif=exif)
    image, _ = ImageFolder(root, 16)[0]
    rgb = (image + 1) * 127.5
    top, bottom = rgb[:, 2, :], rgb[:, 13, :]  # rows of the 16x16 center crop of the 16x32 upright picture
    assert (top[0] > 200).all() and (top[2] < 60).all(), "the top is the red half"
    assert (bottom[2] > 200).all() and (bottom[0] < 60).all(), "the bottom is the blue half"


def _gradient(mode):
    """A 64x64 horizontal gradient from black to white in a high bit-depth greyscale mode."""
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))
    if mode == "I;16":
        return Image.fromarray(np.round(ramp * 65535).astype(np.uint16)), ".png"
    if mode == "I":
        return Image.fromarray(np.round(ramp * 65535).astype(np.int32)), ".tif"
    if mode == "F01":
        return Image.fromarray(ramp.astype(np.float32)), ".tif"
    return Image.fromarray((ramp * 255).astype(np.float32)), ".tif"  # F in 0..255


@pytest.mark.parametrize("mode, opened", [("I;16", "I;16"), ("I", "I"), ("F01", "F"), ("F255", "F")])
def test_high_bit_depth_greyscale_is_scaled_not_clipped(tmp_path, mode, opened):
    root = tmp_path / "scans"
    root.mkdir()
    image, suffix = _gradient(mode)
    image.save(root / f"gradient{suffix}")
    assert Image.open(root / f"gradient{suffix}").mode == opened
    x, _ = ImageFolder(root, 32)[0]
    grey = (x + 1) * 127.5
    assert abs(float(grey.mean()) - 127.5) < 3, float(grey.mean())  # clipped at 255, a 16-bit gradient is 254.5
    assert float(grey[:, :, 0].mean()) < 10 and float(grey[:, :, -1].mean()) > 245, "black on the left, white on the right"
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_opening_the_dataset_prints_what_was_read_and_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    root, hidden = _flat_folder_with_clutter(tmp_path)
    cfg = SimpleNamespace(name="image_folder", root=str(root), image_size=16, strict=False, mnist_fit="pad")
    dataset = open_image_dataset(cfg)
    assert capsys.readouterr().out == \
        f"speedpipe: data.root {root}: 3 images in 1 class; skipped: {hidden} hidden or OS metadata, 1 not an image format\n"
    assert len(dataset) == 3
    monkeypatch.setenv("RANK", "1")  # the other ranks of a distributed job stay quiet
    open_image_dataset(cfg)
    assert capsys.readouterr().out == ""
    for i in range(1200):
        (root / f"copy_{i}.jpg").symlink_to(root / "photo_0.jpg")
    _photos(tmp_path / "two" / "a", 1)
    _photos(tmp_path / "two" / "b", 1)
    monkeypatch.delenv("RANK")
    open_image_dataset(cfg)
    open_image_dataset(SimpleNamespace(**{**vars(cfg), "root": str(tmp_path / "two")}))
    assert capsys.readouterr().out.splitlines() == [
        f"speedpipe: data.root {root}: 1,203 images in 1 class; skipped: {hidden} hidden or OS metadata, 1 not an image format",
        f"speedpipe: data.root {tmp_path / 'two'}: 2 images in 2 classes; nothing skipped"]


def test_a_folder_of_only_clutter_is_refused_naming_data_root_and_what_was_skipped(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    _os_clutter(root)
    with pytest.raises(Exception, match=r"data\.root.*no images found.*5 hidden or OS metadata"):
        ImageFolder(root, 16)
