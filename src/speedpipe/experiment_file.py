"""The experiment file checked before anything is planned: its keys against the schema, its names, its steps and
samplers, its launcher settings; its methods expanded (grids, variants) into stage config files plus overrides."""
import difflib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from speedpipe.config_schema import NAME, NAME_RULE
from speedpipe.consistency.methods import method_names
from speedpipe.errors import ConfigError
from speedpipe.experiment_schema import SCHEMA, schema
from speedpipe.launcher_settings import many_tasks_key, parse_launcher, refuse_tasks
from speedpipe.sampler_labels import SamplerLabel, parse_sampler
from speedpipe.stages import STAGES

TEACHER_KEYS = {"teacher_sampler", "teacher_ode_sampler", "teacher_baselines"}  # required when there are teachers
STUDENT_KEYS = {"scm_samplers", "final_samples", "distill_warm_start", "distill_steps", "distill_eval_steps"}  # and students
CONSISTENCY_KEYS = TEACHER_KEYS | STUDENT_KEYS
# names of the report's own tables and figures, which a named table (tables/{name}.*, figures/{name}.*) must not take
RESERVED_NAMES = ("metrics", "scm", "scm_across_teachers", "usage", "summary", "training_loss", "timestep_methods", "samples_per_method", "teacher_grid",
                  "teacher_vs_scm", "distillation")


def sampler_label(label: str) -> SamplerLabel:
    """An experiment file's sampler label, parsed (speedpipe.sampler_labels); a bad one is a ConfigError."""
    try:
        return parse_sampler(label)
    except ValueError as err:
        raise ConfigError(f"pipeline config: {err}") from None


@dataclass(frozen=True)
class Method:
    """A stage config file plus overrides: every job of the method's runs loads the file with them."""
    name: str
    config: str
    overrides: tuple[str, ...] = ()


def refuse(what: str, name, valid) -> ConfigError:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    return ConfigError(f"pipeline config: {what} {name!r}" + (f"; did you mean {close[0]!r}?" if close else f"; expected one of {list(valid)}"))


def _check_keys(where: str, given: dict, allowed: set):
    if not isinstance(given, dict):
        raise ConfigError(f"pipeline config: {where}: expected a mapping, got {given!r}")
    for key in given:
        if key not in allowed:
            raise refuse(f"{where}: unknown key", key, sorted(allowed))


