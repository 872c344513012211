"""The experiment file of a Snakemake run -> the resolved config of every job (plain values for `params`).

The Snakefile only says what depends on what; everything about *what* a job computes is decided here,
from configs/pipeline/*.yaml: which stage config file, which overrides, which checkpoint or samples file.
"""
import difflib
import functools
import json
import re
from pathlib import Path

from speedpipe.config import ConfigError, load_config, to_plain

PIPELINE_KEYS = {
    "experiment", "output_dir", "base_config", "methods", "seeds", "train_steps", "eval_steps", "curve_sampler",
    "curve_samples", "teacher", "teacher_sampler", "teacher_ode_sampler", "teacher_baselines", "scm_samplers",
    "final_samples", "distill_warm_start", "distill_steps", "distill_eval_steps", "extractor", "overrides", "launcher",
}
# A sampler label: ddpm<N> / ddim<N> with an optional guidance suffix -cfg<scale>, or scm1 / scm2.
SAMPLER_LABEL = re.compile(r"(?P<sampler>(?:ddpm|ddim)\d+)(?:-cfg(?P<cfg>\d+(?:\.\d+)?))?|(?P<scm>scm[12])")


def parse_sampler(label: str) -> tuple[str, float]:
    """'ddpm250-cfg3' -> ('ddpm250', 3.0); 'ddim25' -> ('ddim25', 1.0); 'scm2' -> ('scm2', 1.0)."""
    m = SAMPLER_LABEL.fullmatch(str(label))
    if m is None:
        raise ConfigError(f"pipeline config: sampler {label!r} is not ddpm<N>, ddim<N> (optionally -cfg<scale>), scm1 or scm2")
    if m["scm"]:
        return m["scm"], 1.0
    return m["sampler"], float(m["cfg"] or 1.0)
STAGES = ("autoencoder", "encode", "classifier", "reference", "train", "distill", "sample", "evaluate", "report")
PHASES = {"train": "train", "distill": "train", "sample": "sample"}


