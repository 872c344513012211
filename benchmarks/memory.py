"""Peak memory of the streaming stages against the number of images, each stage run in a fresh process.

    python benchmarks/memory.py                                   # reference and evaluate at 64², 1,500 vs 15,000 images
    python benchmarks/memory.py --size 256 --counts 300 3000      # the same at 256²
    python benchmarks/memory.py --stages reference encode classifier autoencoder evaluate --counts 1000 5000

Random-noise PNGs (or the same images as an ADM samples npz for `evaluate`) are written once to --work; the reference and
evaluate stages use a briefly trained digit classifier's features (the demo's extractor), encode a tiny AutoencoderKL.
Each row: the stage, the image size, the two counts, the peak RSS of each (ru_maxrss of the stage's process) and the
difference, against what the stage must keep (its features, N x D floats). Memory flat in the data size means the
difference is about that plus run-to-run noise (tens of MB: the process starts at ~1 GB with torch imported).
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RUN = ("import resource, sys; from speedpipe.config import load_config; from speedpipe.stages import STAGES; "
       "STAGES[sys.argv[1]].run(load_config(sys.argv[2], sys.argv[3:])); "
       "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
KEEPS = {"reference": (128 + 10) * 4, "evaluate": (128 + 10) * 4, "encode": 0, "classifier": 0, "autoencoder": 0}  # bytes per image


def peak_rss_mb(stage: str, config: Path, overrides: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", RUN, stage, str(config), *overrides], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return int(out.stdout.split()[-1]) / 1024


def images(work: Path, size: int, count: int) -> Path:
    root = work / f"imgs{size}"
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / f"c{i % 10}" / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return root


def samples(work: Path, root: Path, size: int, count: int) -> Path:
    from speedpipe.data.samples import write_npz

    path = work / f"samples{size}-{count}.npz"
    if not path.exists():
        files = sorted(root.rglob("*.png"))[:count]
        write_npz(path, np.stack([np.array(Image.open(f)) for f in files]), np.arange(count) % 10)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["reference", "evaluate"], choices=sorted(KEEPS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--counts", nargs=2, type=int, default=[1500, 15000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/speedpipe-memory"))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    root = images(work, args.size, max(args.counts))
    config = work / "bench.yaml"
    config.write_text(f"experiment: memory\noutput_dir: {work / 'results'}\n")
    data = ["data.name=image_folder", f"data.root={root}", f"data.image_size={args.size}"]
    classifier = work / "results/memory/classifier/model.safetensors"
    if not classifier.exists():
        peak_rss_mb("classifier", config, ["data.name=mnist5k", "eval.classifier_steps=100"])
    tiny = work / "results/memory/autoencoder/model.safetensors"
    if "encode" in args.stages and not tiny.exists():
        peak_rss_mb("autoencoder", config, [*data, "autoencoder.name=tiny", "autoencoder.steps=20", "autoencoder.batch_size=16",
                                            "autoencoder.block_out_channels=[16,32,32]", "autoencoder.progress=false"])
    features = ["eval.extractor=classifier", f"eval.classifier_weights={classifier}"]
    reference = work / f"stats-{args.counts[0]}.pt"
    if "evaluate" in args.stages and not reference.exists():
        peak_rss_mb("reference", config, [*data, *features, f"eval.reference_max_images={args.counts[0]}", f"eval.reference={reference}"])
    rows = []
    for stage in args.stages:
        peaks = {}
        for n in args.counts:
            own = {"reference": [*features, f"eval.reference_max_images={n}", f"eval.reference={work / f'stats-{n}.pt'}"],
                   "evaluate": [*features, f"eval.samples={samples(work, root, args.size, n)}", f"eval.out={work / f'm-{n}.json'}",
                                f"eval.reference={reference}"],
                   "encode": [f"data.latents_dir={work / f'latents-{n}'}", "autoencoder.name=tiny", f"autoencoder.path={tiny}",
                              "encode.progress=false"],
                   "classifier": ["eval.classifier_steps=200", "eval.classifier_batch_size=64"],
                   "autoencoder": ["autoencoder.name=tiny", "autoencoder.steps=50", "autoencoder.batch_size=16",
                                   "autoencoder.block_out_channels=[16,32,32]", "autoencoder.progress=false"]}[stage]
            folder = root if stage in ("reference", "evaluate") else images(work / f"n{n}", args.size, n)  # a dataset of n images
            shutil.rmtree(work / f"latents-{n}", ignore_errors=True)  # encode keeps the shards it finds
            peaks[n] = peak_rss_mb(stage, config, ["data.name=image_folder", f"data.root={folder}", f"data.image_size={args.size}", *own])
        a, b = args.counts
        rows.append({"stage": stage, "image size": args.size, "images": f"{a} / {b}", "peak RSS MB": f"{peaks[a]:.0f} / {peaks[b]:.0f}",
                     "difference MB": round(peaks[b] - peaks[a]), "must keep MB": round((b - a) * KEEPS[stage] / 1e6, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| stage | image size | images | peak RSS MB | difference MB | must keep MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
