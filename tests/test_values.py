"""Every config value is checked before any work starts, and the error names the key (issue 26, item 5): NaN and
infinity anywhere, the ranges of speedpipe.config_schema.RANGES, and experiment names that would leave {output_dir}."""
import re

import pytest
import yaml
from conftest import REPO

from speedpipe.config import load_config
from speedpipe.config_schema import RANGES
from speedpipe.errors import ConfigError

SPEED = REPO / "configs/mnist5k/speed.yaml"


def refused(overrides, key):
    """load_config(SPEED, overrides) raises a ConfigError naming `key`; returns its message."""
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}'") as err:
        load_config(SPEED, overrides)
    return str(err.value)


@pytest.mark.parametrize("override,key", [
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=-.inf", "optim.lr"),
    ("optim.betas=[0.9, .nan]", "optim.betas[1]"),  # inside a list
    ("distill.p_mean=.nan", "distill.p_mean"),  # a key with no range: only finiteness
    ("distill.cfg_scale=.inf", "distill.cfg_scale"),
    ("diffusion.timestep_sampler.k=.nan", "diffusion.timestep_sampler.k"),  # a sampler parameter (Optional[float])
    ("sampling.scm_mid_t=.nan", "sampling.scm_mid_t"),
    ("trainer.ema_decay=.nan", "trainer.ema_decay"),
])
def test_nan_and_infinity_are_refused_naming_the_key(override, key):
    assert re.search(r"finite.*(nan|inf)", refused([override], key))


@pytest.mark.parametrize("override,key,expected", [
    ("distill.ema_decay=1.0", "distill.ema_decay", "[0, 1)"),  # the student's EMA would never leave the teacher
    ("distill.ema_decay=-3", "distill.ema_decay", "[0, 1)"),
    ("trainer.ema_decay=1.0", "trainer.ema_decay", "[0, 1)"),
    ("optim.grad_clip=-1.0", "optim.grad_clip", "null or"),
    ("optim.betas=[0.9]", "optim.betas", "2 values"),
    ("optim.betas=[0.9, 0.99, 0.999]", "optim.betas", "2 values"),
    ("optim.betas=[0.9, 1.0]", "optim.betas", "[0, 1)"),
    ("distill.betas=[-0.1, 0.99]", "distill.betas", "[0, 1)"),
    ("optim.eps=0", "optim.eps", "(0, inf)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay", "[0, inf)"),
    ("eval.reference_max_images=-5", "eval.reference_max_images", "null or"),
    ("sampling.scm_mid_t=3.0", "sampling.scm_mid_t", "(0, pi/2)"),  # TrigFlow time lives in [0, pi/2]
    ("sampling.scm_mid_t=0", "sampling.scm_mid_t", "(0, pi/2)"),
    ("sampling.ddim_eta=1.5", "sampling.ddim_eta", "[0, 1]"),
    ("model.class_dropout_prob=1.0", "model.class_dropout_prob", "[0, 1)"),
    ("eval.num_workers=-1", "eval.num_workers", "[0, inf)"),
    ("autoencoder.block_out_channels=[]", "autoencoder.block_out_channels", "one or more"),
    ("distill.tangent_c=-0.1", "distill.tangent_c", "[0, inf)"),
])
def test_values_out_of_range_are_refused_naming_key_value_and_range(override, key, expected):
    message = refused([override], key)
    assert "expected" in message and expected in message and "got" in message, message


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_is_enforced(key):
    """Each key of the table, given a value just below its range, is refused naming it."""
    valid = RANGES[key]
    below = valid.low if valid.ends[0] == "(" else valid.low - 1
    value = [below] * (valid.length or 1) if valid.each else below
    refused([f"{key}={value}"], key)


@pytest.mark.parametrize("override", [
    "distill.ema_decay=0.0", "trainer.ema_decay=0.0", "trainer.ema_decay=0.999999", "optim.grad_clip=null",
    "optim.grad_clip=0", "optim.grad_clip=1.0", "eval.reference_max_images=null", "eval.reference_max_images=0",
    "eval.reference_max_images=5", "optim.betas=[0.0, 0.0]", "optim.weight_decay=0", "sampling.ddim_eta=0",
    "sampling.ddim_eta=1", "sampling.scm_mid_t=1.5", "distill.tangent_c=0", "optim.warmup_steps=0",
    "distill.p_mean=-3.0", "experiment=a.b-c_d",
])
def test_valid_boundary_values_still_load(override):
    load_config(SPEED, [override])


@pytest.mark.parametrize("name", ["..", ".", "/data/x", "../../x", ".hidden", "a/b", ""])
def test_a_stage_config_refuses_an_experiment_name_outside_output_dir(name):
    refused([f"experiment='{name}'"], "experiment")


def micro(**changes) -> dict:
    return {**yaml.safe_load((REPO / "tests/data/micro.yaml").read_text()), **changes}


@pytest.mark.parametrize("name", ["..", "/data/x", "../../x", ".hidden", "a/b"])
def test_an_experiment_file_refuses_an_experiment_name_outside_output_dir(name):
    from speedpipe.experiment_file import check_experiment_file

    with pytest.raises(ConfigError, match=rf"pipeline config: experiment '{re.escape(name)}': names are"):
        check_experiment_file(micro(experiment=name), base_dir=REPO)


def test_an_experiment_refuses_a_bad_name_before_anything_else():
    from speedpipe.experiment_file import check_experiment_file
    from speedpipe.workflow import Experiment

    assert check_experiment_file(micro(experiment="scd-x"), base_dir=REPO)["experiment"] == "scd-x"  # not a method name
    with pytest.raises(ConfigError, match=r"experiment '\.\.'"):
        Experiment(micro(experiment=".."), base_dir=REPO)
