"""Exact caching: a job re-runs only when something its stage reads changes (the stage registry, speedpipe.stages).

The dry runs below edit one setting of the finished micro experiment and compare the planned jobs with exactly the
jobs whose stage reads it and their downstream jobs.
"""
import ast
import contextlib
import dataclasses
import inspect
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, planned_jobs, snakemake
from speedpipe.config import load_config
from speedpipe.config_schema import Config
from speedpipe.stages import STAGES, UndeclaredRead
from speedpipe.workflow import EVALUATION_RULES


@contextlib.contextmanager
def edited(path, change):
    """The YAML file with change(data) applied, restored afterwards."""
    original = path.read_text()
    data = yaml.safe_load(original)
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


def setting(*keys_and_value):
    """change(data): data[k1][k2]... = value (sections created where missing)."""
    *keys, value = keys_and_value

    def change(data):
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return change


def override(stage, item):
    """change(experiment file): one more override of a stage."""
    return lambda pipe: pipe.setdefault("overrides", {}).setdefault(stage, []).append(item)


def groups(jobs) -> dict[str, set]:
    """The planned jobs by kind: data stages by name, train, distill, sample/evaluate of the diffusion models (their
    curves and the teachers' samplers: 'teacher') and of the students."""
    out = {}
    for job in jobs:
        rule = job.split("[")[0]
        if rule in EVALUATION_RULES:
            stage, evaluated = EVALUATION_RULES[rule]
            kind = f"{stage}:{'student' if evaluated == 'student' else 'teacher'}"
        else:
            kind = rule
        out.setdefault(kind, set()).add(job)
    return out


@pytest.fixture(scope="module")
def finished(micro_run):
    """The micro run's files and every job kind a full re-run would plan (from a dry run with --forceall)."""
    everything = planned_jobs(snakemake(micro_run, "-n", "--forceall", "--configfile", str(micro_run / "micro.yaml")).stdout)
    return micro_run, groups(everything)


TRAINED = ["train", "distill", "sample:teacher", "sample:student", "evaluate:teacher", "evaluate:student", "report"]
EVALUATED = ["evaluate:teacher", "evaluate:student", "report"]
CASES = {  # edit -> the job kinds it must re-plan, each entirely (and nothing else)
    "autoencoder.kl_weight (autoencoder)": ("base", setting("autoencoder", "kl_weight", 2.0e-6), ["autoencoder", "encode", *TRAINED]),
    "encode.shard_size (encode)": ("base", setting("encode", "shard_size", 512), ["encode", *TRAINED]),
    "eval.classifier_lr (classifier)": ("base", setting("eval", "classifier_lr", 2.0e-3), ["classifier", "reference", *EVALUATED]),
    "eval.reference_max_images (reference)": ("pipe", override("reference", "eval.reference_max_images=150"), ["reference", *EVALUATED]),
    "optim.lr (train)": ("base", setting("optim", "lr", 2.0e-3), TRAINED),
    "model.class_dropout_prob (model)": ("base", setting("model", "class_dropout_prob", 0.2), TRAINED),
    "diffusion.noise_schedule (diffusion)": ("base", setting("diffusion", "noise_schedule", "cosine"), TRAINED),
    "distill.tangent_c (distill)": ("base", setting("distill", "tangent_c", 0.2),
                                    ["distill", "sample:student", "evaluate:student", "report"]),
    "sampling.scm_mid_t (sample: the students' two-step sampler)": ("base", setting("sampling", "scm_mid_t", 1.0),
                                                                     ["sample:student", "evaluate:student", "report"]),
    "eval.metrics (evaluate: no sampling, no training)": ("base", setting("eval", "metrics", ["fid", "kid", "isc"]), EVALUATED),
    "a table's caption (report)": ("pipe", setting("tables", "k", "caption", "Another caption."), ["report"]),
    "a consistency method left out (the other's students stay)": ("pipe", setting("consistency_methods", ["scd"]), ["report"]),
    "launcher settings": ("pipe", setting("launcher", "train", {"executor": "local", "time_min": 5, "partition": "other"}), []),
    "progress flags": ("pipe", override("train", "trainer.progress=true"), []),
    "resume-checkpoint cadence": ("base", setting("trainer", "resume_every_steps", 3), []),
    "a key set to its default": ("base", setting("trainer", "compile", False), []),
}


