"""How much of an experiment's FID spread is the estimator's: one checkpoint sampled with several sampling seeds.

    python benchmarks/fid_estimator_spread.py configs/pipeline/budget_mnist.yaml --run baseline-s0 --step 6400 --seeds 5

Each sampling seed draws other labels and noise for the same model; the standard deviation of their FIDs is the
estimator's own spread at the experiment's curve_samples, to set beside the spread over training seeds at that point
(the budget study's choice of 1,000 samples per point is judged by it). Reads the experiment's finished run and its
data stages; writes only under --out.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from speedpipe.stages import STAGES
from speedpipe.workflow import Experiment


def sample_and_evaluate(exp: Experiment, evaluation, folder: Path, seed: int = 0, num_samples: int | None = None) -> float:
    """The FID of one evaluation of the experiment, sampled with another sampling seed (and sample count) into folder."""
    cfg = exp.stage_config("sample", evaluation=evaluation)
    cfg["sampling"].update(seed=seed, out=str(folder / "samples.npz"), **({"num_samples": num_samples} if num_samples else {}))
    STAGES["sample"].run(OmegaConf.create(cfg))
    cfg = exp.stage_config("evaluate", evaluation=evaluation)
    cfg["eval"].update(samples=str(folder / "samples.npz"), out=str(folder / "metrics.json"))
    STAGES["evaluate"].run(OmegaConf.create(cfg))
    return json.loads((folder / "metrics.json").read_text())["metrics"]["frechet_inception_distance"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", type=Path)
    ap.add_argument("--run", required=True, help="a train run of the experiment (baseline-s0)")
    ap.add_argument("--step", type=int, required=True, help="an evaluated step of that run")
    ap.add_argument("--seeds", type=int, default=5, help="sampling seeds 0..N-1")
    ap.add_argument("--out", type=Path, default=None, help="where samples and metrics go (default: a temporary folder)")
    args = ap.parse_args()
    exp = Experiment(yaml.safe_load(args.experiment.read_text()), base_dir=Path.cwd())
    matches = [e for e in exp.evaluations() if e.run.name == args.run and e.step == args.step and e.sampler == exp.pipe["curve_sampler"]]
    if not matches:
        raise SystemExit(f"{args.experiment}: no curve evaluation of run {args.run!r} at step {args.step}")
    evaluation = matches[0]
    out = args.out or Path(tempfile.mkdtemp(prefix="fid-spread-"))
    fids = []
    for seed in range(args.seeds):
        start = time.time()
        fids.append(sample_and_evaluate(exp, evaluation, out / f"seed{seed}", seed=seed))
        print(f"sampling seed {seed}: FID {fids[-1]:.3f} ({time.time() - start:.0f} s)", flush=True)
    print(f"{args.run} at {args.step}, {evaluation.num_samples} samples ({evaluation.sampler}), {args.seeds} sampling seeds: "
          f"mean {statistics.mean(fids):.3f}, sd {statistics.stdev(fids):.3f}")


if __name__ == "__main__":
    main()
