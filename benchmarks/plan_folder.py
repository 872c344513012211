"""What tracking a photo folder's contents adds to planning an experiment (speedpipe.fingerprint, issue 26 item 4).

    python benchmarks/plan_folder.py                       # 100,000 files of 2 KB in 100 class folders
    python benchmarks/plan_folder.py --files 20000 --size 100000

Makes the folder in a temporary directory (removed afterwards) and times content_fingerprint:
- cold: no cache folder, every file read and hashed (what a first planning on a new machine costs);
- first: with a cache folder that is still empty (reads everything and writes the cache);
- warm: the cache, nothing changed (every later planning: one stat per file, no file read); the target is <= 5 s
  for 100,000 files;
- one changed: the cache, one file rewritten (one file read again).
The page cache is warm for the cold pass too (the files were just written): on a cold disk or a network file system
the first pass is slower, the warm pass reads no file data either way.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from speedpipe.fingerprint import content_fingerprint


def make_folder(root: Path, files: int, classes: int, size: int):
    for i in range(files):
        folder = root / f"class_{i % classes:03d}"
        if i < classes:
            folder.mkdir(parents=True)
        (folder / f"img_{i:07d}.jpg").write_bytes(os.urandom(size))


def timed(label: str, fn) -> str:
    start = time.perf_counter()
    result = fn()
    print(f"{label:<12} {time.perf_counter() - start:8.2f} s", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048, help="bytes per file")
    ap.add_argument("--dir", help="where to make the temporary folder (default: the system's temporary directory)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="speedpipe-plan-folder-", dir=args.dir))
    try:
        root, cache = work / "photos", work / ".snakemake" / "speedpipe-fingerprints"
        start = time.perf_counter()
        make_folder(root, args.files, args.classes, args.size)
        print(f"{args.files:,} files of {args.size:,} bytes in {args.classes} folders under {root} "
              f"({time.perf_counter() - start:.1f} s to write); {os.cpu_count()} CPUs", flush=True)
        cold = timed("cold", lambda: content_fingerprint(root))
        first = timed("first", lambda: content_fingerprint(root, cache))
        warm = timed("warm", lambda: content_fingerprint(root, cache))
        assert cold == first == warm
        cache_bytes = sum(f.stat().st_size for f in cache.iterdir())
        print(f"{'':<12} cache file {cache_bytes / 2**20:.1f} MiB", flush=True)
        changed = root / "class_000" / "img_0000000.jpg"
        changed.write_bytes(os.urandom(args.size))
        assert timed("one changed", lambda: content_fingerprint(root, cache)) != warm
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
