"""An experiment file, validated into data: its methods, train runs, distill runs, evaluations and tables.

configs/pipeline/*.yaml declares what to run; `Experiment` turns it into a table of runs, each of which knows its
config and its paths (from speedpipe.layout), and resolves the stage config of every job (plain values for
Snakemake `params`). The Snakefile only says what depends on what; run identity is looked up here, never parsed
out of a name.

A method is a stage config file plus overrides; a `grid` expands it into one method per combination of values,
`variants` into one method per named list of overrides:

    methods:
      baseline: configs/mnist5k/baseline.yaml
      weighting_only: {config: configs/mnist5k/speed.yaml, overrides: ["diffusion.timestep_sampler={name: uniform}"]}
      speed: {config: configs/mnist5k/speed.yaml, grid: {diffusion.timestep_sampler.k: [1, 10]}}   # speed-k1, speed-k10
      tau: {config: configs/mnist5k/speed.yaml,                                                    # tau-t500
            variants: {t500: [diffusion.timestep_sampler.tau=500, diffusion.loss_weighting.tau=500]}}
    teachers: [speed-s0]                      # train runs distilled by sCD (none: no distillation)
    tables:                                   # the report's tables (default: one table `methods` of every method)
      components: {methods: [baseline, weighting_only], reference: baseline, steps: [400, 800]}
"""
import difflib
import functools
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from speedpipe.config import ConfigError, load_config, to_plain
from speedpipe.layout import Layout, checkpoint, student_run_name, train_run_name

REQUIRED_KEYS = {"experiment", "output_dir", "base_config", "methods", "seeds", "train_steps", "eval_steps",
                 "curve_sampler", "curve_samples", "extractor"}
SCD_KEYS = {"teacher_sampler", "teacher_ode_sampler", "teacher_baselines", "scm_samplers", "final_samples",
            "distill_warm_start", "distill_steps", "distill_eval_steps"}  # required when there are teachers
PIPELINE_KEYS = REQUIRED_KEYS | SCD_KEYS | {"teachers", "tables", "overrides", "launcher"}
METHOD_KEYS = {"config", "overrides", "grid", "variants"}
TABLE_KEYS = {"methods", "reference", "steps", "caption"}
# names of the report's own tables and figures, which a named table (tables/{name}.*, figures/{name}.*) must not take
RESERVED_NAMES = ("metrics", "scm", "training_loss", "timestep_methods", "samples_per_method", "teacher_grid", "teacher_vs_scm",
                  "distillation")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # method and table names: they become folder and file names
# A sampler label: ddpm<N> / ddim<N> with an optional guidance suffix -cfg<scale>, or scm1 / scm2.
SAMPLER_LABEL = re.compile(r"(?P<sampler>(?:ddpm|ddim)\d+)(?:-cfg(?P<cfg>\d+(?:\.\d+)?))?|(?P<scm>scm[12])")
STAGES = ("autoencoder", "encode", "classifier", "reference", "train", "distill", "sample", "evaluate", "report")
PHASES = {"train": "train", "distill": "train", "sample": "sample"}


def parse_sampler(label: str) -> tuple[str, float]:
    """'ddpm250-cfg3' -> ('ddpm250', 3.0); 'ddim25' -> ('ddim25', 1.0); 'scm2' -> ('scm2', 1.0)."""
    m = SAMPLER_LABEL.fullmatch(str(label))
    if m is None:
        raise ConfigError(f"pipeline config: sampler {label!r} is not ddpm<N>, ddim<N> (optionally -cfg<scale>), scm1 or scm2")
    if m["scm"]:
        return m["scm"], 1.0
    return m["sampler"], float(m["cfg"] or 1.0)


@dataclass(frozen=True)
class Method:
    """A stage config file plus overrides: every job of the method's runs loads the file with them."""
    name: str
    config: str
    overrides: tuple[str, ...] = ()


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
    """The sCD student of a teacher train run."""
    teacher: TrainRun
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


def _refuse(what: str, name, valid) -> ConfigError:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    return ConfigError(f"pipeline config: {what} {name!r}" + (f"; did you mean {close[0]!r}?" if close else f"; expected one of {list(valid)}"))