def check_name(where: str, name, runs: bool = True) -> str:
    """An experiment, method or table name (NAME); a method or table name (runs) must not look like a student run's."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"pipeline config: {where} {name!r}: {NAME_RULE}")
    reserved = [m for m in method_names() if name.startswith(f"{m}-")] if runs else []
    if reserved:
        raise ConfigError(f"pipeline config: {where} {name!r}: names starting with '{reserved[0]}-' are the "
                          f"{reserved[0]} students' runs")
    return name


def _override_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cells(name: str, spec: dict) -> list[tuple[str, list[str]]]:
    """A method's (name, overrides) cells: itself, or one per grid combination ({name}-{leaf}{value}...), or one per
    named variant ({name}-{variant}: a list of overrides, for values that move together such as SpeeD's two τ)."""
    grid, variants = spec.get("grid"), spec.get("variants")
    if grid is not None and variants is not None:
        raise ConfigError(f"pipeline config: methods.{name}: give a grid or variants, not both")
    if grid is not None:  # the schema made it a mapping of key.path -> non-empty list
        for key, values in grid.items():
            if not all(isinstance(v, (int, float, str, bool)) for v in values):
                raise ConfigError(f"pipeline config: methods.{name}.grid.{key}: grid values are numbers, strings or booleans")
        return [("-".join([name, *(f"{key.rsplit('.', 1)[-1]}{_override_value(v)}" for key, v in zip(grid, combination))]),
                 [f"{key}={_override_value(v)}" for key, v in zip(grid, combination)])
                for combination in itertools.product(*grid.values())]
    if variants is not None:
        return [(f"{name}-{variant}", list(overrides)) for variant, overrides in variants.items()]
    return [(name, [])]


def expand_methods(methods: dict, base_dir=None) -> dict[str, Method]:
    """The experiment file's `methods` (checked against the schema) -> name: Method, grids and variants expanded."""
    absolute = lambda p: str(Path(base_dir, p)) if base_dir is not None and not Path(p).is_absolute() else str(p)  # noqa: E731
    expanded = {}
    for name, spec in methods.items():
        check_name("method", name)
        spec = {"config": spec} if isinstance(spec, str) else spec
        overrides = spec.get("overrides") or []
        for full, cell_overrides in _cells(name, spec):
            check_name(f"method (from methods.{name})", full)
            if full in expanded:
                raise ConfigError(f"pipeline config: duplicate method name {full!r} (from methods.{name})")
            expanded[full] = Method(full, absolute(spec["config"]), tuple(overrides + cell_overrides))
    for method in expanded.values():
        if not Path(method.config).is_file():
            raise ConfigError(f"pipeline config: methods.{method.name}: config file not found: {method.config}")
    return expanded


def check_experiment_file(pipe: dict, base_dir=None) -> dict:
    """An experiment file checked against its JSON schema (with the schema's defaults filled in), then the checks a
    schema cannot make (methods and tables are checked as they are expanded); returns it with base_config made absolute
    from base_dir."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    _check_keys("top level", pipe, set(schema()["properties"]))
    missing = sorted(set(schema()["required"]) - set(pipe))
    if missing:
        raise ConfigError(f"pipeline config: missing key(s) {missing}")
    given_keys = set(pipe)  # before the schema fills in its defaults
    pipe = json.loads(json.dumps(pipe))  # a copy, with tuples as lists (as YAML gives them)
    try:
        validate(pipe, str(SCHEMA), set_default=True)
    except WorkflowError:
        raise _schema_error(pipe) from None
    check_name("experiment", pipe["experiment"], runs=False)  # {output_dir}/{experiment}/: no '..', '/' or hidden folder
    if pipe.get("data_from") is not None:
        check_name("data_from", pipe["data_from"], runs=False)
        if pipe["data_from"] == pipe["experiment"]:
            raise ConfigError(f"pipeline config: data_from {pipe['data_from']!r}: names this experiment itself (leave it out)")
    teachers, teacher_free = pipe["teachers"], pipe["teacher_free"]
    if not teachers and "consistency_methods" in given_keys:
        raise ConfigError(f"pipeline config: consistency_methods {pipe['consistency_methods']} configure consistency models, "
                          f"but `teachers` is empty: name the train runs they start from")
    for keys, needed, why in ((TEACHER_KEYS, bool(teachers), f"the teachers {teachers}"),
                              (STUDENT_KEYS, bool(teachers or teacher_free), "the consistency models")):
        given, missing = sorted(keys & set(pipe)), sorted(keys - set(pipe))
        if needed and missing:
            raise ConfigError(f"pipeline config: missing key(s) {missing} (they configure {why})")
        if not needed and given:
            raise ConfigError(f"pipeline config: {given} configure " + ("teachers, but `teachers` is empty: name the train "
                              "runs they start from" if keys is TEACHER_KEYS else "consistency models, but `teachers` and "
                              "`teacher_free` are empty"))
    for key in ("consistency_methods", "teacher_free"):
        for name in pipe[key]:
            if name not in method_names():
                raise refuse(f"{key}: no consistency method", name, method_names())
    _check_steps(pipe, "eval_steps")
    if min(pipe["eval_steps"]) < 1:
        raise ConfigError(f"pipeline config: eval_steps {pipe['eval_steps']}: the first checkpoint is at step 1 or later")
    if max(pipe["eval_steps"]) != pipe["train_steps"]:
        raise ConfigError("pipeline config: the last of eval_steps must equal train_steps (the teacher's checkpoint)")
    for label in [pipe["curve_sampler"], *(pipe.get(k) for k in ("teacher_sampler", "teacher_ode_sampler") if k in pipe),
                  *pipe.get("teacher_baselines", [])]:
        if sampler_label(label).consistency:
            raise ConfigError(f"pipeline config: sampler {label!r}: scm samplers belong in scm_samplers (they need a consistency student)")
    if not all(sampler_label(label).consistency for label in pipe.get("scm_samplers", [])):
        raise ConfigError(f"pipeline config: scm_samplers {pipe['scm_samplers']}: only scm1 and scm2 sample a consistency student")
    if teachers or teacher_free:
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
    check_launchers(pipe["launcher"])
    return pipe


def check_launchers(launchers: dict):
    """Each stage's launcher settings (its own over `default`) valid, and one task for a stage that runs in one process,
    the key that asks for more named where it is set: `launcher.{stage}.…` or `launcher.default.…`."""
    default = launchers.get("default") or {}
    for settings in launchers.values():
        parse_launcher(settings or {})
    for name, stage in STAGES.items():
        own = launchers.get(name) or {}
        if not stage.ranks:
            cfg = parse_launcher({**default, **own})
            refuse_tasks(name, cfg, f"launcher.{name if many_tasks_key(cfg) in own else 'default'}")


def _schema_error(pipe: dict) -> ConfigError:
    """The most relevant way an experiment file breaks its schema, as a message naming the key (and, for an unknown
    key, the closest valid one)."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(pipe))
    where = ".".join(map(str, error.absolute_path)) or "top level"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        unknown = sorted(k for k in error.instance if k not in error.schema.get("properties", {}))
        if unknown:
            return refuse(f"{where}: unknown key", unknown[0], sorted(error.schema.get("properties", {})))
    if error.validator == "enum" and "propertyNames" in error.schema_path:
        return refuse(f"{where}: unknown stage", error.instance, error.validator_value)
    return ConfigError(f"pipeline config: {where}: {error.message} (see {SCHEMA.name})")


def _check_steps(pipe, key):
    steps = pipe[key]  # the schema made it a non-empty list of non-negative integers
    if list(steps) != sorted(set(steps)):
        raise ConfigError(f"pipeline config: {key} {steps}: expected increasing non-negative integers (a checkpoint "
                          f"is written at exactly each of them)")
