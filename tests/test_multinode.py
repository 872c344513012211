"""Multi-task and multi-node SLURM jobs: every rank-aware stage (encode, reference, train, distill, sample) run as one
SLURM job of 1 node x 2 tasks and of 2 nodes x 1 task (gloo on CPU) gives the outputs of its one-process run, and its
records show every rank. Under `slurm/local-cluster/start.sh --nodes 2` (as .ci/run starts it) the two-node layout
crosses the cluster's bridge from one network namespace to another; on a one-node cluster it cannot be scheduled and
those cases are skipped.

Equal where the arithmetic allows: latents and samples bit for bit (each shard and each batch made by one rank as the
one process makes it). Where the ranks' results are reduced in another order: the reference statistics (feature sums
over two ranks' halves) and the trained weights (the gradient averaged by all-reduce instead of over one batch) within
TOLERANCE.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, events, require_nodes, require_slurm
from speedpipe.launch import launch_many
from speedpipe.workflow import Experiment

LAYOUTS = {"1x2": {"nodes": 1, "tasks_per_node": 2}, "2x1": {"nodes": 2, "tasks_per_node": 1}}
SLURM = {"executor": "slurm", "cpus_per_task": 1, "mem_gb": 2, "time_min": 10, "poll_seconds": 0.5,
         "collective_timeout_s": 120}
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def _experiment(output_dir) -> Experiment:
    pipe = yaml.safe_load((REPO / "tests/data/ranks.yaml").read_text())
    pipe["output_dir"] = str(output_dir)
    return Experiment(pipe, base_dir=REPO)


def _rank_aware_batch(exp: Experiment, checkpoints=None) -> list[tuple[str, dict]]:
    """encode, reference, the teacher's training, its sCD student and the sampling of both (the teacher's curve
    sampler, the student's one step), in the order they depend. checkpoints: the folder whose checkpoints are sampled
    (the one-process run's, so that the samples compare bit for bit where the weights compare within TOLERANCE).
    The student's samples are one batch: one rank samples nothing (as ranks beyond the batches of a large job do)."""
    teacher, student = exp.train_runs["speed-s0"], next(iter(exp.distill_runs.values()))
    samples = []
    for e in exp.evaluations():
        if e.step == 4 and (e.run, e.sampler) in ((teacher, exp.pipe["curve_sampler"]), (student, "scm1")):
            cfg = exp.stage_config("sample", evaluation=e)
            if e.run == student:
                cfg["sampling"]["batch_size"] = cfg["sampling"]["num_samples"]
            if checkpoints is not None:
                cfg["sampling"]["checkpoint"] = str(checkpoints / Path(cfg["sampling"]["checkpoint"]).relative_to(exp.layout.root))
            samples.append(("sample", cfg))
    assert len(samples) == 2
    return [("encode", exp.stage_config("encode")), ("reference", exp.stage_config("reference")),
            ("train", exp.stage_config("train", teacher)), ("distill", exp.stage_config("distill", student)), *samples]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The batch run in this process, after the stages that run in one process (autoencoder, classifier), on the one
    thread each task gets (cpus_per_task): a CPU kernel's reduction order depends on its thread count."""
    require_slurm()  # it is only compared with SLURM jobs
    root = tmp_path_factory.mktemp("one")
    exp = _experiment(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(SLURM["cpus_per_task"])
    try:
        launch_many([("autoencoder", exp.stage_config("autoencoder")), ("classifier", exp.stage_config("classifier"))])
        launch_many(_rank_aware_batch(exp))
    finally:
        torch.set_num_threads(threads)
    return root / "ranks"


def _tensors(path) -> dict:
    """Every tensor or array a file holds, by its key path (nested dicts and lists flattened)."""
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: torch.from_numpy(f[k]) for k in f.files}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    flat = {}

    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            flat[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}[{i}]")

    walk(torch.load(path, map_location="cpu", weights_only=False), "")
    return flat


OUTPUTS = {"latents": "*.safetensors", "reference": "*.pt", "train": "*/ckpt-*.pt", "distill": "*/ckpt-*.pt",
           "samples": "**/*.npz"}  # the declared files (a run's store keeps their data under its own identity)
EXACT = ("latents", "samples")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_aware_stages_give_their_one_process_outputs_on_every_layout(one_process, layout, tmp_path):
    nodes = LAYOUTS[layout]["nodes"]
    require_nodes(nodes)
    exp = _experiment(tmp_path)
    for stage in ("autoencoder", "classifier"):  # made by the one-process run: the same files for both
        shutil.copytree(one_process / stage, tmp_path / "ranks" / stage)
    log = []
    launch_many(_rank_aware_batch(exp, checkpoints=one_process), {**SLURM, **LAYOUTS[layout]}, log=log.append,
                usage=str(tmp_path / "usage.json"))

    for folder, pattern in OUTPUTS.items():
        expected, made = ([p.relative_to(root) for p in sorted((root / folder).glob(pattern)) if "store" not in p.parts]
                          for root in (one_process, tmp_path / "ranks"))
        assert expected and made == expected, folder
        for relative in expected:
            want, got = _tensors(one_process / relative), _tensors(tmp_path / "ranks" / relative)
            assert got.keys() == want.keys(), relative
            for key in want:
                if folder in EXACT or not want[key].is_floating_point():
                    assert torch.equal(got[key], want[key]), f"{relative} {key}"
                else:
                    torch.testing.assert_close(got[key], want[key], **TOLERANCE, msg=f"{relative} {key}")

    usage = json.loads((tmp_path / "usage.json").read_text())
    hosts = [r["host"] for r in usage["ranks"]]
    assert [r["rank"] for r in usage["ranks"]] == [0, 1] and usage["world_size"] == 2
    assert len(set(hosts)) == nodes and len({(r["host"], r["pid"]) for r in usage["ranks"]}) == 2
    assert [r["threads"] for r in usage["ranks"]] == [SLURM["cpus_per_task"]] * 2  # not a thread per core of the node
    for run in ("train/speed-s0", f"distill/{next(iter(exp.distill_runs))}"):
        ranks = [e["source"] for e in events(tmp_path / "ranks" / run) if e["event"] == "ranks"]
        assert len(ranks) == 1 and [r.split(":")[0] for r in ranks[0].split()] == [f"0@{hosts[0]}", f"1@{hosts[1]}"], run
    assert any(line.startswith("[slurm task 1] ") for line in log)


def test_a_snakemake_job_that_waits_on_slurm_does_not_import_torch(one_process, tmp_path, monkeypatch):
    """workflow/scripts/stage.py's run_job with a SLURM launcher, in a fresh interpreter as Snakemake starts it (after
    Snakemake's own process planned the job, validating its configs into .snakemake): the job runs on the cluster and
    the waiting process never imported torch (a profile with `cores: 64` keeps 64 of them on a login node)."""
    require_slurm()
    shutil.copytree(one_process / "classifier", tmp_path / "ranks" / "classifier")
    pipe = {**yaml.safe_load((REPO / "tests/data/ranks.yaml").read_text()), "output_dir": str(tmp_path),
            "launcher": {"reference": {k: v for k, v in SLURM.items() if k != "collective_timeout_s"}}}
    (tmp_path / ".snakemake").mkdir()
    monkeypatch.chdir(tmp_path)
    Experiment(pipe, base_dir=REPO).job_params("reference")  # Snakemake's planning
    code = f"""
import json, sys
from speedpipe.launch import run_job
from speedpipe.workflow import Experiment
run_job(Experiment({pipe!r}, base_dir={str(REPO)!r}), "reference", {{}}, 1, "usage.json")
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert json.loads((tmp_path / "usage.json").read_text())["slurm_job_id"]  # it ran as a SLURM job
    stats = next((one_process / "reference").glob("*.pt")).name
    for key, value in _tensors(one_process / "reference" / stats).items():
        torch.testing.assert_close(_tensors(tmp_path / "ranks/reference" / stats)[key], value)
