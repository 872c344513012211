"""The results layout: where every stage of an experiment reads and writes, in one place.

{output_dir}/{experiment}/
  autoencoder/   latents/   classifier/   reference/stats-{extractor}.pt
  train/{method}-s{seed}/ckpt-{step:07d}.pt, log.csv        a training run
  distill/{method}-{teacher run}/ckpt-{step:07d}.pt, log.csv the consistency student of a teacher by a method
  samples/{run}/{step:07d}/{sampler}.npz|json|png            metrics/{run}/{step:07d}/{sampler}.json
  tables/  figures/  README.md                               the report
  logs/{rule}/{job}.log, .usage.json    benchmarks/{rule}/{job}.tsv    every Snakemake job's log and resources
  standalone/train/…, distill/…, samples/…, metrics/…  what `speedpipe STAGE` and main.py write where no path is given

The rules (speedpipe.workflow), the stages (their defaults when run alone) and the report all ask this module;
none of them assembles a results path itself.
"""
import re
from dataclasses import dataclass
from pathlib import Path

from speedpipe.errors import ConfigError

CKPT_NAME = re.compile(r"ckpt-(\d{7})\.pt")  # an evaluation checkpoint's file name (fullmatch)


def step_dir(step) -> str:
    return f"{int(step):07d}"


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def of(cls, cfg) -> "Layout":
        """The layout of a stage config's experiment ({output_dir}/{experiment})."""
        return cls(Path(cfg.output_dir) / cfg.experiment)

    @classmethod
    def standalone(cls, cfg) -> "Layout":
        """Where a stage run alone writes its runs, samples and metrics: {output_dir}/{experiment}/standalone, never a
        folder of the pipeline's (a command with one setting changed must not take over the pipeline's run)."""
        return cls(cls.of(cfg).root / "standalone")

    def autoencoder_dir(self) -> Path:
        return self.root / "autoencoder"

    def latents_dir(self) -> Path:
        return self.root / "latents"

    def classifier_dir(self) -> Path:
        return self.root / "classifier"

    def reference(self, extractor: str) -> Path:
        return self.root / "reference" / f"stats-{extractor}.pt"

    def run_dir(self, kind: str, name: str) -> Path:
        """train/{run} or distill/{student run} (name may be a Snakemake wildcard such as "{run}")."""
        if kind not in ("train", "distill"):
            raise ValueError(f"run kind {kind!r}: expected 'train' or 'distill'")
        return self.root / kind / name

    def train_dir(self, method: str, seed: int) -> Path:
        return self.run_dir("train", train_run_name(method, seed))

    def distill_dir(self, method: str, teacher_run: str | None) -> Path:
        return self.run_dir("distill", student_run_name(method, teacher_run))

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

    def job_log(self, rule: str, job: str = "") -> Path:
        """A Snakemake job's log (the stage's own output and errors); job: its wildcards, "" for a one-job rule."""
        return self.root / "logs" / rule / f"{job or rule}.log"

    def job_usage(self, rule: str, job: str = "") -> Path:
        """The wall time, CPU time and peak memory a job's stages took where they ran (speedpipe.launch)."""
        return self.root / "logs" / rule / f"{job or rule}.usage.json"

    def job_benchmark(self, rule: str, job: str = "") -> Path:
        """Snakemake's own benchmark record of the job's local process (for a SLURM job: the waiting)."""
        return self.root / "benchmarks" / rule / f"{job or rule}.tsv"


def checkpoint(run_dir: Path, step) -> Path:
    return Path(run_dir) / f"ckpt-{step_dir(step)}.pt"


def train_run_name(method: str, seed: int) -> str:
    return f"{method}-s{int(seed)}"


NO_TEACHER = "no-teacher"  # the teacher run's place in the names of students without one: meanflow-no-teacher


def student_run_name(method: str, teacher_run: str | None) -> str:
    """The consistency student of a teacher run by a method (speedpipe.consistency.methods): scd-speed-s0; without a
    teacher, meanflow-no-teacher."""
    return f"{method}-{teacher_run or NO_TEACHER}"


# --- A stage config's paths: the path the config names, else the layout's place. The pipeline always names its
# runs' and evaluations' paths; the fallbacks serve standalone `speedpipe STAGE` runs: they read the experiment's
# shared data (latents, reference, classifier, autoencoder) and write runs, samples and metrics to Layout.standalone.

def latents_dir(cfg) -> Path:
    return Path(cfg.data.latents_dir or Layout.of(cfg).latents_dir())


def reference_path(cfg) -> Path:
    return Path(cfg.eval.reference or Layout.of(cfg).reference(cfg.eval.extractor))


def classifier_weights(cfg) -> Path:
    return Path(cfg.eval.classifier_weights or Layout.of(cfg).classifier_dir() / "model.safetensors")


def tiny_autoencoder_weights(cfg) -> Path:
    return Path(cfg.autoencoder.path or Layout.of(cfg).autoencoder_dir() / "model.safetensors")


def data_record(stage: str, cfg) -> Path:
    """The config a data stage recorded beside what it wrote for a stage config (where a run of that config writes)."""
    return {"autoencoder": lambda: Layout.of(cfg).autoencoder_dir() / "config.yaml",
            "encode": lambda: latents_dir(cfg) / "config.yaml",
            "classifier": lambda: Layout.of(cfg).classifier_dir() / "config.yaml",
            "reference": lambda: reference_path(cfg).with_suffix(".yaml")}[stage]()


def train_run_dir(cfg) -> Path:
    return Path(cfg.trainer.run_dir or Layout.standalone(cfg).train_dir(cfg.method, cfg.seed))


def distill_run_dir(cfg) -> Path:
    """distill.run_dir, else distill/{method}-{the teacher's run folder name, or no-teacher}."""
    teacher = cfg.distill.teacher and Path(cfg.distill.teacher).parent.name
    return Path(cfg.distill.run_dir or Layout.standalone(cfg).distill_dir(cfg.distill.method, teacher))


def samples_path(cfg) -> Path:
    """sampling.out, else samples/{the checkpoint's run folder}/{its step}/{sampler}.npz."""
    s = cfg.sampling
    if s.out:
        return Path(s.out)
    ckpt = Path(s.checkpoint)
    step = CKPT_NAME.fullmatch(ckpt.name)
    if step is None:
        raise ConfigError(f"config key 'sampling.out': required when the checkpoint name {ckpt.name} is not ckpt-NNNNNNN.pt")
    return Layout.standalone(cfg).samples(ckpt.parent.name, int(step.group(1)), s.sampler)


def metrics_path(cfg) -> Path:
    """eval.out, else standalone/metrics/ with the samples path's part below its last samples/ folder, .json for .npz."""
    if cfg.eval.out:
        return Path(cfg.eval.out)
    samples = Path(cfg.eval.samples)
    parts = list(samples.parts)
    if "samples" not in parts:
        raise ConfigError(f"config key 'eval.out': required when the samples path {samples} has no samples/ folder")
    below = parts[len(parts) - parts[::-1].index("samples"):]
    return (Layout.standalone(cfg).root / "metrics" / Path(*below)).with_suffix(".json")
