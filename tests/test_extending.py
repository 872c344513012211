"""What an addition costs: each test copies the package, adds exactly one file to the copy and runs the stages that use it
through the command line (README, "Extending"). Nothing else of the copy is edited, so a registry, schema or rule that
names the methods one by one fails here."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

TIMESTEP_METHOD = '''"""p_t ∝ (t + 1)^power, and a weighting of 1/2 before `start`: a test's methods, which record what they were built with
and what they drew (PLUGIN_RECORD)."""
import json
import os

import numpy as np
import torch

from speedpipe.diffusion.timesteps import TimestepSampler


def _record(**values):
    with open(os.environ["PLUGIN_RECORD"], "a") as f:
        f.write(json.dumps(values) + "\\n")


class LateSampler(TimestepSampler):
    def __init__(self, diffusion, power: float):
        probs = (np.arange(diffusion.num_timesteps) + 1.0) ** power
        super().__init__(probs / probs.sum())
        self.power = power

    def sample(self, n, generator=None, step=None):
        t = super().sample(n, generator, step)
        _record(power=self.power, t=t.tolist())
        return t


def half_before(diffusion, start: int):
    _record(start=start)
    return torch.as_tensor(np.where(np.arange(diffusion.num_timesteps) < start, 0.5, 1.0), dtype=torch.float32)


SAMPLERS = {"late": LateSampler}
WEIGHTINGS = {"half_before": half_before}
'''

CONSISTENCY_METHOD = '''"""sCT with its tangent normalisation constant as a setting of its own (distill.sct_wide.c): a test's method."""
from speedpipe.consistency.methods import ConsistencyMethod
from speedpipe.consistency.methods.sct import SCTLoss

SETTINGS = {"c": 1.0}

METHOD = ConsistencyMethod(
    name="sct_wide", title="sCT (wide c)", follows="the data's velocity of the pair that made x_t", teacher_velocity=False,
    objective=lambda teacher, d: SCTLoss(d.tangent_warmup, d.sct_wide.c, d.precision))
'''

IMAGE_SOURCE = '''"""Stripes of `period` pixels, horizontal (class 0) or vertical (class 1): a test's image source."""
import torch

SETTINGS = {"count": 40, "period": 4}