def _check_keys(where: str, given: dict, allowed: set):
    if not isinstance(given, dict):
        raise ConfigError(f"pipeline config: {where}: expected a mapping, got {given!r}")
    for key in given:
        if key not in allowed:
            raise _refuse(f"{where}: unknown key", key, sorted(allowed))


def _check_name(where: str, name) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"pipeline config: {where} {name!r}: names are letters, digits, '_', '.' and '-' (they become "
                          f"folder and file names), starting with a letter or digit")
    if name.startswith("scm-"):
        raise ConfigError(f"pipeline config: {where} {name!r}: names starting with 'scm-' are the sCD students' runs")
    return name


def _override_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cells(name: str, spec: dict) -> list[tuple[str, list[str]]]:
    """A method's (name, overrides) cells: itself, or one per grid combination ({name}-{leaf}{value}...), or one per
    named variant ({name}-{variant}: a list of overrides, for values that move together such as SpeeD's two τ)."""
    grid, variants = spec.get("grid"), spec.get("variants")
    if grid is not None and variants is not None:
        raise ConfigError(f"pipeline config: methods.{name}: give a grid or variants, not both")
    if grid is not None:
        if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"pipeline config: methods.{name}.grid: expected a mapping of key.path -> non-empty list of values")
        for key, values in grid.items():
            if not isinstance(key, str):
                raise ConfigError(f"pipeline config: methods.{name}.grid: key {key!r} is not a key.path string")
            if not all(isinstance(v, (int, float, str, bool)) for v in values):
                raise ConfigError(f"pipeline config: methods.{name}.grid.{key}: grid values are numbers, strings or booleans")
        return [("-".join([name, *(f"{key.rsplit('.', 1)[-1]}{_override_value(v)}" for key, v in zip(grid, combination))]),
                 [f"{key}={_override_value(v)}" for key, v in zip(grid, combination)])
                for combination in itertools.product(*grid.values())]
    if variants is not None:
        if not isinstance(variants, dict) or not variants:
            raise ConfigError(f"pipeline config: methods.{name}.variants: expected a mapping of variant name -> list of overrides")
        for variant, overrides in variants.items():
            _check_overrides(f"methods.{name}.variants.{variant}", overrides)
        return [(f"{name}-{variant}", list(overrides)) for variant, overrides in variants.items()]
    return [(name, [])]


def _check_overrides(where: str, overrides):
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"pipeline config: {where}: expected a list of key.path=value strings, got {overrides!r}")


def expand_methods(methods: dict, base_dir=None) -> dict[str, Method]:
    """The experiment file's `methods` -> name: Method, grids and variants expanded."""
    if not isinstance(methods, dict) or not methods:
        raise ConfigError("pipeline config: methods: expected a mapping of method name -> config file or {config, overrides, grid | variants}")
    absolute = lambda p: str(Path(base_dir, p)) if base_dir is not None and not Path(p).is_absolute() else str(p)  # noqa: E731
    expanded = {}
    for name, spec in methods.items():
        _check_name("method", name)
        spec = {"config": spec} if isinstance(spec, str) else spec
        _check_keys(f"methods.{name}", spec, METHOD_KEYS)
        if "config" not in spec:
            raise ConfigError(f"pipeline config: methods.{name}: missing key 'config' (the stage config file)")
        overrides = spec.get("overrides") or []
        _check_overrides(f"methods.{name}.overrides", overrides)
        for full, cell_overrides in _cells(name, spec):
            _check_name(f"method (from methods.{name})", full)
            if full in expanded:
                raise ConfigError(f"pipeline config: duplicate method name {full!r} (from methods.{name})")
            expanded[full] = Method(full, absolute(spec["config"]), tuple(overrides + cell_overrides))
    for method in expanded.values():
        if not Path(method.config).is_file():
            raise ConfigError(f"pipeline config: methods.{method.name}: config file not found: {method.config}")
    return expanded


