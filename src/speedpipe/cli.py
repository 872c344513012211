"""Command line: `speedpipe STAGE --config CONFIG [key=value ...]` and the SpeeD-style `main.py -c CONFIG -p PHASE`."""
import argparse
import importlib
import sys

from speedpipe.config import ConfigError, load_config

# stage name -> (module with run(cfg), config phase merged over the top level)
STAGES = {
    "autoencoder": ("speedpipe.stages.autoencoder", "train"),
    "encode": ("speedpipe.stages.encode", None),
    "train": ("speedpipe.stages.train", "train"),
    "distill": ("speedpipe.stages.distill", "train"),
    "sample": ("speedpipe.stages.sample", "sample"),
    "classifier": ("speedpipe.stages.classifier", None),
    "reference": ("speedpipe.stages.reference", None),
    "evaluate": ("speedpipe.stages.evaluate", None),
}
# main.py phases (SpeeD's entry point) -> stage; "inference" is SpeeD's name for sampling a trained model
PHASE_STAGES = {"train": "train", "inference": "sample", "sample": "sample"}


def run_stage(stage: str, config_path: str, overrides: list[str], phase: str | None = None):
    module_name, default_phase = STAGES[stage]
    phase = phase or default_phase
    cfg = load_config(config_path, overrides, phase=phase)
    return importlib.import_module(module_name).run(cfg)


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
