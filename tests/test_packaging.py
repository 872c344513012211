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


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](path), ![alt](path "title")
FENCED = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def markdown_links(text: str) -> list[str]:
    """The targets of the Markdown links and images of a page, code blocks and code spans left out."""
    return LINK.findall(CODE_SPAN.sub("", FENCED.sub("", text)))


def test_markdown_links_are_found_and_code_is_not_read_as_links():
    page = ("See [the demo](docs/demo.md#make-check) and ![fid](../results/demo/figures/fid.png \"FID\").\n"
            "`x[0](y)` is code, and so is\n```\n[a](b.md)\n```\n[web](https://example.org) [here](#citing)\n")
    assert markdown_links(page) == ["docs/demo.md#make-check", "../results/demo/figures/fid.png", "https://example.org", "#citing"]


def test_every_relative_link_in_the_docs_resolves():
    """Every relative link and image of the front door, the docs pages and the READMEs beside the code and results names
    a file or folder of the repository, from the page's own folder (a #fragment is stripped; web links and in-page
    anchors are not followed)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks/README.md", REPO / "tests/README.md",
             *sorted((REPO / "results").glob("*/README.md"))]
    broken, checked = [], 0
    for page in pages:
        if not page.is_file():
            continue
        for target in markdown_links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # https://, mailto: and other schemes; an anchor of the page itself
            path = target.split("#", 1)[0]
            checked += 1
            if path.startswith("/") or not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert checked, "no relative link found: the pages or the link pattern moved"
    assert not broken, "links that resolve to no file (relative to the page's folder):\n" + "\n".join(broken)