class Stripes(torch.utils.data.Dataset):
    num_classes = 2

    def __init__(self, size, count, period):
        self.size, self.count, self.period = size, count, period

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        ramp = (torch.arange(self.size) // self.period % 2).float() * 2 - 1
        image = ramp[:, None].expand(self.size, self.size) if i % 2 == 0 else ramp[None, :].expand(self.size, self.size)
        return image.expand(3, -1, -1).contiguous(), i % 2

    def fingerprint(self):
        return f"stripes-{self.size}-{self.count}-{self.period}"


def open_dataset(data):
    return Stripes(data.image_size, data.stripes.count, data.stripes.period)
'''

STAGE_MODULE = '''"""Stage label_counts: how many latents of each class the latent store holds (a test's stage)."""
import json

import torch

from speedpipe.data.latents import LatentStore
from speedpipe.io import atomic_write_text
from speedpipe.layout import Layout
from speedpipe.stages import STAGES

STAGE = {"version": 1, "reads": ["experiment", "output_dir", "data.latents_dir", "label_counts.classes"],
         "given": ["data.latents_dir"]}
SETTINGS = {"classes": 10}


@STAGES["label_counts"].entry
def run(cfg, provenance):
    store = LatentStore(cfg.data.latents_dir)
    _, labels = store.get_batch(torch.arange(len(store)), torch.zeros(len(store), dtype=torch.bool))
    counts = torch.bincount(labels, minlength=cfg.label_counts.classes).tolist()
    atomic_write_text(Layout.of(cfg).root / "label_counts.json", json.dumps(counts))
'''

STAGE_RULES = '''rule label_counts:
    input:
        str(DATA.latents_dir() / "manifest.json"),
    output:
        counts=str(LAYOUT.root / "label_counts.json"),
        usage=str(LAYOUT.job_usage("label_counts")),
    log:
        str(LAYOUT.job_log("label_counts")),
    params:
        stages=lambda wc: EXP.job_params("label_counts"),
    threads: 1
    script:
        "../../scripts/stage.py"
'''


@pytest.fixture
def package_copy(tmp_path):
    """A copy of src/speedpipe that a test adds one file to; `run(*args)` runs `python *args` on it."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src/speedpipe", src / "speedpipe", ignore=shutil.ignore_patterns("__pycache__"))
    record = tmp_path / "record.jsonl"

    def run(*args):
        env = {**os.environ, "PYTHONPATH": str(src), "PLUGIN_RECORD": str(record), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)

    def records():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    return src / "speedpipe", run, records


def test_a_timestep_method_is_one_file(package_copy, tiny_train_config, tmp_path):
    """A sampler and a weighting with parameters of their own, in diffusion/timestep_methods/late.py: the config takes
    their parameters (a misspelt one is refused, named), the train stage builds them from the config and trains on
    their draws, and the train job's params carry the new keys (an edit re-runs the job)."""
    package, run, records = package_copy  # run: python on the copy
    (package / "diffusion/timestep_methods/late.py").write_text(TIMESTEP_METHOD)
    methods = ["diffusion.timestep_sampler={name: late, power: 3.0}", "diffusion.loss_weighting={name: half_before, start: 300}"]
    common = ["-c", str(tiny_train_config), "trainer.steps=2", "trainer.ckpt_every=2", f"trainer.run_dir={tmp_path / 'run'}"]

    refused = run("-m", "speedpipe.cli", "train", *common, "diffusion.timestep_sampler={name: late, powr: 3.0}")
    assert refused.returncode != 0 and "diffusion.timestep_sampler.powr" in refused.stderr, refused.stderr[-2000:]
    assert not records() and not (tmp_path / "run").exists()  # refused before anything was built or written

    result = run("-m", "speedpipe.cli", "train", *common, *methods)
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = [r for r in records() if "power" in r]
    assert {r["power"] for r in drawn} == {3.0} and len(drawn) == 2  # one draw per training step
    assert sum(sum(r["t"]) for r in drawn) / sum(len(r["t"]) for r in drawn) > 600  # E[t] = 0.75 T under t^3
    assert {r["start"] for r in records() if "start" in r} == {300}  # built by the config check and by the stage
    assert (tmp_path / "run/ckpt-0000002.pt").is_file()

    params = run("-c", "import json, sys; from speedpipe.config import load_config; from speedpipe.stages import STAGES; "
                 "print(json.dumps(STAGES['train'].params(load_config(sys.argv[1], sys.argv[2:], phase='train'))))",
                 str(tiny_train_config), *methods)
    reads = json.loads(params.stdout)["reads"]
    assert reads["diffusion.timestep_sampler.power"] == 3.0 and reads["diffusion.loss_weighting.start"] == 300, params.stderr


def test_a_consistency_method_is_one_file(package_copy, tiny_train_config, tmp_path):
    """consistency/methods/sct_wide.py, with a setting of its own: the config takes distill.sct_wide.c (a misspelt key is
    refused, named), the distill stage trains the method by name (here without a teacher) with the setting's value, only
    its jobs' params carry it, and the sample stage draws from its checkpoint in one step."""
    package, run, _ = package_copy
    (package / "consistency/methods/sct_wide.py").write_text(CONSISTENCY_METHOD)
    settings = ["-c", str(tiny_train_config), "distill.method=sct_wide", "distill.warm_start_target=data", "distill.warm_start_steps=2",
                "distill.steps=2", "distill.global_batch_size=8", "distill.log_every=1", "distill.ckpt_every=2",
                "distill.device=cpu", "distill.progress=false"]

    def trained(name, *extra):
        result = run("-m", "speedpipe.cli", "distill", *settings, f"distill.run_dir={tmp_path / name}", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        log = [row.split(",") for row in (tmp_path / name / "log.csv").read_text().splitlines()]
        objective, loss = log[0].index("objective"), log[0].index("loss")
        return [(row[objective], float(row[loss])) for row in log[1:]]

    refused = run("-m", "speedpipe.cli", "distill", *settings, "distill.sct_wide.cc=2.0", f"distill.run_dir={tmp_path / 'refused'}")
    assert refused.returncode != 0 and "distill.sct_wide.cc" in refused.stderr, refused.stderr[-2000:]
    default, wide = trained("student"), trained("wide", "distill.sct_wide.c=4.0")
    assert [o for o, _ in default] == ["warm_start"] * 2 + ["sct_wide"] * 2
    assert default[:2] == wide[:2] and default[2][1] != wide[2][1]  # the same warm start; the method's loss reads c

    params = run("-c", "import json, sys; from speedpipe.config import load_config; from speedpipe.stages import STAGES; "
                 "print(json.dumps([STAGES['distill'].params(load_config(sys.argv[1], [*sys.argv[2:], f'distill.method={m}'], "
                 "phase='train'))['reads'] for m in ('sct_wide', 'sct')]))", str(tiny_train_config), "distill.sct_wide.c=4.0")
    own, other = json.loads(params.stdout)
    assert own["distill.sct_wide.c"] == 4.0 and "distill.sct_wide.c" not in other, params.stderr

    from diffusers import AutoencoderKL

    from speedpipe.models.autoencoder import save_tiny_autoencoder, tiny_autoencoder_config

    save_tiny_autoencoder(AutoencoderKL(**tiny_autoencoder_config([8, 8], 4)), 0.7, tmp_path / "vae.safetensors")
    sample = run("-m", "speedpipe.cli", "sample", "-c", str(tiny_train_config), f"sampling.checkpoint={tmp_path / 'student/ckpt-0000004.pt'}",
                 "autoencoder.name=tiny", f"autoencoder.path={tmp_path / 'vae.safetensors'}",
                 "sampling.sampler=scm1", "sampling.num_samples=4", "sampling.batch_size=4", "sampling.device=cpu",
                 f"sampling.out={tmp_path / 'one.npz'}", "sampling.progress=false")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert json.loads((tmp_path / "one.json").read_text())["nfe_per_image"] == 1


def test_an_image_source_is_one_file(package_copy, tiny_train_config, tmp_path):
    """data/sources/stripes.py, with settings of its own: data.name selects it, the config takes data.stripes.* (a
    misspelt key is refused, named), a data stage (the classifier) trains on its images, the checks before a run count
    them, and only the data stages of an experiment on that source carry its settings in their params."""
    package, run, _ = package_copy
    (package / "data/sources/stripes.py").write_text(IMAGE_SOURCE)
    settings = ["-c", str(tiny_train_config), "data.name=stripes", "data.stripes.count=60", "eval.classifier_steps=3",
                "eval.classifier_batch_size=8"]

    refused = run("-m", "speedpipe.cli", "classifier", *settings, "data.stripes.cuont=10")
    assert refused.returncode != 0 and "data.stripes.cuont" in refused.stderr, refused.stderr[-2000:]
    result = run("-m", "speedpipe.cli", "classifier", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "results/tiny/classifier/metrics.json").read_text())
    assert metrics["heldout_images"] == 6 and metrics["steps"] == 3  # every tenth of the 60 images held out

    checked = run("-c", "import json, sys; from speedpipe.config import load_config, to_plain; from speedpipe.stages import STAGES; "
                  "from speedpipe.preflight import _dataset_size; "
                  "cfgs = [load_config(sys.argv[1], [*sys.argv[2:], f'data.name={n}'], phase=None) for n in ('stripes', 'mnist5k')]; "
                  "print(json.dumps([[STAGES['classifier'].params(c)['reads'] for c in cfgs], _dataset_size(to_plain(cfgs[0]), [])]))",
                  str(tiny_train_config), "data.stripes.count=60")
    (own, other), size = json.loads(checked.stdout)
    assert own["data.stripes.count"] == 60 and "data.stripes.count" not in other and size == 60, checked.stderr[-2000:]


def test_a_stage_is_two_files(tmp_path):
    """stages/label_counts.py (its registry entry and settings as literals, its run) and its rule,
    workflow/rules/stages/label_counts.smk, in a copy of the repository: Snakemake plans it into every experiment (the
    report waits on its usage record), runs it after the latent store with its config section's value, and an edit of
    that value re-plans it and nothing before it."""
    from conftest import planned_jobs

    repo = tmp_path / "repo"
    for part in ("workflow", "src", "configs", "profiles"):
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "Snakefile", repo / "Snakefile")
    (repo / "src/speedpipe/stages/label_counts.py").write_text(STAGE_MODULE)
    (repo / "workflow/rules/stages").mkdir()
    (repo / "workflow/rules/stages/label_counts.smk").write_text(STAGE_RULES)
    micro = (REPO / "tests/data/micro.yaml").read_text().replace("configs/mnist5k/", f"{repo}/configs/mnist5k/")
    (tmp_path / "micro.yaml").write_text(micro)
    base = repo / "configs/mnist5k/base.yaml"
    base.write_text(base.read_text() + "label_counts: {classes: 12}\n")

    def snakemake(*args):
        return subprocess.run([sys.executable, "-m", "snakemake", *args, "-s", str(repo / "Snakefile"), "--directory",
                               str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "micro.yaml")], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"})

    counts = tmp_path / "results/micro/label_counts.json"
    planned = planned_jobs(snakemake("-n").stdout)
    assert "label_counts" in planned and "report" in planned  # a job of the experiment, before its report
    result = snakemake("results/micro/label_counts.json")
    assert result.returncode == 0, result.stderr[-3000:]
    by_class = json.loads(counts.read_text())
    assert len(by_class) == 12 and by_class[10:] == [0, 0] and sum(by_class) == 5000  # mnist5k's digits, in 12 bins
    assert (tmp_path / "results/micro/logs/label_counts/label_counts.usage.json").is_file()
    base.write_text(base.read_text().replace("classes: 12", "classes: 11"))
    assert planned_jobs(snakemake("-n", "results/micro/label_counts.json").stdout) == ["label_counts"]