def check_experiment_file(pipe: dict, base_dir=None) -> dict:
    """The top-level checks of an experiment file (methods and tables are checked as they are expanded); returns it
    with base_config made absolute from base_dir."""
    pipe = dict(pipe)
    _check_keys("top level", pipe, PIPELINE_KEYS)
    missing = sorted(REQUIRED_KEYS - set(pipe))
    if missing:
        raise ConfigError(f"pipeline config: missing key(s) {missing}")
    teachers = pipe.get("teachers") or []
    if not isinstance(teachers, list):
        raise ConfigError(f"pipeline config: teachers {teachers!r}: expected a list of train run names, e.g. [speed-s0]")
    scd_given, scd_missing = sorted(SCD_KEYS & set(pipe)), sorted(SCD_KEYS - set(pipe))
    if teachers and scd_missing:
        raise ConfigError(f"pipeline config: missing key(s) {scd_missing} (they configure sCD of the teachers {teachers})")
    if not teachers and scd_given:
        raise ConfigError(f"pipeline config: {scd_given} configure sCD, but `teachers` is empty: name the train runs to distil")
    for stage in pipe.get("overrides") or {}:
        if stage not in STAGES:
            raise _refuse("overrides: unknown stage", stage, STAGES)
    seeds = pipe["seeds"]
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"pipeline config: seeds {seeds}: expected distinct non-negative integers")
    _check_steps(pipe, "eval_steps")
    if min(pipe["eval_steps"]) < 1:
        raise ConfigError(f"pipeline config: eval_steps {pipe['eval_steps']}: the first checkpoint is at step 1 or later")
    if max(pipe["eval_steps"]) != pipe["train_steps"]:
        raise ConfigError("pipeline config: the last of eval_steps must equal train_steps (the teacher's checkpoint)")
    for label in [pipe["curve_sampler"], *(pipe.get(k) for k in ("teacher_sampler", "teacher_ode_sampler") if k in pipe),
                  *pipe.get("teacher_baselines", [])]:
        if parse_sampler(label)[0].startswith("scm"):
            raise ConfigError(f"pipeline config: sampler {label!r}: scm samplers belong in scm_samplers (they need a distilled student)")
    if not all(parse_sampler(label)[0].startswith("scm") for label in pipe.get("scm_samplers", [])):
        raise ConfigError(f"pipeline config: scm_samplers {pipe['scm_samplers']}: only scm1 and scm2 sample a distilled student")
    if teachers:
        _check_steps(pipe, "distill_eval_steps")
        total = pipe["distill_warm_start"] + pipe["distill_steps"]
        outside = [s for s in pipe["distill_eval_steps"] if not pipe["distill_warm_start"] <= s <= total]
        if outside or max(pipe["distill_eval_steps"]) != total:
            raise ConfigError(f"pipeline config: distill_eval_steps {pipe['distill_eval_steps']} must lie in "
                              f"[distill_warm_start, distill_warm_start + distill_steps] = [{pipe['distill_warm_start']}, {total}] "
                              f"and end at {total}")
    if base_dir is not None and not Path(pipe["base_config"]).is_absolute():
        pipe["base_config"] = str(Path(base_dir, pipe["base_config"]))
    if not Path(pipe["base_config"]).is_file():
        raise ConfigError(f"pipeline config: base_config: config file not found: {pipe['base_config']}")
    from speedpipe.launch import parse_launcher

    for stage, settings in (pipe.get("launcher") or {}).items():
        if stage != "default" and stage not in STAGES:
            raise _refuse("launcher: unknown stage", stage, ("default", *STAGES))
        parse_launcher(settings or {})
    return pipe


def _check_steps(pipe, key):
    steps = pipe[key]
    if not steps or any(not isinstance(s, int) or s < 0 for s in steps) or list(steps) != sorted(set(steps)):
        raise ConfigError(f"pipeline config: {key} {steps}: expected increasing non-negative integers (a checkpoint "
                          f"is written at exactly each of them)")


