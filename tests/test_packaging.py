import re

import pytest
import yaml

from conftest import REPO


@pytest.mark.parametrize("env_file,own_package", [("environment.yml", ["-e ."]), ("workflow/envs/speedpipe.yaml", [])])
def test_conda_environments_mirror_pyproject_pins(env_file, own_package):
    """The user's environment (with the package) and the rules' environment (dependencies only) pin what pyproject does."""
    pins = re.findall(r'^    "([^"]+)",$', (REPO / "pyproject.toml").read_text(), re.M)
    assert pins and all("==" in p for p in pins), "every dependency is pinned exactly"
    env = yaml.safe_load((REPO / env_file).read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(pins + own_package)
    assert "torch==2.14.0" in pins and "torchvision==0.29.0" in pins


def test_public_api_imports():
    from speedpipe.config import load_config  # noqa: F401
    from speedpipe.diffusion import create_diffusion
    from speedpipe.diffusion.timesteps import build_sampler, build_weighting
    from speedpipe.models.dit import DiT, DiT_models  # noqa: F401

    d = create_diffusion(timestep_respacing="")
    assert build_sampler("uniform", d).sample(5).shape == (5,)
    assert build_weighting("none", d).shape == (1000,)


def test_top_level_layout():
    for entry in ("Snakefile", "workflow/rules", "workflow/report", "configs", "src/speedpipe", "results/README.md",
                  "slurm", "tests", "environment.yml", "main.py", "Makefile", ".ci/run"):
        assert (REPO / entry).exists(), entry
