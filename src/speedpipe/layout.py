"""The results layout: where every stage of an experiment reads and writes, in one place.

{output_dir}/{experiment}/
  autoencoder/   latents/   classifier/   reference/stats-{extractor}.pt
  train/{method}-s{seed}/ckpt-{step:07d}.pt, log.csv        a training run
  distill/{teacher run}/ckpt-{step:07d}.pt, log.csv          the sCD student of a teacher
  samples/{run}/{step:07d}/{sampler}.npz|json|png            metrics/{run}/{step:07d}/{sampler}.json
  tables/  figures/  README.md                               the report

The rules (speedpipe.workflow), the stages (their defaults when run alone) and the report all ask this module;
none of them assembles a results path itself.
"""
from dataclasses import dataclass
from pathlib import Path


def step_dir(step) -> str:
    return f"{int(step):07d}"


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def of(cls, cfg) -> "Layout":
        """The layout of a stage config's experiment ({output_dir}/{experiment})."""
        return cls(Path(cfg.output_dir) / cfg.experiment)

    def autoencoder_dir(self) -> Path:
        return self.root / "autoencoder"

    def latents_dir(self) -> Path:
        return self.root / "latents"

    def classifier_dir(self) -> Path:
        return self.root / "classifier"

    def reference(self, extractor: str) -> Path:
        return self.root / "reference" / f"stats-{extractor}.pt"

    def run_dir(self, kind: str, name: str) -> Path:
        """train/{run} or distill/{teacher run} (name may be a Snakemake wildcard such as "{run}")."""
        if kind not in ("train", "distill"):
            raise ValueError(f"run kind {kind!r}: expected 'train' or 'distill'")
        return self.root / kind / name

    def train_dir(self, method: str, seed: int) -> Path:
        return self.run_dir("train", train_run_name(method, seed))

    def distill_dir(self, teacher_run: str) -> Path:
        return self.run_dir("distill", teacher_run)

    def samples(self, run: str, step, sampler: str, ext: str = "npz") -> Path:
        return self.root / "samples" / run / step_dir(step) / f"{sampler}.{ext}"

    def metrics(self, run: str, step, sampler: str) -> Path:
        return self.root / "metrics" / run / step_dir(step) / f"{sampler}.json"

    def table(self, name: str, ext: str) -> Path:
        return self.root / "tables" / f"{name}.{ext}"

    def figure(self, name: str, ext: str = "png") -> Path:
        return self.root / "figures" / f"{name}.{ext}"

    def readme(self) -> Path:
        return self.root / "README.md"


def checkpoint(run_dir: Path, step) -> Path:
    return Path(run_dir) / f"ckpt-{step_dir(step)}.pt"


def train_run_name(method: str, seed: int) -> str:
    return f"{method}-s{int(seed)}"


def student_run_name(teacher_run: str) -> str:
    return f"scm-{teacher_run}"
