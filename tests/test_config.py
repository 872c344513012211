import pytest
import yaml

from speedpipe.config import base_chain, load_config
from speedpipe.errors import ConfigError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_configs_load(tmp_path):
    from conftest import REPO

    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "pipeline" in path.parts:
            continue
        cfg = load_config(path, phase="train")
        assert cfg.model.name
    speed = load_config(REPO / "configs/image/imagenet_256/speed.yaml")
    assert speed.model.name == "DiT-XL/2" and speed.trainer.global_batch_size == 256
    assert speed.diffusion.timestep_sampler.k == 5 and speed.diffusion.timestep_sampler.tau == 700
    assert speed.diffusion.loss_weighting.lam == 0.6


def test_inheritance_phase_and_override_order(tmp_path):
    root = tmp_path / "configs"
    _write(root / "base.yaml", "seed: 1\noptim: {lr: 1.0}\ntrainer: {steps: 10}\n")
    _write(root / "a/base.yaml", "seed: 2\noptim: {weight_decay: 0.5}\n")
    _write(root / "a/b/base.yaml", "trainer: {steps: 20}\n")
    leaf = _write(root / "a/b/x.yaml", "trainer: {log_every: 5}\ntrain: {trainer: {steps: 30}}\nsample: {seed: 9}\n")
    assert [p.relative_to(root).as_posix() for p in base_chain(leaf)] == ["base.yaml", "a/base.yaml", "a/b/base.yaml"]
    cfg = load_config(leaf)
    assert (cfg.seed, cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.steps, cfg.trainer.log_every) == (2, 1.0, 0.5, 20, 5)
    assert load_config(leaf, phase="train").trainer.steps == 30
    assert load_config(leaf, phase="sample").seed == 9
    assert load_config(leaf, ["seed=7", "trainer.steps=40"], phase="train").trainer.steps == 40


def test_a_mapping_override_replaces_the_section(tmp_path):
    """Switching SpeeD's sampler to uniform on the command line must not carry SpeeD's k and tau along."""
    leaf = _write(tmp_path / "configs/x.yaml", "diffusion: {timestep_sampler: {name: speed, k: 5, tau: 700}}\n")
    cfg = load_config(leaf, ["diffusion.timestep_sampler={name: uniform}"])
    assert (cfg.diffusion.timestep_sampler.name, cfg.diffusion.timestep_sampler.k) == ("uniform", None)
    assert load_config(leaf, ["diffusion.timestep_sampler.k=3"]).diffusion.timestep_sampler.tau == 700


def test_unknown_key_names_path_and_closest(tmp_path):
    path = _write(tmp_path / "c.yaml", "diffusion:\n  timestep_sampler: {name: speed, k: 5, tau: 700, duall: true}\n")
    with pytest.raises(ConfigError, match=r"'diffusion\.timestep_sampler\.duall'.*did you mean 'diffusion\.timestep_sampler\.dual'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*'optim\.lr'"):
        load_config(_write(tmp_path / "d.yaml", "seed: 0\n"), ["optim.lrr=3"])


def test_wrong_type_names_key_value_and_type(tmp_path):
    path = _write(tmp_path / "c.yaml", "trainer: {steps: many}\n")
    with pytest.raises(ConfigError, match=r"trainer\.steps.*'many'.*Integer"):
        load_config(path)


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    path = _write(tmp_path / "c.yaml", "seed: 0\n")
    with pytest.raises(ConfigError, match=r"trainer\.precision.*fp16"):
        load_config(path, ["trainer.precision=fp16"])
    with pytest.raises(ConfigError, match=r"diffusion\.loss_weighting.*missing required"):
        load_config(path, ["diffusion.loss_weighting.name=speed"])
    with pytest.raises(ConfigError, match="expected the form"):
        load_config(path, ["seed"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(ConfigError, match=r"diffusion\.diffusion_steps': 20 steps of the linear schedule"):
        load_config(path, ["diffusion.diffusion_steps=20"])
    load_config(path, ["diffusion.diffusion_steps=20", "diffusion.noise_schedule=cosine"])  # the cosine schedule clips its β


def test_resolved_config_is_written_next_to_training_outputs(tiny_train_config):
    from speedpipe.stages import train

    cfg = load_config(tiny_train_config, ["trainer.steps=2"], phase="train")
    run_dir = train.run(cfg)
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["trainer"]["steps"] == 2 and written["diffusion"]["timestep_sampler"]["k"] == 5
