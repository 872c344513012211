"""Command line: `speedpipe STAGE --config CONFIG [key=value ...]` and the SpeeD-style `main.py -c CONFIG -p PHASE`.

The stages, their modules and config phases come from the registry (speedpipe.stages). `speedpipe report` takes an
experiment file (configs/pipeline/*.yaml) whose runs have finished, as the pipeline's report job does.
"""
import argparse
import sys

import yaml

from speedpipe.config import load_config
from speedpipe.errors import ConfigError
from speedpipe.stages import DATA_STAGES, STAGES

# main.py phases (SpeeD's entry point) -> stage; "inference" is SpeeD's name for sampling a trained model
PHASE_STAGES = {"train": "train", "inference": "sample", "sample": "sample"}


def run_stage(stage: str, config_path: str, overrides: list[str], phase: str | None = None):
    entry = STAGES[stage]
    if entry.config == "report":
        from speedpipe.workflow import Experiment

        if overrides:
            raise ConfigError(f"speedpipe {stage}: takes an experiment file and no overrides (got {overrides})")
        with open(config_path) as f:
            return entry.run(Experiment(yaml.safe_load(f)).report_config())
    config = load_config(config_path, overrides, phase=phase or entry.phase)
    if stage in DATA_STAGES:
        _refuse_to_replace(stage, config)
    return entry.run(config)


def _refuse_to_replace(stage: str, config):
    """A data stage run alone writes where the experiment's pipeline keeps that stage's files: refused where those were
    made with other settings (a command with one setting changed must not replace what the pipeline's runs read)."""
    from speedpipe.layout import data_record

    record = data_record(stage, config)
    if record.is_file():
        differ = STAGES[stage].made_otherwise(yaml.safe_load(record.read_text()), config)
        if differ:
            raise ConfigError(f"speedpipe {stage}: {record.parent} holds this stage's files made with other settings "
                              f"({', '.join(differ)}); a stage run alone does not replace them: give it another experiment "
                              f"or output_dir")


def _exit_on_config_error(fn, *args):
    try:
        return fn(*args)
    except ConfigError as err:
        print(f"speedpipe: configuration error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="speedpipe", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", "-c", required=True, help="YAML config (base.yaml files above it are merged first)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4")
    args = parser.parse_intermixed_args(argv)
    _exit_on_config_error(run_stage, args.stage, args.config, args.overrides)


def main_py(argv=None):
    """`python main.py -c CONFIG -p train|inference|sample [a.b=c ...]`, as in the SpeeD repository."""
    parser = argparse.ArgumentParser(prog="main.py")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("-p", "--phase", required=True, choices=sorted(PHASE_STAGES))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    _exit_on_config_error(run_stage, PHASE_STAGES[args.phase], args.config, args.overrides, args.phase)


if __name__ == "__main__":
    main()