class Experiment:
    """An experiment file, validated, as data. `Experiment(config, base_dir=repo)`: relative config paths are
    taken from base_dir."""

    def __init__(self, pipe: dict, base_dir=None):
        pipe = check_experiment_file(pipe, base_dir)
        teachers, seeds = list(pipe.get("teachers") or []), pipe["seeds"]
        self.pipe = pipe
        self.layout = Layout(Path(pipe["output_dir"]) / pipe["experiment"])
        for stage in pipe.get("overrides") or {}:  # each stage's overrides on their own, so that an error names them
            try:
                self._config(pipe["base_config"], (), stage)
            except ConfigError as err:
                raise ConfigError(f"pipeline config: overrides.{stage}: {err}") from None
        self.methods = expand_methods(pipe["methods"], base_dir)
        for method in self.methods.values():  # every method's config and overrides, checked before anything runs
            try:
                self._config(method.config, method.overrides, "train")
            except ConfigError as err:
                raise ConfigError(f"pipeline config: methods.{method.name}: {err}") from None
        self.train_runs = {}
        for method in self.methods.values():
            for seed in seeds:
                name = train_run_name(method.name, seed)
                self.train_runs[name] = TrainRun(name, self.layout.train_dir(method.name, seed), method, seed)
        if len(set(teachers)) != len(teachers):
            raise ConfigError(f"pipeline config: teachers {teachers}: a teacher is named twice")
        for teacher in teachers:
            if teacher not in self.train_runs:
                raise _refuse("teachers: no train run", teacher, self.train_runs)
        self.distill_runs = {student_run_name(t): DistillRun(student_run_name(t), self.layout.distill_dir(t), self.train_runs[t])
                             for t in teachers}
        self.tables = self._tables(pipe.get("tables"))

    def _tables(self, tables) -> dict[str, Table]:
        if tables is None:
            reference = "baseline" if "baseline" in self.methods else None
            return {"methods": Table("methods", tuple(self.methods), reference, tuple(self.pipe["eval_steps"]),
                                     "Every method of the experiment.")}
        if not isinstance(tables, dict) or not tables:
            raise ConfigError("pipeline config: tables: expected a mapping of table name -> {methods, reference, steps, caption}")
        result = {}
        for name, spec in tables.items():
            _check_name("table", name)
            if name in RESERVED_NAMES or name.endswith("_speedup"):
                raise ConfigError(f"pipeline config: table name {name!r} is taken by one of the report's own files "
                                  f"({', '.join(RESERVED_NAMES)}, or a table's {{name}}_speedup)")
            _check_keys(f"tables.{name}", spec, TABLE_KEYS)
            methods = spec.get("methods")
            if not isinstance(methods, list) or not methods:
                raise ConfigError(f"pipeline config: tables.{name}.methods: expected a non-empty list of method names")
            for m in methods:
                if m not in self.methods:
                    raise _refuse(f"tables.{name}.methods: unknown method", m, self.methods)
            if len(set(methods)) != len(methods):
                raise ConfigError(f"pipeline config: tables.{name}.methods {methods}: a method is named twice")
            reference = spec.get("reference")
            if reference is not None and reference not in methods:
                raise _refuse(f"tables.{name}.reference: not one of the table's methods:", reference, methods)
            steps = spec.get("steps", list(self.pipe["eval_steps"]))
            if not isinstance(steps, list) or not steps or any(s not in self.pipe["eval_steps"] for s in steps):
                raise ConfigError(f"pipeline config: tables.{name}.steps {steps}: expected a non-empty list of eval_steps "
                                  f"{self.pipe['eval_steps']} (only those have checkpoints)")
            result[name] = Table(name, tuple(methods), reference, tuple(sorted(steps)), str(spec.get("caption") or ""))
        return result

    # --- runs and evaluations

    @property
    def teachers(self) -> list[TrainRun]:
        return [d.teacher for d in self.distill_runs.values()]

    def run(self, name: str) -> TrainRun | DistillRun:
        if name in self.train_runs:
            return self.train_runs[name]
        if name in self.distill_runs:
            return self.distill_runs[name]
        raise _refuse("no run", name, [*self.train_runs, *self.distill_runs])

    def teacher_samplers(self) -> list[str]:
        """Each teacher's final evaluations: its reference sampler, its ODE ceiling, then the baselines."""
        if not self.distill_runs:
            return []
        p = self.pipe
        return list(dict.fromkeys([p["teacher_sampler"], p["teacher_ode_sampler"], *p["teacher_baselines"]]))

    def evaluations(self) -> list[Evaluation]:
        """Every metrics file the report needs: the curve points of each train run, each teacher's samplers at its
        final checkpoint, each student's samplers at its checkpoints."""
        p = self.pipe
        count = lambda sampler: p["curve_samples"] if sampler == p["curve_sampler"] else p["final_samples"]  # noqa: E731
        jobs = [(run, step, p["curve_sampler"]) for run in self.train_runs.values() for step in p["eval_steps"]]
        jobs += [(teacher, p["train_steps"], label) for teacher in self.teachers for label in self.teacher_samplers()]
        jobs += [(student, step, label) for student in self.distill_runs.values()
                 for step in p["distill_eval_steps"] for label in p["scm_samplers"]]
        unique = dict.fromkeys((run.name, step, sampler) for run, step, sampler in jobs)
        return [Evaluation(self.run(r), s, k, count(k)) for r, s, k in sorted(unique)]

    def evaluation_jobs(self) -> dict[str, tuple[Run, list[Evaluation]]]:
        """job name -> (run, its evaluations), each job sampled and evaluated in one process (one start-up).

        A train run's curve points make one job, with a teacher's few-step samplers; each of a teacher's samplers
        with more steps than the curve sampler makes its own (they are the long ones, and run side by side); a
        student's checkpoints make one.
        """
        def steps(label):
            return int(parse_sampler(label)[0][4:])

        jobs, teachers, teacher_samplers = {}, {t.name for t in self.teachers}, set(self.teacher_samplers())
        for e in self.evaluations():
            final = e.run.name in teachers and e.step == self.pipe["train_steps"] and e.sampler in teacher_samplers
            name = f"{e.run.name}-{e.sampler}" if final and steps(e.sampler) > steps(self.pipe["curve_sampler"]) else e.run.name
            jobs.setdefault(name, (e.run, []))[1].append(e)
        return jobs

    def evaluation_rules(self) -> dict[str, tuple[Run, list[Evaluation]]]:
        """evaluation_jobs under Snakemake rule names (evaluate_{job}, non-word characters as '_'), which must differ."""
        rules = {}
        for name, job in self.evaluation_jobs().items():
            rule = "evaluate_" + re.sub(r"\W", "_", name)
            if rule in rules:
                raise ConfigError(f"pipeline config: the runs {rules[rule][0].name!r} and {job[0].name!r} differ only in "
                                  f"'-', '.' or '_': rename a method")
            rules[rule] = job
        return rules

    def samples(self, e: Evaluation, ext: str = "npz") -> Path:
        return self.layout.samples(e.run.name, e.step, e.sampler, ext)

    def metrics(self, e: Evaluation) -> Path:
        return self.layout.metrics(e.run.name, e.step, e.sampler)

    def launcher(self, stage) -> dict:
        launcher = self.pipe.get("launcher") or {}
        return {**(launcher.get("default") or {"executor": "local"}), **(launcher.get(stage) or {})}

    # --- stage configs

    def _config(self, path: str, overrides: tuple, stage: str) -> dict:
        """A config file with the experiment's common values, the stage's overrides, then the given (method) overrides."""
        p = self.pipe
        common = (f"experiment={p['experiment']}", f"output_dir={p['output_dir']}", f"eval.extractor={p['extractor']}")
        stage_overrides = tuple((p.get("overrides") or {}).get(stage, []))
        return json.loads(_validated(path, common + stage_overrides + tuple(overrides), PHASES.get(stage)))

    def stage_config(self, stage: str, run: TrainRun | DistillRun | None = None, evaluation: Evaluation | None = None) -> dict:
        """The resolved, validated config of one job, as plain Python values.

        The run's config file (its method's for a train run, base_config otherwise) with the experiment's stage
        overrides and the method's overrides is loaded and validated once per (file, overrides); the job's own values
        (seed, checkpoint, sampler, paths) are then set on a copy: parsing the DAG stays fast with hundreds of jobs.
        """
        p = self.pipe
        run = evaluation.run if evaluation is not None else run
        method = run.method if run is not None and run.kind == "train" else None
        cfg = self._config(method.config if method else p["base_config"], method.overrides if method else (), stage)
        job = {}
        if stage == "train":
            job = {"seed": run.seed, "method": method.name, "trainer.steps": int(p["train_steps"]),
                   "trainer.ckpt_steps": [int(s) for s in p["eval_steps"]]}
        elif stage == "distill":
            job = {"distill.teacher": str(run.teacher.checkpoint(p["train_steps"])),
                   "distill.warm_start_steps": int(p["distill_warm_start"]), "distill.steps": int(p["distill_steps"]),
                   "distill.ckpt_steps": [int(s) for s in p["distill_eval_steps"]], "distill.run_dir": str(run.dir)}
        elif stage in ("sample", "evaluate"):
            e = evaluation
            name, cfg_scale = parse_sampler(e.sampler)
            job = {"sampling.checkpoint": str(e.run.checkpoint(e.step)), "sampling.sampler": name,
                   "sampling.cfg_scale": cfg_scale, "sampling.out": str(self.samples(e)),
                   "sampling.num_samples": int(e.num_samples), "eval.samples": str(self.samples(e))}
        for dotted, value in job.items():
            *parents, leaf = dotted.split(".")
            node = cfg
            for key in parents:
                node = node[key]
            node[leaf] = value
        return cfg

    def report_config(self) -> dict:
        """What the report needs: the experiment file, its runs, evaluations and tables with their paths, and each
        method's resolved diffusion settings."""
        first_seed = self.pipe["seeds"][0]
        method_cfgs = {m: self.stage_config("train", self.train_runs[train_run_name(m, first_seed)]) for m in self.methods}
        return {
            "pipeline": dict(self.pipe),
            "root": str(self.layout.root),
            "methods": {m.name: {"config": m.config, "overrides": list(m.overrides)} for m in self.methods.values()},
            "train_runs": [{"name": r.name, "method": r.method.name, "seed": r.seed, "log": str(r.log)}
                           for r in self.train_runs.values()],
            "distill_runs": [{"name": d.name, "teacher": d.teacher.name} for d in self.distill_runs.values()],
            "evaluations": [{"run": e.run.name, "kind": e.run.kind, "method": e.run.method.name if e.run.kind == "train" else "sCM",
                             "seed": e.run.seed if e.run.kind == "train" else 0, "step": e.step, "sampler": e.sampler,
                             "metrics": str(self.metrics(e)), "grid": str(self.samples(e, "png"))} for e in self.evaluations()],
            "tables": [{"name": t.name, "methods": list(t.methods), "reference": t.reference, "steps": list(t.steps),
                        "caption": t.caption} for t in self.tables.values()],
            "teacher_samplers": self.teacher_samplers(),
            "diffusion": {m: c["diffusion"] for m, c in method_cfgs.items()},
            "train_config": method_cfgs[next(iter(self.methods))],
            "distill_config": self.stage_config("distill", next(iter(self.distill_runs.values())))["distill"] if self.distill_runs else None,
        }


@functools.lru_cache(maxsize=None)
def _validated(path: str, overrides: tuple, phase: str | None) -> str:
    """load_config, remembered on disk by the content of every file it reads (a no-op re-run of Snakemake
    then never imports torch to validate, which is most of its start-up time)."""
    import hashlib

    import speedpipe.config as config_module
    from speedpipe.config import base_chain

    files = [*base_chain(Path(path)), Path(path), Path(config_module.__file__)]
    key = hashlib.sha256(json.dumps([[str(f), f.read_text()] for f in files] + [list(overrides), phase]).encode()).hexdigest()
    cached = Path(".snakemake") / "speedpipe-configs" / f"{key}.json"
    if cached.is_file():
        return cached.read_text()
    text = json.dumps(to_plain(load_config(path, list(overrides), phase=phase)))
    if Path(".snakemake").is_dir():
        from speedpipe.io import atomic_write_text

        atomic_write_text(cached, text)
    return text
