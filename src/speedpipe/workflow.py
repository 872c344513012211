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
    teachers: [speed-s0]                      # train runs the consistency models start from (none: no teacher's students)
    consistency_methods: [scd, sct]           # one student run each per teacher: scd-speed-s0, sct-speed-s0
    teacher_free: [meanflow]                  # one student run each without a teacher: meanflow-no-teacher
    tables:                                   # the report's tables (default: one table `methods` of every method)
      components: {methods: [baseline, weighting_only], reference: baseline, steps: [400, 800]}
"""
import functools
import json
import re
from pathlib import Path

from speedpipe import planning_cache
from speedpipe.config import parse_override
from speedpipe.errors import ConfigError
from speedpipe.experiment_file import RESERVED_NAMES, check_experiment_file, check_name, expand_methods, refuse
from speedpipe.layout import Layout, student_run_name, train_run_name
from speedpipe.runs import DistillRun, Evaluation, Run, Table, TrainRun
from speedpipe.stages import DATA_STAGES, PLUGIN_STAGES, STAGES

# Keys the experiment sets in its jobs' configs, and where: a config file or stage override that also sets one is dead.
# A run's identity (experiment, output_dir, method, seed) always comes from the experiment and is not listed.
JOB_VALUES = {"trainer.steps": "train_steps", "trainer.ckpt_steps": "eval_steps", "eval.extractor": "extractor",
              "trainer.run_dir": "the results layout", "data.latents_dir": "the results layout",
              "eval.reference": "the results layout", "eval.classifier_weights": "the results layout (the classifier stage)",
              "autoencoder.path": "the results layout (the autoencoder stage)",
              "distill.teacher": "teachers", "distill.method": "consistency_methods",
              "distill.warm_start_steps": "distill_warm_start", "distill.steps": "distill_steps",
              "distill.ckpt_steps": "distill_eval_steps", "distill.run_dir": "the results layout",
              "sampling.checkpoint": "the evaluated checkpoint", "sampling.sampler": "the sampler label",
              "sampling.cfg_scale": "the sampler label", "sampling.out": "the results layout",
              "sampling.num_samples": "curve_samples / final_samples", "eval.samples": "the results layout",
              "eval.out": "the results layout"}


# The sampling and evaluation rules, one per kind of Experiment.evaluation_jobs: rule -> (stage, kind).
EVALUATION_RULES = {f"{stage}_{kind}": (stage, kind) for kind in ("curve", "teacher", "student") for stage in ("sample", "evaluate")}


def job_label(wildcards: dict) -> str:
    """A job's name within its rule (its wildcard values joined by '-'; "" for a rule of one job): its log and usage
    file names."""
    return "-".join(wildcards.values())


def alternation(names) -> str:
    """A wildcard constraint matching exactly these names (runs are looked up, never parsed)."""
    return "|".join(map(re.escape, names)) or "(?!)"


class Experiment:
    """An experiment file, validated, as data. `Experiment(config, base_dir=repo)`: relative config paths are
    taken from base_dir."""

    def __init__(self, pipe: dict, base_dir=None):
        pipe = check_experiment_file(pipe, base_dir)
        teachers, seeds = list(pipe.get("teachers") or []), pipe["seeds"]
        self.pipe = pipe
        self.layout = Layout(Path(pipe["output_dir"]) / pipe["experiment"])
        # where the data stages' files are: this experiment's, or those of the experiment named by data_from
        self.data_from = pipe.get("data_from")
        self.data_layout = Layout(Path(pipe["output_dir"]) / (self.data_from or pipe["experiment"]))
        self.overridden: set[str] = set()  # values of the stage config files that the experiment file replaces
        for stage in pipe["overrides"]:  # each stage's overrides on their own, so that an error names them
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
                raise refuse("teachers: no train run", teacher, self.train_runs)
        students = [(t, m) for t in teachers for m in pipe["consistency_methods"]] + [(None, m) for m in pipe["teacher_free"]]
        self.distill_runs = {student_run_name(m, t): DistillRun(student_run_name(m, t), self.layout.distill_dir(m, t),
                                                                t and self.train_runs[t], m) for t, m in students}
        self.tables = self._tables(pipe.get("tables"))

    def _tables(self, tables) -> dict[str, Table]:
        if tables is None:
            reference = "baseline" if "baseline" in self.methods else None
            return {"methods": Table("methods", tuple(self.methods), reference, tuple(self.pipe["eval_steps"]),
                                     "Every method of the experiment.")}
        result = {}  # the schema checked each table's keys and types
        for name, spec in tables.items():
            check_name("table", name)
            if name in RESERVED_NAMES or name.endswith(("_speedup", "_differences", "_per_stage", "_budgets")):
                raise ConfigError(f"pipeline config: table name {name!r} is taken by one of the report's own files "
                                  f"({', '.join(RESERVED_NAMES)}, or a table's {{name}}_speedup / _differences / _budgets)")
            methods = spec["methods"]
            for m in methods:
                if m not in self.methods:
                    raise refuse(f"tables.{name}.methods: unknown method", m, self.methods)
            if len(set(methods)) != len(methods):
                raise ConfigError(f"pipeline config: tables.{name}.methods {methods}: a method is named twice")
            reference = spec.get("reference")
            if reference is not None and reference not in methods:
                raise refuse(f"tables.{name}.reference: not one of the table's methods:", reference, methods)
            steps = spec.get("steps", list(self.pipe["eval_steps"]))
            if any(s not in self.pipe["eval_steps"] for s in steps):
                raise ConfigError(f"pipeline config: tables.{name}.steps {steps}: expected a non-empty list of eval_steps "
                                  f"{self.pipe['eval_steps']} (only those have checkpoints)")
            if spec.get("budgets") and reference is None:
                raise ConfigError(f"pipeline config: tables.{name}.budgets: needs the table's reference method")
            result[name] = Table(name, tuple(methods), reference, tuple(sorted(steps)), str(spec.get("caption") or ""),
                                 bool(spec.get("budgets", False)))
        return result

    # --- runs and evaluations

    @property
    def teachers(self) -> list[TrainRun]:
        return list(dict.fromkeys(d.teacher for d in self.distill_runs.values() if d.teacher is not None))

    def teacher_samplers(self) -> list[str]:
        """Each teacher's final evaluations: its reference sampler, its ODE ceiling, then the baselines."""
        if not self.teachers:
            return []
        p = self.pipe
        return list(dict.fromkeys([p["teacher_sampler"], p["teacher_ode_sampler"], *p["teacher_baselines"]]))

    def teacher_own_samplers(self) -> list[str]:
        """The teacher samplers evaluated in jobs of their own: all of them but the curve sampler where the curve already
        evaluates the final checkpoint."""
        curve_has_final = self.pipe["train_steps"] in self.pipe["eval_steps"]
        return [k for k in self.teacher_samplers() if not (curve_has_final and k == self.pipe["curve_sampler"])]

    @functools.cached_property
    def evaluation_jobs(self) -> list[tuple[str, dict, list[Evaluation]]]:
        """(kind, wildcards, evaluations) of every sampling job, each followed by an evaluation job of the same files
        (workflow/rules/evaluate.smk, one rule per kind and stage: EVALUATION_RULES). A job runs all of its files in one
        process, so the interpreter and library start-up is paid once per job; an evaluation setting re-runs only the
        evaluation jobs."""
        p = self.pipe
        count = lambda sampler: p["curve_samples"] if sampler == p["curve_sampler"] else p["final_samples"]  # noqa: E731
        jobs = [("curve", {"run": run.name}, [(run, step, p["curve_sampler"]) for step in p["eval_steps"]])
                for run in self.train_runs.values()]
        jobs += [("teacher", {"teacher": teacher.name, "sampler": label}, [(teacher, p["train_steps"], label)])
                 for teacher in self.teachers for label in self.teacher_own_samplers()]
        jobs += [("student", {"student": student.name}, [(student, step, label) for step in p["distill_eval_steps"]
                                                        for label in p["scm_samplers"]])
                 for student in self.distill_runs.values()]
        return [(kind, wildcards, [Evaluation(run, step, label, count(label)) for run, step, label in files])
                for kind, wildcards, files in jobs]

    def evaluations(self) -> list[Evaluation]:
        """Every metrics file the report needs: the curve points of each train run, each teacher's samplers at its
        final checkpoint, each student's samplers at its checkpoints."""
        return sorted((e for _, _, evaluations in self.evaluation_jobs for e in evaluations),
                      key=lambda e: (e.run.name, e.step, e.sampler))

    def evaluation_job(self, kind: str, wildcards: dict) -> list[Evaluation]:
        """The evaluations of one sampling (and evaluation) job of a kind: its wildcards are looked up, never parsed."""
        for job_kind, job_wildcards, evaluations in self.evaluation_jobs:
            if job_kind == kind and job_wildcards == wildcards:
                return evaluations
        raise refuse(f"no {kind} evaluation job", job_label(wildcards),
                     [job_label(w) for k, w, _ in self.evaluation_jobs if k == kind])

    def samples(self, e: Evaluation, ext: str = "npz") -> Path:
        return self.layout.samples(e.run.name, e.step, e.sampler, ext)

    def metrics(self, e: Evaluation) -> Path:
        return self.layout.metrics(e.run.name, e.step, e.sampler)

    def launcher(self, stage) -> dict:
        launcher = self.pipe["launcher"]
        return {**(launcher.get("default") or {"executor": "local"}), **(launcher.get(stage) or {})}

    # --- Snakemake jobs: what each rule's job runs, and what its params carry

    def jobs(self, rule: str, wildcards: dict | None = None) -> list[tuple[str, dict]]:
        """(stage, resolved config) of every stage run of one Snakemake job, in order."""
        wildcards = dict(wildcards or {})  # a Snakemake Wildcards object, as a plain dict
        if rule == "train":
            return [("train", self.stage_config("train", self.train_runs[wildcards["run"]]))]
        if rule == "distill":
            return [("distill", self.stage_config("distill", self.distill_runs[wildcards["student"]]))]
        if rule == "report":
            return [("report", self.report_config())]
        if rule in EVALUATION_RULES:
            stage, kind = EVALUATION_RULES[rule]
            return [(stage, self.stage_config(stage, evaluation=e)) for e in self.evaluation_job(kind, wildcards)]
        if rule in STAGES:
            return [(rule, self.stage_config(rule))]
        raise refuse("no rule", rule, ["train", "distill", "report", *EVALUATION_RULES, *STAGES])

    def job_params(self, rule: str, wildcards: dict | None = None) -> list[dict]:
        """A job's Snakemake params: per stage run, its version and the values it reads (speedpipe.stages) -- so an
        edit re-runs exactly the jobs whose stages read the edited key."""
        return [planning_cache.with_content_fingerprints(STAGES[stage].params(config), config) for stage, config in self.jobs(rule, wildcards)]

    # --- stage configs

    def _config(self, path: str, overrides: tuple, stage: str) -> dict:
        """A config file with the experiment's common values, the stage's overrides, then the given (method) overrides."""
        p = self.pipe
        common = (f"experiment={p['experiment']}", f"output_dir={p['output_dir']}", f"eval.extractor={p['extractor']}")
        stage_overrides = tuple(p["overrides"].get(stage, []))
        self._note_overridden(path, stage, stage_overrides)
        return json.loads(planning_cache.validated(path, common + stage_overrides + tuple(overrides), STAGES[stage].phase))

    def _note_overridden(self, path: str, stage: str, stage_overrides: tuple, job: dict | None = None):
        """Note each value the config file sets that the experiment file replaces (a stage override, or a value the
        experiment sets in every job: job = {key: value}); the Snakefile shows them as warnings."""
        set_here = planning_cache.file_values(path, STAGES[stage].phase)
        replaced = [(key, value, f"the experiment file's overrides.{stage}") for key, value in map(parse_override, stage_overrides)]
        replaced += [(key, value, f"the experiment ({JOB_VALUES[key]})") for key, value in (job or {}).items()]
        for key, value, by in replaced:
            if key in set_here and set_here[key][0] != value:
                old, file = set_here[key]
                self.overridden.add(f"{_shown(file)} sets {key}: {old!r}, but {by} sets {value!r}: the file's value has no "
                                    f"effect in this experiment")

    def stage_config(self, stage: str, run: TrainRun | DistillRun | None = None, evaluation: Evaluation | None = None) -> dict:
        """The resolved, validated config of one job, as plain Python values.

        The run's config file (its method's for a train run, base_config otherwise) with the experiment's stage
        overrides and the method's overrides is loaded and validated once per (file, overrides); the job's own values
        (seed, checkpoint, sampler, paths) are then set on a copy: parsing the DAG stays fast with hundreds of jobs.
        """
        p = self.pipe
        run = evaluation.run if evaluation is not None else run
        path, overrides = self._source(run)
        cfg = self._config(path, overrides, stage)
        source = evaluation or run  # its job values (seed, steps, checkpoint, sampler, paths); none for a data stage's job
        job = source.job_values(p, self.layout) if source is not None else {}
        job.update(self._pipeline_paths(stage, cfg))  # last: no stage or method override moves them
        self._note_overridden(path, stage, (), {k: v for k, v in job.items() if k in JOB_VALUES})
        for dotted, value in job.items():
            *parents, leaf = dotted.split(".")
            node = cfg
            for key in parents:
                node = node[key]
            node[leaf] = value
        return cfg

    def report_config(self) -> dict:
        """What the report reads: the experiment file (without its launcher settings and the overrides of keys no stage
        result depends on, such as progress bars: they change no result, so they do not re-run the report), its runs, evaluations and tables with their paths, each method's diffusion settings, the few train and
        distill settings it shows, and every job's resource record."""
        first_seed = self.pipe["seeds"][0]
        method_cfgs = {m: self.stage_config("train", self.train_runs[train_run_name(m, first_seed)]) for m in self.methods}
        train = method_cfgs[next(iter(self.methods))]
        students = sorted(self.distill_runs.values(), key=lambda d: d.teacher is None)  # a teacher's first: its warm start
        distill = self.stage_config("distill", students[0])["distill"] if students else None
        pipeline = {k: v for k, v in self.pipe.items() if k != "launcher"}
        pipeline["overrides"] = {stage: kept for stage, items in self.pipe["overrides"].items() if (kept := _affecting(stage, items))}
        return {
            "pipeline": pipeline,
            "root": str(self.layout.root),
            "methods": {m.name: {"config": m.config, "overrides": _affecting("train", m.overrides)} for m in self.methods.values()},
            "train_runs": [{"name": r.name, "method": r.method.name, "seed": r.seed, "log": str(r.log)}
                           for r in self.train_runs.values()],
            "distill_runs": [{"name": d.name, "teacher": d.teacher and d.teacher.name, "method": d.method}
                             for d in self.distill_runs.values()],
            "evaluations": [{"run": e.run.name, "kind": e.run.kind, "method": e.run.method.name if e.run.kind == "train" else e.run.method,
                             "seed": e.run.seed if e.run.kind == "train" else 0, "step": e.step, "sampler": e.sampler,
                             "metrics": str(self.metrics(e)), "grid": str(self.samples(e, "png"))} for e in self.evaluations()],
            "tables": [{"name": t.name, "methods": list(t.methods), "reference": t.reference, "steps": list(t.steps),
                        "caption": t.caption, **({"budgets": True} if t.budgets else {})} for t in self.tables.values()],
            "teacher_samplers": self.teacher_samplers(),
            "diffusion": {m: c["diffusion"] for m, c in method_cfgs.items()},
            "train": {"global_batch_size": train["trainer"]["global_batch_size"], "num_classes": train["model"]["num_classes"]},
            "distill": None if distill is None else {k: distill[k] for k in ("cfg_scale", "warm_start_target", "sigma_d", "p_mean",
                                                                              "p_std", "lr")},
            "usage": [{"rule": rule, "job": job_label(wc), "path": str(self.layout.job_usage(rule, job_label(wc)))}
                      for rule, wc in self.all_jobs() if rule != "report"],
        }

    def all_jobs(self) -> list[tuple[str, dict]]:
        """(rule, wildcards) of every Snakemake job of the experiment."""
        data = [(s, {}) for s in (*DATA_STAGES, *PLUGIN_STAGES) if self.runs_stage(s)]
        runs = [("train", {"run": r}) for r in self.train_runs] + [("distill", {"student": d.name}) for d in self.distill_runs.values()]
        evaluations = [(rule, wildcards) for kind, wildcards, _ in self.evaluation_jobs
                       for rule, (_, rule_kind) in EVALUATION_RULES.items() if rule_kind == kind]
        return data + runs + evaluations + [("report", {})]

    def overridden_values(self) -> list[str]:
        """Every value of a stage config file that this experiment replaces (with both values), for every job."""
        for rule, wildcards in self.all_jobs():
            if rule != "report":
                self.jobs(rule, wildcards)
        return sorted(self.overridden)

    def runs_stage(self, stage: str) -> bool:
        """Whether the experiment has a job of a data stage: none when it reads another experiment's (data_from), the
        autoencoder only for the tiny (pipeline-trained) one, the classifier only for classifier features or label
        accuracy."""
        return not (self.data_from and stage in DATA_STAGES) and self.needs_stage(stage)

    def needs_stage(self, stage: str) -> bool:
        """Whether the experiment needs a data stage's files (made by its own job, or read from data_from)."""
        if stage == "autoencoder":
            return self.tiny_autoencoder
        if stage == "classifier":
            return self.needs_classifier
        return True

    def _source(self, run: Run | None) -> tuple[str, tuple]:
        """(config file, overrides) of a run's jobs: its method's for a train run, base_config for every other job."""
        return (run.method.config, run.method.overrides) if run is not None and run.kind == "train" else (self.pipe["base_config"], ())

    def _pipeline_paths(self, stage: str, cfg: dict) -> dict:
        """The values every job takes from the experiment: its identity, and where the files the rules pass between jobs
        are that its stage is given (Stage.given: the latent store, the reference statistics, the pipeline's classifier
        and tiny autoencoder)."""
        p, layout = self.pipe, self.data_layout
        made = {"data.latents_dir": str(layout.latents_dir()), "eval.reference": str(layout.reference(p["extractor"]))}
        if self.needs_classifier:
            made["eval.classifier_weights"] = str(layout.classifier_dir() / "model.safetensors")
        if cfg["autoencoder"]["name"] == "tiny":
            made["autoencoder.path"] = str(layout.autoencoder_dir() / "model.safetensors")
        return {"experiment": p["experiment"], "output_dir": p["output_dir"], "eval.extractor": p["extractor"],
                **{key: path for key, path in made.items() if key in STAGES[stage].given}}

    @functools.cached_property
    def tiny_autoencoder(self) -> bool:
        return self._config(self.pipe["base_config"], (), "encode")["autoencoder"]["name"] == "tiny"

    @functools.cached_property
    def needs_classifier(self) -> bool:
        """Classifier features, or label accuracy in any evaluation: the experiment trains the dataset's classifier."""
        sources = {self._source(e.run) for e in self.evaluations()}
        return self.pipe["extractor"] == "classifier" or any(self._config(*source, "evaluate")["eval"]["label_accuracy"]
                                                             for source in sources)


def _affecting(stage: str, overrides) -> list[str]:
    """The overrides of a stage that can change its results: those of keys the stage only uses are left out."""
    return [o for o in overrides if parse_override(o)[0] not in STAGES[stage].uses]


def _shown(path: Path) -> str:
    """A config file's path as a user reads it: relative to the working directory where it lies below it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