@pytest.mark.parametrize("case", CASES)
def test_an_edit_replans_exactly_the_stages_that_read_it(finished, case):
    work, every = finished
    where, change, expected = CASES[case]
    with edited(work / ("micro.yaml" if where == "pipe" else "configs/mnist5k/base.yaml"), change):
        result = snakemake(work, "-n", "--configfile", str(work / "micro.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    planned = groups(planned_jobs(result.stdout))
    assert set(planned) == set(expected), (case, sorted(planned))
    for kind in expected:
        assert planned[kind] == every[kind], (case, kind, sorted(every[kind] - planned[kind]))


def test_ddim_eta_replans_the_jobs_with_a_ddim_sampler_and_no_other(finished):
    """A key only some samplers read (speedpipe.stages.SAMPLER_READS): the teacher's DDPM-only sampling jobs (its
    ddpm10 samplers, each a job of its own) and the students' are not planned again."""
    work, every = finished
    with edited(work / "configs/mnist5k/base.yaml", setting("sampling", "ddim_eta", 0.5)):
        result = snakemake(work, "-n", "--configfile", str(work / "micro.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    planned = groups(planned_jobs(result.stdout))
    ddpm_only = {job for job in every["sample:teacher"] if re.search(r"sampler=ddpm\d+(-cfg[\d.]+)?\]$", job)}
    assert len(ddpm_only) == 4, sorted(every["sample:teacher"])  # each of the two teachers' ddpm10 and ddpm10-cfg2
    assert set(planned) == {"sample:teacher", "evaluate:teacher", "report"}, sorted(planned)
    assert planned["sample:teacher"] == every["sample:teacher"] - ddpm_only

def test_job_params_hold_what_the_stage_reads_and_not_its_defaults():
    cfg = load_config(REPO / "configs/mnist5k/speed.yaml", ["trainer.steps=800"], phase="train")
    params = STAGES["train"].params(cfg)
    assert params["version"] == STAGES["train"].version
    reads = params["reads"]
    assert reads["diffusion.timestep_sampler.k"] == 5 and reads["trainer.steps"] == 800 and reads["optim.lr"] == 3e-3
    assert not any(k.startswith(("eval.", "sampling.", "distill.", "encode.")) for k in reads), reads  # other stages' keys
    assert "trainer.progress" not in reads and "trainer.resume_every_minutes" not in reads  # uses, not reads
    assert "trainer.compile" not in reads and "diffusion.timestep_sampler.p_mean" not in reads  # at their defaults
    compiled = load_config(REPO / "configs/mnist5k/speed.yaml", ["trainer.steps=800", "trainer.compile=true"], phase="train")
    assert STAGES["train"].params(compiled)["reads"]["trainer.compile"] is True


def test_every_declared_key_is_a_config_key():
    for stage in STAGES.values():
        if stage.config == "stage":
            stage.view(load_config(REPO / "configs/mnist5k/base.yaml"))  # raises KeyError naming an unknown declared key
            assert not set(stage.uses) & set(stage.reads), stage.name


def test_a_stage_reading_an_undeclared_key_fails(tiny_train_config, monkeypatch):
    """The train stage with optim.grad_clip missing from its registry entry stops at its first read, naming the key."""
    train = STAGES["train"]
    optim = [f"optim.{f.name}" for f in dataclasses.fields(Config.__dataclass_fields__["optim"].default_factory())]
    narrowed = tuple(k for k in train.reads if k != "optim") + tuple(k for k in optim if k != "optim.grad_clip")
    monkeypatch.setitem(STAGES, "train", dataclasses.replace(train, reads=narrowed))
    from speedpipe.stages import train as train_stage

    with pytest.raises(UndeclaredRead, match=r"stage 'train' read the config key 'optim.grad_clip', which its registry"):
        train_stage.run(load_config(tiny_train_config, ["trainer.steps=1"], phase="train"))


def _reads_in_source(module) -> set[str]:
    """Config keys a stage module reads as attribute chains of `cfg` (cfg.a.b, or x.b after x = cfg.a)."""
    tree = ast.parse(inspect.getsource(module))
    aliases = {"cfg": ""}

    def chain(node):
        names = []
        while isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        return (node.id, names[::-1]) if isinstance(node, ast.Name) else (None, [])

    for node in ast.walk(tree):  # x = cfg.section
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            root, names = chain(node.value)
            if root == "cfg" and names:
                aliases[node.targets[0].id] = ".".join(names)
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):  # every chain and its prefixes (a prefix is a section: checked loosely)
            root, names = chain(node)
            if root in aliases and names:
                keys.add(".".join(filter(None, [aliases[root], *names])))
    return keys


def _config_key(dotted: str, leaves: set[str], sections: set[str]) -> str | None:
    """The longest prefix of an attribute chain that is a config key or section (cfg.sampling.sampler.startswith ->
    sampling.sampler)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in leaves or prefix in sections:
            return prefix
    return None


def test_every_key_a_stage_module_reads_is_declared():
    """A static check of the stage modules (every branch, also the CUDA-only ones the CPU runs never take); the
    library functions they call are covered at run time by the view."""
    import importlib

    from omegaconf import OmegaConf

    from speedpipe.config import leaves

    plain = OmegaConf.to_container(OmegaConf.structured(Config))
    keys = set(leaves(plain))
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k} | {k.split(".")[0] for k in keys}
    for stage in STAGES.values():
        if stage.config != "stage":
            continue
        module = importlib.import_module(stage.module)
        declared = (*stage.reads, *stage.uses)
        for read in _reads_in_source(module):
            key = _config_key(read, keys, sections)
            if key is None:
                continue  # not a config attribute (e.g. a method of a value)
            covered = any(key == d or key.startswith(d + ".") or d.startswith(key + ".") for d in declared)
            assert covered, f"stage {stage.name!r} reads {key!r} ({read}), which its registry entry does not declare"


def test_an_experiment_reports_the_stage_config_values_it_replaces(tmp_path):
    from speedpipe.experiment_file import CONSISTENCY_KEYS
    from speedpipe.workflow import Experiment

    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "base.yaml"
    config.write_text((REPO / "configs/mnist5k/base.yaml").read_text().replace("trainer:\n", "trainer:\n  steps: 2000\n"))
    pipe = yaml.safe_load((REPO / "tests/data/micro.yaml").read_text())
    pipe.update(base_config=str(config), methods={"baseline": str(config)}, teachers=[], tables=None)
    for key in CONSISTENCY_KEYS | {"consistency_methods"}:
        pipe.pop(key)
    messages = Experiment(pipe).overridden_values()
    assert any(f"{config} sets trainer.steps: 2000, but the experiment (train_steps) sets 4" in m for m in messages), messages
    assert any("sets trainer.global_batch_size: 64, but the experiment file's overrides.train sets 8" in m for m in messages)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs/pipeline").glob("*.yaml")))
def test_shipped_experiments_replace_no_stage_config_value_and_lint_clean(name, tmp_path):
    from speedpipe.workflow import Experiment

    assert Experiment(yaml.safe_load((REPO / f"configs/pipeline/{name}.yaml").read_text()), base_dir=REPO).overridden_values() == []
    lint = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--lint", "--configfile", str(REPO / f"configs/pipeline/{name}.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0 and "Congratulations, your workflow is in a good condition!" in lint.stdout + lint.stderr, \
        (lint.stdout + lint.stderr)[-3000:]


def test_the_experiment_schema_documents_every_key():
    from speedpipe.experiment_schema import schema
    from speedpipe.experiment_file import CONSISTENCY_KEYS

    properties = schema()["properties"]
    for key, spec in properties.items():
        assert spec.get("description"), key
        assert key in schema()["required"] or "default" in spec or key in CONSISTENCY_KEYS | {"tables"}, key
    assert properties["overrides"]["propertyNames"]["enum"] == list(STAGES)
    assert properties["launcher"]["propertyNames"]["enum"] == ["default", *STAGES]


def test_every_job_logs_and_records_its_resources(micro_run):
    import json

    root = micro_run / "results" / "micro"
    usage = sorted((root / "logs").rglob("*.usage.json"))
    rules = {p.parent.name for p in usage}
    assert {"autoencoder", "encode", "classifier", "reference", "train", "distill"} <= rules
    assert set(EVALUATION_RULES) <= rules, rules
    for path in usage:
        record = json.loads(path.read_text())
        assert record["wall_s"] > 0 and record["cpu_s"] > 0 and record["peak_rss_mb"] > 100, (path, record)
        assert (path.parent / path.name.replace(".usage.json", ".log")).is_file(), path
        assert (root / "benchmarks" / path.parent.name / path.name.replace(".usage.json", ".tsv")).is_file(), path
    per_stage = (root / "tables/usage_per_stage.csv").read_text()
    assert all(stage in per_stage for stage in ("autoencoder", "train", "distill", "sample", "evaluate", "all")), per_stage


def test_a_failing_job_writes_its_error_to_its_log(tmp_path):
    """The stage's traceback goes to the job's log; the terminal keeps Snakemake's progress and names the log. (The
    experiment file's paths are relative to the repository, as in the demo's, which the job resolves itself.)"""
    pipe = yaml.safe_load((REPO / "tests/data/micro.yaml").read_text())
    (tmp_path / "broken.pth").write_bytes(b"")  # there (the checks before the run pass), but not a state dict
    pipe["extractor"] = "inception-v3-compat"
    for stage in ("reference", "evaluate"):
        pipe["overrides"][stage] = [f"eval.inception_weights={tmp_path / 'broken.pth'}"]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    result = snakemake(tmp_path, "results/micro/reference/stats-inception-v3-compat.pt", "--configfile", str(tmp_path / "exp.yaml"))
    assert result.returncode != 0
    log = (tmp_path / "results/micro/logs/reference/reference.log").read_text()
    assert "Traceback" in log and "broken.pth" in log, log[-2000:]
    assert "results/micro/logs/reference/reference.log" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr.split("Error in rule")[0]  # the terminal: Snakemake's progress


def test_a_key_added_to_the_code_at_its_default_changes_no_params(monkeypatch):
    """A config field added later (here: trainer.new_flag, default False) leaves every finished job's params as they
    were, so a new feature does not re-run an experiment that does not use it."""
    import speedpipe.config_schema as schema_module
    from speedpipe import stages
    from speedpipe.config_schema import TrainerConfig

    path = REPO / "configs/mnist5k/speed.yaml"
    before = STAGES["train"].params(load_config(path, ["trainer.steps=800"], phase="train"))
    trainer = dataclasses.make_dataclass("TrainerConfig", [("new_flag", bool, dataclasses.field(default=False))], bases=(TrainerConfig,))
    extended = dataclasses.make_dataclass("Config", [("trainer", trainer, dataclasses.field(default_factory=trainer))], bases=(Config,))
    monkeypatch.setattr(schema_module, "Config", extended)
    stages._default_leaves.cache_clear()
    try:
        cfg = load_config(path, ["trainer.steps=800"], phase="train", schema=extended)
        assert cfg.trainer.new_flag is False
        assert STAGES["train"].params(cfg) == before
        flagged = load_config(path, ["trainer.steps=800", "trainer.new_flag=true"], phase="train", schema=extended)
        assert STAGES["train"].params(flagged)["reads"]["trainer.new_flag"] is True  # set: a rerun trigger
    finally:
        stages._default_leaves.cache_clear()


def test_the_full_resolved_config_is_saved_beside_every_output(micro_run):
    """The provenance is the whole config the job resolved, not the part its stage reads."""
    import torch

    from speedpipe.workflow import Experiment

    root = micro_run / "results" / "micro"
    exp = Experiment(yaml.safe_load((micro_run / "micro.yaml").read_text()))
    expected = {"latents/config.yaml": exp.stage_config("encode"),
                "train/speed-s0/config.yaml": exp.stage_config("train", exp.train_runs["speed-s0"]),
                "distill/sct-speed-s0/config.yaml": exp.stage_config("distill", exp.distill_runs["sct-speed-s0"]),
                "samples/speed-s0/0000004/ddim5.yaml": exp.stage_config("sample", evaluation=next(
                    e for e in exp.evaluations() if e.run.name == "speed-s0" and e.step == 4 and e.sampler == "ddim5"))}
    for path, config in expected.items():
        assert yaml.safe_load((root / path).read_text()) == config, path
    assert torch.load(root / "train/speed-s0/ckpt-0000004.pt", weights_only=True)["config"] == expected["train/speed-s0/config.yaml"]


def test_no_override_moves_what_the_rules_pass_between_jobs(tmp_path):
    """The experiment's identity and the paths the rules connect (run folders, the latent store, the reference, the
    pipeline's classifier and autoencoder) are set last in every job: a stage override cannot move them, and a value a
    config file sets for them is reported."""
    from speedpipe.workflow import Experiment

    pipe = yaml.safe_load((REPO / "tests/data/micro.yaml").read_text())
    pipe["overrides"]["train"] += [f"output_dir={tmp_path}", "trainer.run_dir=/elsewhere", "data.latents_dir=/elsewhere",
                                   "eval.extractor=inception-v3-compat"]
    pipe["overrides"]["evaluate"] += ["eval.reference=/elsewhere.pt"]
    exp = Experiment(pipe, base_dir=REPO)
    train = exp.stage_config("train", exp.train_runs["speed-s0"])
    assert (train["output_dir"], train["eval"]["extractor"]) == ("results", "classifier")
    assert train["trainer"]["run_dir"] == str(exp.train_runs["speed-s0"].dir) and train["data"]["latents_dir"] == "results/micro/latents"
    evaluate = exp.stage_config("evaluate", evaluation=exp.evaluations()[0])
    assert evaluate["eval"]["reference"] == "results/micro/reference/stats-classifier.pt"
    assert evaluate["eval"]["classifier_weights"] == "results/micro/classifier/model.safetensors"
    sample = exp.stage_config("sample", evaluation=exp.evaluations()[0])
    assert sample["autoencoder"]["path"] == "results/micro/autoencoder/model.safetensors"  # the pipeline's tiny autoencoder


def test_the_planners_config_cache_is_keyed_on_speedpipes_code(tmp_path, monkeypatch):
    """Snakemake's planning remembers each validated config on disk; an edit of any speedpipe module (a sampler's
    parameter check, the DiT's model names) must validate again, not return an earlier "valid"."""
    import shutil

    from speedpipe import planning_cache

    package = REPO / "src" / "speedpipe"
    copy = tmp_path / "speedpipe"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert planning_cache.source_digest(copy) == planning_cache.source_digest(package)
    timesteps = copy / "diffusion" / "timesteps.py"
    timesteps.write_text(timesteps.read_text().replace("must be positive", "must be above zero"))
    planning_cache.source_digest.cache_clear()  # (one planning process sees one version of the code)
    assert planning_cache.source_digest(copy) != planning_cache.source_digest(package)

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".snakemake").mkdir()
    config = str(REPO / "configs/mnist5k/speed.yaml")
    planning_cache.validated(config, (), "train")
    assert len(list((tmp_path / ".snakemake/speedpipe-configs").iterdir())) == 1
    planning_cache.validated.cache_clear()
    monkeypatch.setattr(planning_cache, "source_digest", lambda: "the code after an edit")
    planning_cache.validated(config, (), "train")
    assert len(list((tmp_path / ".snakemake/speedpipe-configs").iterdir())) == 2
    planning_cache.validated.cache_clear()
