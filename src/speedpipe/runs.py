"""An experiment as data: its training and distillation runs, the evaluations of their checkpoints, its report tables."""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from speedpipe.experiment_file import Method
from speedpipe.layout import checkpoint


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


@dataclass(frozen=True)
class DistillRun(Run):
    """The consistency student of a teacher train run by one consistency method (speedpipe.consistency.methods); with
    teacher None, the method's student trained without a teacher (teacher_free)."""
    teacher: TrainRun | None
    method: str
    kind: ClassVar[str] = "distill"


@dataclass(frozen=True)
class Evaluation:
    """One sampler on one checkpoint of one run: a samples file and a metrics file."""
    run: Run
    step: int
    sampler: str
    num_samples: int


@dataclass(frozen=True)
class Table:
    """A report table: methods compared at some iterations, with the speed-up against a reference method."""
    name: str
    methods: tuple[str, ...]
    reference: str | None
    steps: tuple[int, ...]
    caption: str
    budgets: bool = False  # also the speed-up at every eval step taken as the training budget
