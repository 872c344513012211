"""An experiment as data: its training and distillation runs, the evaluations of their checkpoints, its report tables."""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from speedpipe.experiment_file import Method, sampler_label
from speedpipe.layout import Layout, checkpoint


@dataclass(frozen=True)
class Run:
    """A training or distillation run: a folder of ckpt-{step:07d}.pt files and a log.csv."""
    name: str
    dir: Path

    def checkpoint(self, step) -> Path:
        return checkpoint(self.dir, step)

    @property
    def log(self) -> Path:
        return self.dir / "log.csv"


@dataclass(frozen=True)
class TrainRun(Run):
    method: Method
    seed: int
    kind: ClassVar[str] = "train"

    def job_values(self, pipe: dict, layout: Layout) -> dict:
        """The values the experiment sets in this run's job (speedpipe.workflow.JOB_VALUES says from where)."""
        return {"seed": self.seed, "method": self.method.name, "trainer.steps": int(pipe["train_steps"]),
                "trainer.ckpt_steps": [int(s) for s in pipe["eval_steps"]], "trainer.run_dir": str(self.dir)}


@dataclass(frozen=True)
class DistillRun(Run):
    """The consistency student of a teacher train run by one consistency method (speedpipe.consistency.methods); with
    teacher None, the method's student trained without a teacher (teacher_free)."""
    teacher: TrainRun | None
    method: str
    kind: ClassVar[str] = "distill"

    def job_values(self, pipe: dict, layout: Layout) -> dict:
        """The values the experiment sets in this run's job; without a teacher, the warm start regresses on the data."""
        return {"distill.teacher": self.teacher and str(self.teacher.checkpoint(pipe["train_steps"])), "distill.method": self.method,
                "distill.warm_start_steps": int(pipe["distill_warm_start"]), "distill.steps": int(pipe["distill_steps"]),
                "distill.ckpt_steps": [int(s) for s in pipe["distill_eval_steps"]], "distill.run_dir": str(self.dir),
                **({} if self.teacher else {"distill.warm_start_target": "data"})}


@dataclass(frozen=True)
class Evaluation:
    """One sampler on one checkpoint of one run: a samples file and a metrics file."""
    run: Run
    step: int
    sampler: str
    num_samples: int

    def job_values(self, pipe: dict, layout: Layout) -> dict:
        """The values the experiment sets in the sampling and the evaluation job of these samples."""
        label, samples = sampler_label(self.sampler), str(layout.samples(self.run.name, self.step, self.sampler))
        return {"sampling.checkpoint": str(self.run.checkpoint(self.step)), "sampling.sampler": label.name,
                "sampling.cfg_scale": label.cfg_scale, "sampling.out": samples, "sampling.num_samples": int(self.num_samples),
                "eval.samples": samples, "eval.out": str(layout.metrics(self.run.name, self.step, self.sampler))}


@dataclass(frozen=True)
class Table:
    """A report table: methods compared at some iterations, with the speed-up against a reference method."""
    name: str
    methods: tuple[str, ...]
    reference: str | None
    steps: tuple[int, ...]
    caption: str
    budgets: bool = False  # also the speed-up at every eval step taken as the training budget
