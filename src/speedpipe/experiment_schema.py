"""The experiment file's JSON schema (workflow/schemas/experiment.schema.yaml): every key, documented, with defaults."""
import functools
from pathlib import Path

import yaml

from speedpipe.errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "experiment.schema.yaml"


@functools.lru_cache(maxsize=None)
def schema() -> dict:
    if not SCHEMA.is_file():
        raise ConfigError(f"the experiment file schema {SCHEMA} is missing: run from a checkout of the speedpipe repository")
    return yaml.safe_load(SCHEMA.read_text())


def schema_defaults() -> dict:
    """The documented default of every optional top-level key of an experiment file."""
    return {k: v["default"] for k, v in schema()["properties"].items() if "default" in v}