def check_pipeline(pipe: dict, base_dir=None) -> dict:
    """Validate an experiment file; config paths in it are taken relative to base_dir (the repository)."""
    pipe = dict(pipe)
    unknown = sorted(set(pipe) - PIPELINE_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(PIPELINE_KEYS), n=1)
        raise ConfigError(f"pipeline config: unknown key {unknown[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    missing = sorted(PIPELINE_KEYS - set(pipe) - {"overrides", "launcher"})
    if missing:
        raise ConfigError(f"pipeline config: missing key(s) {missing}")
    for stage in pipe.get("overrides") or {}:
        if stage not in STAGES:
            raise ConfigError(f"pipeline config: overrides.{stage}: unknown stage; expected one of {list(STAGES)}")
    if pipe["teacher"] not in runs(pipe):
        raise ConfigError(f"pipeline config: teacher {pipe['teacher']!r} is not one of the train runs {runs(pipe)}")
    for key in ("eval_steps", "distill_eval_steps"):
        steps = pipe[key]
        if not steps or any(not isinstance(s, int) or s < 0 for s in steps) or list(steps) != sorted(set(steps)):
            raise ConfigError(f"pipeline config: {key} {steps}: expected increasing non-negative integers (a checkpoint "
                              f"is written at exactly each of them)")
    if min(pipe["eval_steps"]) < 1:
        raise ConfigError(f"pipeline config: eval_steps {pipe['eval_steps']}: the first checkpoint is at step 1 or later")
    if max(pipe["eval_steps"]) != pipe["train_steps"]:
        raise ConfigError("pipeline config: the last of eval_steps must equal train_steps (the teacher's checkpoint)")
    for key in ("curve_sampler", "teacher_sampler", "teacher_ode_sampler"):
        parse_sampler(pipe[key])
    for label in [*pipe["teacher_baselines"], *pipe["scm_samplers"]]:
        parse_sampler(label)
    if any(parse_sampler(label)[0].startswith("scm") for label in [pipe["curve_sampler"], pipe["teacher_sampler"],
                                                                   pipe["teacher_ode_sampler"], *pipe["teacher_baselines"]]):
        raise ConfigError("pipeline config: scm samplers belong in scm_samplers (they need a distilled student)")
    if not all(parse_sampler(label)[0].startswith("scm") for label in pipe["scm_samplers"]):
        raise ConfigError(f"pipeline config: scm_samplers {pipe['scm_samplers']}: only scm1 and scm2 sample a distilled student")
    total = pipe["distill_warm_start"] + pipe["distill_steps"]
    outside = [s for s in pipe["distill_eval_steps"] if not pipe["distill_warm_start"] <= s <= total]
    if outside or max(pipe["distill_eval_steps"]) != total:
        raise ConfigError(f"pipeline config: distill_eval_steps {pipe['distill_eval_steps']} must lie in "
                          f"[distill_warm_start, distill_warm_start + distill_steps] = [{pipe['distill_warm_start']}, {total}] "
                          f"and end at {total}")
    if base_dir is not None:
        absolute = lambda p: str(Path(base_dir, p)) if not Path(p).is_absolute() else p  # noqa: E731
        pipe["base_config"] = absolute(pipe["base_config"])
        pipe["methods"] = {m: absolute(p) for m, p in pipe["methods"].items()}
    for path in [pipe["base_config"], *pipe["methods"].values()]:
        if not Path(path).is_file():
            raise ConfigError(f"pipeline config: config file not found: {path}")
    from speedpipe.launch import parse_launcher

    for stage, settings in (pipe.get("launcher") or {}).items():
        if stage != "default" and stage not in STAGES:
            raise ConfigError(f"pipeline config: launcher.{stage}: unknown stage; expected 'default' or one of {list(STAGES)}")
        parse_launcher(settings or {})
    return pipe


def runs(pipe) -> list[str]:
    return [f"{m}-s{s}" for m in pipe["methods"] for s in pipe["seeds"]]


def root(pipe) -> Path:
    return Path(pipe["output_dir"]) / pipe["experiment"]


def step_dir(step) -> str:
    return f"{int(step):07d}"


def stage_config(pipe: dict, stage: str, run: str | None = None, step=None, sampler: str | None = None) -> dict:
    """The resolved, validated config of one job, as plain Python values.

    The stage config file with the experiment's overrides is loaded and validated once per (file, stage);
    the job's own values (seed, checkpoint, sampler, paths), generated here with the schema's types, are
    then set on a copy: parsing the DAG stays fast with hundreds of jobs.
    """
    method = run.rsplit("-s", 1)[0] if run and not run.startswith("scm-") else None
    path = pipe["methods"][method] if method else pipe["base_config"]
    overrides = [f"experiment={pipe['experiment']}", f"output_dir={pipe['output_dir']}", f"eval.extractor={pipe['extractor']}"]
    overrides += list((pipe.get("overrides") or {}).get(stage, []))
    cfg = json.loads(_validated(path, tuple(overrides), PHASES.get(stage)))
    base = root(pipe)
    job = {}
    if stage == "train":
        job = {"seed": int(run.rsplit("-s", 1)[1]), "method": method, "trainer.steps": int(pipe["train_steps"]),
               "trainer.ckpt_steps": [int(s) for s in pipe["eval_steps"]]}
    elif stage == "distill":
        job = {"distill.teacher": str(base / "train" / pipe["teacher"] / f"ckpt-{step_dir(pipe['train_steps'])}.pt"),
               "distill.warm_start_steps": int(pipe["distill_warm_start"]), "distill.steps": int(pipe["distill_steps"]),
               "distill.ckpt_steps": [int(s) for s in pipe["distill_eval_steps"]],
               "distill.run_dir": str(base / "distill" / pipe["teacher"])}
    elif stage in ("sample", "evaluate"):
        samples = base / "samples" / run / step_dir(step) / f"{sampler}.npz"
        name, cfg_scale = parse_sampler(sampler)
        count = pipe["curve_samples"] if sampler == pipe["curve_sampler"] else pipe["final_samples"]
        job = {"sampling.checkpoint": str(checkpoint_path(pipe, run, step)), "sampling.sampler": name,
               "sampling.cfg_scale": cfg_scale, "sampling.out": str(samples), "sampling.num_samples": int(count),
               "eval.samples": str(samples)}
    for dotted, value in job.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value
    return cfg


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


def checkpoint_path(pipe, run: str, step) -> Path:
    """The checkpoint a model label names: train/{run}/... or, for scm-{teacher}, distill/{teacher}/..."""
    if run.startswith("scm-"):
        return root(pipe) / "distill" / run[len("scm-"):] / f"ckpt-{step_dir(step)}.pt"
    return root(pipe) / "train" / run / f"ckpt-{step_dir(step)}.pt"


def student(pipe) -> str:
    return f"scm-{pipe['teacher']}"


def teacher_samplers(pipe) -> list[str]:
    """The teacher's final evaluations: its reference sampler, its ODE ceiling, then the baselines."""
    return list(dict.fromkeys([pipe["teacher_sampler"], pipe["teacher_ode_sampler"], *pipe["teacher_baselines"]]))


def evaluations(pipe) -> list[tuple[str, int, str]]:
    """(run, step, sampler label) of every metrics file the report needs."""
    jobs = [(run, step, pipe["curve_sampler"]) for run in runs(pipe) for step in pipe["eval_steps"]]
    jobs += [(pipe["teacher"], pipe["train_steps"], label) for label in teacher_samplers(pipe)]
    jobs += [(student(pipe), step, label) for step in pipe["distill_eval_steps"] for label in pipe["scm_samplers"]]
    return sorted(set(jobs))


def evaluation_jobs(pipe) -> dict[str, tuple[str, list[tuple[int, str]]]]:
    """job name -> (run, its (step, sampler) evaluations), each job sampled and evaluated in one process (one start-up).

    A train run's curve points make one job, with the teacher's few-step samplers; each of the teacher's samplers
    with more steps than the curve sampler makes its own (they are the long ones, and run side by side); the
    student's checkpoints make one.
    """
    def steps(label):
        return int(parse_sampler(label)[0][4:])

    jobs = {}
    for run, step, sampler in evaluations(pipe):
        final = run == pipe["teacher"] and step == pipe["train_steps"] and sampler in teacher_samplers(pipe)
        name = f"{run}-{sampler}" if final and steps(sampler) > steps(pipe["curve_sampler"]) else run
        jobs.setdefault(name, (run, []))[1].append((step, sampler))
    return jobs


def sample_outputs(pipe, run, step, sampler) -> list[str]:
    base = root(pipe) / "samples" / run / step_dir(step)
    return [str(base / f"{sampler}.{ext}") for ext in ("npz", "json", "png")]


def metrics_output(pipe, run, step, sampler) -> str:
    return str(root(pipe) / "metrics" / run / step_dir(step) / f"{sampler}.json")


def launcher_settings(pipe, stage) -> dict:
    launcher = pipe.get("launcher") or {}
    return {**(launcher.get("default") or {"executor": "local"}), **(launcher.get(stage) or {})}


def report_config(pipe) -> dict:
    """What the report needs: the experiment file and each method's resolved diffusion settings."""
    method_cfgs = {m: stage_config(pipe, "train", run=f"{m}-s{pipe['seeds'][0]}") for m in pipe["methods"]}
    return {
        "pipeline": dict(pipe),
        "root": str(root(pipe)),
        "runs": runs(pipe),
        "evaluations": [list(e) for e in evaluations(pipe)],
        "teacher_samplers": teacher_samplers(pipe),
        "student": student(pipe),
        "diffusion": {m: c["diffusion"] for m, c in method_cfgs.items()},
        "train_config": method_cfgs[next(iter(pipe["methods"]))],
        "distill_config": stage_config(pipe, "distill")["distill"],
    }
