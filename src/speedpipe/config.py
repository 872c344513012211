"""Configuration: OmegaConf YAML with SpeeD-style base.yaml inheritance, validated against dataclass schemas.

load_config("configs/image/imagenet_256/speed.yaml", ["optim.lr=2e-4"], phase="train") merges, lowest
priority first: every base.yaml from configs/ down to the file's folder, the file, the phase sub-dict
(`train:`, `inference:` or `sample:`) over the top level, then the command-line overrides. An override whose
value is a mapping (`diffusion.timestep_sampler={name: uniform}`) replaces that section instead of merging
into it, so switching a method never inherits the old method's parameters. Unknown keys,
wrong types and impossible values are refused with the dotted key named, before anything runs.
"""
import dataclasses
import difflib
import functools
import math
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speedpipe.config_schema import CHOICES, NAME, NAME_RULE, POSITIVE, RANGES, Config
from speedpipe.errors import ConfigError

PHASES = ("train", "inference", "sample")
def base_chain(path: Path) -> list[Path]:
    """Every base.yaml from the outermost `configs` folder above `path` down to path's own folder."""
    folders = [path.parent]
    root = next((p for p in reversed(path.parents) if p.name == "configs"), None)
    if root is not None:
        folders = [p for p in reversed(path.parents) if p == root or root in p.parents]
    chain = [f / "base.yaml" for f in folders if (f / "base.yaml").is_file()]
    return [p for p in chain if p.resolve() != path.resolve()]


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return cfg


def _check_keys(raw: Any, schema: type, prefix: str = ""):
    """Refuse keys the schema does not know, naming the dotted path and the closest valid key."""
    if not isinstance(raw, (dict, DictConfig)):
        return
    hints = get_type_hints(schema)
    for key in raw:
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {sorted(hints)}"
            raise ConfigError(f"unknown config key '{dotted}': {hint}")
        sub = hints[key]
        if get_origin(sub) is not None and type(None) in get_args(sub):
            sub = next(a for a in get_args(sub) if a is not type(None))
        if dataclasses.is_dataclass(sub):
            value = raw[key]
            if value is not None and not isinstance(value, (dict, DictConfig)):
                raise ConfigError(f"config key '{dotted}': expected a mapping of {sub.__name__} fields, got {value!r}")
            _check_keys(value, sub, dotted + ".")


def validate(cfg: DictConfig) -> DictConfig:
    """Semantic checks beyond types: finite numbers, choices, ranges, names the code can build."""
    from speedpipe.consistency.methods import method_names
    from speedpipe.diffusion import create_diffusion
    from speedpipe.diffusion.timesteps import build_sampler, build_weighting
    from speedpipe.models.dit import DiT_models
    from speedpipe.sampler_labels import parse_sampler

    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        message = str(getattr(err, 'msg', err)).splitlines()[0]
        raise ConfigError(f"config key '{getattr(err, 'full_key', '?')}': {message}") from None
    _check_finite(plain)

    def value(key):
        return functools.reduce(dict.__getitem__, key.split("."), plain)

    if not NAME.fullmatch(plain["experiment"]):
        raise ConfigError(f"config key 'experiment': {plain['experiment']!r}: {NAME_RULE}")
    for key, allowed in CHOICES.items():
        if value(key) not in allowed:
            raise ConfigError(f"config key '{key}': {value(key)!r} is not one of {list(allowed)}")
    for key in POSITIVE:
        if value(key) is None or value(key) <= 0:
            raise ConfigError(f"config key '{key}': expected a positive number, got {value(key)!r}")
    for key, valid in RANGES.items():
        if not valid.holds(value(key)):
            raise ConfigError(f"config key '{key}': expected {valid.expected()}, got {value(key)!r}")
    if cfg.model.name not in DiT_models:
        close = difflib.get_close_matches(cfg.model.name, list(DiT_models), n=1)
        raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        label = parse_sampler(cfg.sampling.sampler)
    except ValueError as err:
        raise ConfigError(f"config key 'sampling.sampler': {err}") from None
    if label.cfg_scale != 1.0:
        raise ConfigError(f"config key 'sampling.sampler': {cfg.sampling.sampler!r}: guidance is sampling.cfg_scale here")
    if cfg.distill.method not in method_names():
        raise ConfigError(f"config key 'distill.method': {cfg.distill.method!r} is not one of {method_names()} "
                          f"(the modules of speedpipe.consistency.methods)")
    unknown_metrics = sorted(set(cfg.eval.metrics) - {"fid", "kid", "isc", "prc"})
    if unknown_metrics:
        raise ConfigError(f"config key 'eval.metrics': unknown {unknown_metrics}; expected a subset of [fid, kid, isc, prc]")
    for key, total in (("trainer.ckpt_steps", cfg.trainer.steps), ("distill.ckpt_steps", cfg.distill.warm_start_steps + cfg.distill.steps)):
        outside = [s for s in value(key) if not 0 < s <= total]
        if outside:
            raise ConfigError(f"config key '{key}': steps {outside} lie outside 1..{total}")
    if cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.diffusion_steps <= 20:
        raise ConfigError(f"config key 'diffusion.diffusion_steps': {cfg.diffusion.diffusion_steps} steps of the linear schedule "
                          f"end at β = 20/T ≥ 1 (no noise level is left); expected more than 20 (DiT: 1000)")
    diffusion = create_diffusion(noise_schedule=cfg.diffusion.noise_schedule, diffusion_steps=cfg.diffusion.diffusion_steps)
    for key, build in (("diffusion.timestep_sampler", build_sampler), ("diffusion.loss_weighting", build_weighting)):
        section = OmegaConf.select(cfg, key)
        try:
            build(section.name, diffusion, **named_params(section))
        except ValueError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
    return cfg


