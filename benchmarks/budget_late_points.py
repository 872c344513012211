"""The budget study's last budget with more samples per point: is SpeeD's speed-up at B = 6,400 the same when the FID
estimator's noise is smaller than the seeds'?

    python benchmarks/budget_late_points.py configs/pipeline/budget_mnist.yaml --methods baseline speed \\
        --steps 3200 6400 --samples 5000

Every run of the methods is sampled again at the steps (sampling seed 0, --samples images) and evaluated; the
speed-up at the last step is computed as the report computes it (speedpipe.uncertainty), from these FIDs only (the
crossing must lie between the steps given: a curve of mixed sample counts would mix FID's biases).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from speedpipe.uncertainty import seed_speedups
from speedpipe.workflow import Experiment

sys.path.insert(0, str(Path(__file__).parent))
from fid_estimator_spread import sample_and_evaluate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", type=Path)
    ap.add_argument("--methods", nargs="+", required=True, help="the reference first")
    ap.add_argument("--steps", nargs="+", type=int, required=True)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    exp = Experiment(yaml.safe_load(args.experiment.read_text()), base_dir=Path.cwd())
    out = args.out or Path(tempfile.mkdtemp(prefix="late-points-"))
    curves = {}  # method -> seed -> (steps, FIDs)
    for e in exp.evaluations():
        method = e.run.name.rsplit("-s", 1)[0]
        if method not in args.methods or e.step not in args.steps or e.sampler != exp.pipe["curve_sampler"]:
            continue
        start = time.time()
        fid = sample_and_evaluate(exp, e, out / e.run.name / str(e.step), num_samples=args.samples)
        steps, fids = curves.setdefault(method, {}).setdefault(e.run.seed, ([], []))
        steps.append(e.step)
        fids.append(fid)
        print(f"{e.run.name} at {e.step}: FID {fid:.3f} with {args.samples} samples ({time.time() - start:.0f} s)", flush=True)
    reference, final = args.methods[0], max(args.steps)
    for method, seeds in curves.items():
        for step in sorted(args.steps):
            values = [fids[steps.index(step)] for steps, fids in seeds.values()]
            print(f"{method} at {step}: FID {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} over seeds {sorted(seeds)}")
    targets = {seed: fids[steps.index(final)] for seed, (steps, fids) in curves[reference].items()}
    for method in args.methods[1:]:
        curve = {seed: tuple(map(list, zip(*sorted(zip(*c))))) for seed, c in curves[method].items()}
        print(f"{method} against {reference}'s FID at {final}: {seed_speedups(curve, targets, final).summary()}")


if __name__ == "__main__":
    main()