def _check_finite(tree, prefix: str = ""):
    """Refuse NaN and infinity anywhere in a plain config (every float, in lists too), naming the key."""
    items = tree.items() if isinstance(tree, dict) else ((f"[{i}]", v) for i, v in enumerate(tree))
    for key, value in items:
        dotted = f"{prefix}{key}" if not prefix or isinstance(tree, list) else f"{prefix}.{key}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{dotted}': expected a finite number, got {value!r}")
        if isinstance(value, (dict, list)):
            _check_finite(value, dotted)


def named_params(section: DictConfig | dict) -> dict:
    """The parameters of a {name: ..., param: value} section that are set (not null), without the name."""
    items = section.items() if isinstance(section, dict) else OmegaConf.to_container(section).items()
    return {k: v for k, v in items if k != "name" and v is not None}


def _merged_file(path: Path, phase: str | None) -> DictConfig:
    """The config file's own values: its base.yaml chain, the file, then its phase sub-dict (no overrides, no defaults)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if phase is not None and phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r}; expected one of {list(PHASES)}")
    merged = OmegaConf.merge(*[_read_yaml(p) for p in base_chain(path)], _read_yaml(path))
    phase_dicts = {p: merged.pop(p) for p in PHASES if p in merged}
    if phase in phase_dicts and phase_dicts[phase] is not None:
        merged = OmegaConf.merge(merged, phase_dicts[phase])
    return merged


def leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every non-mapping value of a nested mapping (lists and empty mappings are values)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out.update(leaves(value, dotted) if isinstance(value, dict) and value else {dotted: value})
    return out


def file_values(path, phase: str | None = None) -> dict[str, tuple[Any, Path]]:
    """{dotted key: (value, the file that sets it)} of every value a config file sets itself, with its base.yaml files
    and its phase sub-dict (the last file of the chain that sets a key wins, as in load_config)."""
    path = Path(path)
    values = {}
    for file in [*base_chain(path), path]:
        raw = OmegaConf.to_container(_read_yaml(file), resolve=False)
        phase_dict = raw.get(phase) if phase else None
        for p in PHASES:
            raw.pop(p, None)
        values.update({k: (v, file) for k, v in leaves(raw).items()})
        values.update({k: (v, file) for k, v in leaves(phase_dict or {}).items()})
    return values


def load_config(path, overrides: list[str] | tuple[str, ...] = (), phase: str | None = None, schema: type = Config) -> DictConfig:
    """Load, merge and validate a config: see the module docstring for the merge order."""
    merged = _merged_file(Path(path), phase)
    for item in overrides:
        key, value = parse_override(item)
        OmegaConf.update(merged, key, value, merge=not isinstance(value, dict))
    _check_keys(merged, schema)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), merged)
    except OmegaConfBaseException as err:
        message = str(getattr(err, 'msg', err)).splitlines()[0]
        raise ConfigError(f"config key '{getattr(err, 'full_key', '?')}': {message}") from None
    return validate(cfg) if schema is Config else cfg


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value as YAML reads it; ${...} kept unresolved, to resolve in the merged config)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected the form key.path=value")
    key = item.split("=", 1)[0]
    value = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    for part in key.split("."):
        value = value[part]
    return key, value


def to_plain(cfg: DictConfig) -> dict:
    """Resolved plain Python values (what Snakemake params and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig, path) -> None:
    from speedpipe.io import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
