import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

from conftest import REPO, SNAKEMAKE, planned_jobs, slurm, snakemake


def stage_of(job: str) -> str:
    """The stage a planned job runs: its rule, or the stage of a sampling or evaluation rule."""
    from speedpipe.workflow import EVALUATION_RULES

    rule = job.split("[")[0]
    return EVALUATION_RULES[rule][0] if rule in EVALUATION_RULES else rule


@pytest.mark.parametrize("pipeline,expected", [
    # 6 curve jobs, the teacher's 6 samplers one job each, 1 student job
    ("configs/pipeline/demo.yaml", {"train": 6, "distill": 1, "report": 1, "autoencoder": 1, "classifier": 1, "sample": 13,
                                    "evaluate": 13}),
    # the curve sampler is also a teacher sampler: the curve's final point, not a job of the teacher's
    ("configs/pipeline/imagenet_256.yaml", {"train": 2, "distill": 1, "report": 1, "autoencoder": 0, "classifier": 0, "sample": 7,
                                            "evaluate": 7}),
    # 3 teachers x (sCD, sCT); per teacher its curve job and its 5 samplers' jobs; 6 student jobs
    ("configs/pipeline/consistency_mnist.yaml", {"train": 3, "distill": 6, "report": 1, "autoencoder": 1, "classifier": 1,
                                                 "sample": 24, "evaluate": 24}),
    # 16 methods x 1 seed: one curve-evaluation job per run, no sCD
    ("configs/pipeline/ablation_mnist.yaml", {"train": 16, "distill": 0, "report": 1, "autoencoder": 1, "sample": 16,
                                              "evaluate": 16}),
    ("configs/pipeline/ffhq_256.yaml", {"train": 2, "distill": 0, "report": 1, "autoencoder": 0, "classifier": 0, "evaluate": 2}),
    ("configs/pipeline/metfaces_256.yaml", {"train": 2, "distill": 0, "report": 1, "autoencoder": 0, "classifier": 0, "evaluate": 2}),
])
def test_dry_run_dag(tmp_path, pipeline, expected):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / pipeline))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    for rule, count in expected.items():
        assert sum(stage_of(j) == rule for j in jobs) == count, (rule, jobs)


@pytest.mark.parametrize("pipeline", ["configs/pipeline/demo.yaml", "configs/pipeline/fewstep_mnist.yaml"])
def test_every_rule_is_written_out(tmp_path, pipeline):
    """No rule is made in a loop or named at run time: the rules Snakemake knows are those the Snakefile and the rule
    files write out (`rule NAME:` or `use rule ... as NAME with:`), whatever the experiment."""
    written = []
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow/rules").rglob("*.smk"))]:
        written += ["".join(names) for names in re.findall(r"^(?:rule (\w+):|use rule \w+ as (\w+) with:)", path.read_text(), re.M)]
    result = snakemake(tmp_path, "--list-rules", "--configfile", str(REPO / pipeline))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(result.stdout.split()) == sorted(written), result.stdout


def test_image_folder_experiments_use_the_papers_settings(tmp_path):
    """FFHQ (k = 2) and MetFaces (k = 5): SpeeD's per-dataset k, 50K iterations, Inception features, unconditional."""
    from speedpipe.workflow import Experiment

    for name, k in (("ffhq_256", 2), ("metfaces_256", 5)):
        exp = Experiment(yaml.safe_load((REPO / f"configs/pipeline/{name}.yaml").read_text()), base_dir=REPO)
        speed = exp.stage_config("train", exp.train_runs["speed-s0"])
        sampler, weighting = speed["diffusion"]["timestep_sampler"], speed["diffusion"]["loss_weighting"]
        assert {key: sampler[key] for key in ("name", "k", "tau", "dual")} == {"name": "speed", "k": k, "tau": 700, "dual": True}
        assert {key: weighting[key] for key in ("name", "lam", "tau")} == {"name": "speed", "lam": 0.6, "tau": 700}
        assert all(v is None for k, v in sampler.items() if k not in ("name", "k", "tau", "dual"))  # no other method's
        assert all(v is None for k, v in weighting.items() if k not in ("name", "lam", "tau"))
        assert exp.pipe["train_steps"] == 50000 and speed["optim"]["lr"] == 1e-4 and speed["trainer"]["global_batch_size"] == 256
        assert speed["model"]["name"] == "DiT-XL/2" and speed["model"]["num_classes"] == 1
        assert speed["data"]["name"] == "image_folder" and speed["eval"]["extractor"] == "inception-v3-compat"
        assert exp.stage_config("train", exp.train_runs["baseline-s0"])["diffusion"]["timestep_sampler"]["name"] == "uniform"


def test_bad_experiment_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "tests/data/micro.yaml").read_text().replace("seeds:", "seedz:"))
    result = snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert result.returncode != 0 and "unknown key 'seedz'" in result.stderr + result.stdout


def test_micro_run_writes_tables_and_figures(micro_run):
    root = micro_run / "results" / "micro"
    for table in ("components", "k"):  # the experiment file's two named tables
        for name in (f"tables/{table}.md", f"tables/{table}.csv", f"tables/{table}_speedup.csv", f"tables/{table}.tex",
                     f"figures/{table}.png", f"figures/{table}.pdf"):
            assert (root / name).stat().st_size > 0, name
    for name in ("tables/metrics.md", "tables/scm.md", "figures/training_loss.png", "figures/timestep_methods.png",
                 "figures/samples_per_method.png", "figures/teacher_vs_scm.png", "figures/teacher_grid.png",
                 "figures/distillation.png", "README.md"):
        assert (root / name).stat().st_size > 0, name
    scm = (root / "tables/scm.md").read_text()
    assert "scm1" in scm and "scm2" in scm and "ddpm10-cfg2" in scm and "label acc." in scm
    readme = (root / "README.md").read_text()
    assert "torch-fidelity" in readme and "### Table `components`" in readme and "### Table `k`" in readme
    assert "Suppression factor k." in (root / "tables/k.md").read_text() and "Speed-up against `speed`" in (root / "tables/k.md").read_text()
    assert "label acc." in (root / "tables/components.md").read_text() and "\\begin{tabular}" in (root / "tables/k.tex").read_text()


def test_micro_run_metrics_are_finite_and_the_tables_hold_them(micro_run):
    import json

    import pandas as pd

    root = micro_run / "results" / "micro"
    files = sorted((root / "metrics").rglob("*.json"))
    assert len(files) == 10 + 2 * (4 + 2 * 4)  # 5 runs x 2 steps; per teacher 4 samplers, its 2 students' 2 checkpoints x 2 samplers
    metrics = {}
    for f in files:
        m = json.loads(f.read_text())["metrics"]
        assert all(np.isfinite(v) for v in m.values()), (f, m)
        assert m["frechet_inception_distance"] >= 0 and 0 <= m["label_accuracy"] <= 1, (f, m)
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1, (f, m)
        run, step = f.relative_to(root / "metrics").parts[:2]
        metrics[(run, int(step), f.stem)] = m
    for table, methods, steps in (("components", ["baseline", "speed", "min_snr"], [2, 4]),
                                  ("k", ["speed_k-k1", "speed", "speed_k-k10"], [4])):
        rows = pd.read_csv(root / f"tables/{table}.csv")
        assert list(rows.method) == [m for m in methods for _ in steps] and list(rows.step) == steps * len(methods), rows
        for _, row in rows.iterrows():
            m = metrics[(f"{row.method}-s0", row.step, "ddim5")]
            assert float(row.FID) == pytest.approx(m["frechet_inception_distance"], abs=0.005), row
            assert float(row["label acc."]) == pytest.approx(m["label_accuracy"], abs=0.005), row
        speedup = pd.read_csv(root / f"tables/{table}_speedup.csv").set_index("method")
        reference = methods[0] if table == "components" else "speed"
        assert speedup.loc[reference, "speed-up"] == 1.0 and list(speedup.index) == methods
        target = metrics[(f"{reference}-s0", 4, "ddim5")]["frechet_inception_distance"]
        for method in methods:
            curve = [metrics[(f"{method}-s0", s, "ddim5")]["frechet_inception_distance"] for s in (2, 4)]
            assert float(speedup.loc[method, "final FID"]) == pytest.approx(curve[1], abs=0.005)
            if method != reference:  # reached at 2 when the curve starts below the target, else interpolated, else never
                expected = 2.0 if curve[0] <= target else (2 + 2 * (curve[0] - target) / (curve[0] - curve[1]) if curve[1] <= target else None)
                got, speed = speedup.loc[method, "iterations to reach it"], speedup.loc[method, "speed-up"]
                assert (pd.isna(got) if expected is None else got == round(expected)), (table, method, got, expected)
                assert (pd.isna(speed) if expected is None else speed == round(4 / expected, 2)), (table, method, speed)
    scm = pd.read_csv(root / "tables/scm.csv")
    assert list(scm.teacher) == ["speed-s0"] * 12 + ["baseline-s0"] * 12  # 4 teacher rows, 2 methods x 2 steps x 2 samplers
    assert {m.split(" student")[0] for m in scm.model if m != "teacher"} == {"sCD", "sCT"}
    for _, row in scm.iterrows():
        method = {"sCD": "scd", "sCT": "sct"}.get(row.model.split(" student")[0])
        run = row.teacher if row.model == "teacher" else f"{method}-{row.teacher}"
        m = metrics[(run, int(row.step), row.sampler)]
        assert row.FID == pytest.approx(m["frechet_inception_distance"], abs=5e-4)
        assert row["label acc."] == pytest.approx(m["label_accuracy"], abs=5e-4)


def test_nothing_to_do_after_a_complete_run(micro_run):
    result = snakemake(micro_run, "-n", "--configfile", str(micro_run / "micro.yaml"))
    assert result.returncode == 0 and planned_jobs(result.stdout) == [], result.stdout[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_a_speed_parameter_reruns_only_the_speed_branch(micro_run):
    speed = micro_run / "configs/mnist5k/speed.yaml"
    original = speed.read_text()
    speed.write_text(original.replace("k: 5", "k: 10"))
    try:
        result = snakemake(micro_run, "-n", "--configfile", str(micro_run / "micro.yaml"))
    finally:
        speed.write_text(original)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    assert "train[run=speed-s0]" in jobs and "distill[student=scd-speed-s0]" in jobs and "distill[student=sct-speed-s0]" in jobs and "report" in jobs
    # the k grid's runs set k themselves: their resolved configs did not change, so they are not re-run
    assert not [j for j in jobs if "baseline" in j or "min_snr" in j or "speed_k" in j], jobs
    assert not {j.split("[")[0] for j in jobs} & {"autoencoder", "encode", "classifier", "reference"}
    assert all(("speed" in j) or j == "report" for j in jobs), jobs


def test_snakemake_report_builds_html(micro_run):
    result = snakemake(micro_run, "--configfile", str(micro_run / "micro.yaml"), "--report", str(micro_run / "report.html"))
    assert result.returncode == 0, result.stderr[-3000:]
    html = (micro_run / "report.html").read_text()
    assert len(html) > 10_000
    assert '"labels": {"table": "k", "caption": "Suppression factor k."}' in html  # a named table's own caption, as its label


@slurm
def test_micro_run_on_slurm_survives_a_killed_snakemake(tmp_path, micro_run):
    """Training, sampling and evaluation as SLURM jobs, on the micro experiment's data (data_from); Snakemake is killed
    while a training job runs, and the re-run re-attaches to it."""
    shutil.copytree(micro_run / "results/micro", tmp_path / "results/micro", symlinks=True)
    pipeline = micro_experiment(
        experiment="on_slurm", data_from="micro",
        methods={m: str(REPO / f"configs/mnist5k/{m}.yaml") for m in ("baseline", "speed")}, train_steps=1000, eval_steps=[500, 1000],
        launcher={"default": {"executor": "slurm", "cpus_per_task": 1, "mem_gb": 1, "time_min": 10, "poll_seconds": 0.5,
                              "folder": str(tmp_path / "slurm")}, "report": {"executor": "local"}})
    for key in ("tables", "teachers", "consistency_methods", "teacher_sampler", "teacher_ode_sampler", "teacher_baselines",
                "scm_samplers", "final_samples", "distill_warm_start", "distill_steps", "distill_eval_steps"):
        del pipeline[key]  # no students: a distill job on SLURM is faulted in tests/test_faults.py
    (tmp_path / "micro.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    cmd = [*SNAKEMAKE, "--directory", str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "micro.yaml")]
    log = tmp_path / "first.log"
    first = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and not running:
        out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout.split("\n")
        running = [line.split()[0] for line in out if "speedpipe-train-" in line and line.endswith("RUNNING")]
        time.sleep(0.5)
    assert running, f"no training job started: {log.read_text()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)  # Snakemake and its job processes die; the SLURM job runs on
    first.wait()

    assert snakemake(tmp_path, "--unlock", "--configfile", str(tmp_path / "micro.yaml")).returncode == 0
    # SLURM jobs use no local cores: start every ready job at once, so the re-run reaches the training job while it runs
    second = snakemake(tmp_path, "--configfile", str(tmp_path / "micro.yaml"), "--rerun-incomplete", cores=8)
    assert second.returncode == 0, second.stderr[-5000:]
    train_logs = "".join(p.read_text() for p in (tmp_path / "results/on_slurm/logs/train").glob("*.log"))  # the launcher's messages
    assert f"re-attaching to SLURM job {running[0]}" in train_logs
    assert (tmp_path / "results/on_slurm/README.md").exists()
    submitted_trains = {p.name for p in (tmp_path / "slurm").glob("train-*")}
    assert len(submitted_trains) == 2  # one job folder per training run: nothing was submitted twice
    assert len(list((tmp_path / "slurm").glob("train-*/*_submitted.pkl"))) == 2


def micro_experiment(**changes) -> dict:
    """tests/data/micro.yaml with its config paths made absolute and the given top-level keys replaced."""
    pipe = yaml.safe_load((REPO / "tests/data/micro.yaml").read_text())
    pipe["base_config"] = str(REPO / pipe["base_config"])
    pipe["methods"] = {m: (str(REPO / spec) if isinstance(spec, str) else {**spec, "config": str(REPO / spec["config"])})
                       for m, spec in pipe["methods"].items()}
    return {**pipe, **changes}


def test_an_experiment_file_plans_only_its_own_methods(tmp_path):
    """The demo's experiment file is the default only when none is given: it is not merged into the user's."""
    own = micro_experiment(methods={"plain": str(REPO / "configs/mnist5k/baseline.yaml"), "speed": str(REPO / "configs/mnist5k/speed.yaml")},
                           teachers=["speed-s0"])
    del own["tables"]
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(own, sort_keys=False))
    result = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "own.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    trains = sorted(j for j in planned_jobs(result.stdout) if j.startswith("train["))
    assert trains == ["train[run=plain-s0]", "train[run=speed-s0]"], trains


def test_a_sweep_expands_to_the_expected_jobs(tmp_path):
    """A grid (2 x 2 values) and named variants become one method each, with their overrides in the train config; the
    dry run plans exactly their train runs (x 2 seeds) and one curve-evaluation job per run."""
    from speedpipe.experiment_file import CONSISTENCY_KEYS
    from speedpipe.workflow import Experiment

    speed = str(REPO / "configs/mnist5k/speed.yaml")
    pipe = micro_experiment(seeds=[0, 1], teachers=[], tables={"grid": {"methods": ["g-k1-lam0.5", "g-k10-lam0.8"], "reference": "g-k1-lam0.5"}}, methods={
        "g": {"config": speed, "grid": {"diffusion.timestep_sampler.k": [1, 10], "diffusion.loss_weighting.lam": [0.5, 0.8]}},
        "tau": {"config": speed, "variants": {"t500": ["diffusion.timestep_sampler.tau=500", "diffusion.loss_weighting.tau=500"]}}})
    for key in CONSISTENCY_KEYS | {"consistency_methods"}:
        del pipe[key]
    exp = Experiment(pipe)
    assert list(exp.methods) == ["g-k1-lam0.5", "g-k1-lam0.8", "g-k10-lam0.5", "g-k10-lam0.8", "tau-t500"]
    cfg = exp.stage_config("train", exp.train_runs["g-k10-lam0.5-s1"])
    assert (cfg["seed"], cfg["method"]) == (1, "g-k10-lam0.5")
    assert cfg["diffusion"]["timestep_sampler"]["k"] == 10 and cfg["diffusion"]["loss_weighting"]["lam"] == 0.5
    tau = exp.stage_config("train", exp.train_runs["tau-t500-s0"])["diffusion"]
    assert tau["timestep_sampler"]["tau"] == 500 and tau["loss_weighting"]["tau"] == 500 and tau["timestep_sampler"]["k"] == 5
    assert exp.stage_config("train", exp.train_runs["tau-t500-s0"])["trainer"]["run_dir"] == str(exp.train_runs["tau-t500-s0"].dir)
    assert str(exp.train_runs["tau-t500-s0"].dir).endswith("results/micro/train/tau-t500-s0")

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    result = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "sweep.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    assert sorted(j for j in jobs if j.startswith("train[")) == sorted(f"train[run={m}-s{s}]" for m in exp.methods for s in (0, 1))
    assert sorted(j for j in jobs if j.startswith("sample_curve[")) == sorted(f"sample_curve[run={r}]" for r in exp.train_runs)
    assert sum(j.startswith("evaluate_curve[") for j in jobs) == 10 and "distill" not in {j.split("[")[0] for j in jobs}


@pytest.mark.parametrize("change,message", [
    ({"tables": {"t": {"methods": ["baseline", "speedd"]}}}, r"tables.t.methods: unknown method 'speedd'; did you mean 'speed'\?"),
    ({"tables": {"t": {"methods": ["baseline", "speed"], "reference": "min_snr"}}}, r"tables.t.reference: not one of the table's methods"),
    ({"tables": {"t": {"methods": ["speed", "speed"]}}}, r"tables.t.methods .* a method is named twice"),
    ({"tables": {"t": {"methods": ["speed"], "steps": [3]}}}, r"tables.t.steps \[3\]: expected a non-empty list of eval_steps \[2, 4\]"),
    ({"tables": {"t": {"methods": ["speed"], "refrence": "speed"}}}, r"tables.t: unknown key 'refrence'; did you mean 'reference'\?"),
    ({"tables": {"training_loss": {"methods": ["speed"]}}}, r"table name 'training_loss' is taken"),
    ({"methods": {"speed": {"config": "configs/mnist5k/speed.yaml", "grid": {"diffusion.timestep_sampler.kk": [1]}}}},
     r"methods.speed-kk1: .*diffusion.timestep_sampler.kk"),
    ({"methods": {"s": {"config": "configs/mnist5k/speed.yaml", "grid": {"diffusion.timestep_sampler.k": [2]}}, "s-k2": "configs/mnist5k/speed.yaml"}},
     r"duplicate method name 's-k2'"),
    ({"methods": {"s": {"config": "configs/mnist5k/speed.yaml", "grid": {"a.k": [1]}, "variants": {"v": ["a.k=1"]}}}}, r"methods.s: give a grid or variants, not both"),
    ({"methods": {"s": {"config": "configs/mnist5k/speed.yaml", "variants": {"v": "diffusion.timestep_sampler.k=2"}}}},
     r"methods.s.variants.v: .* is not of type .array."),
    ({"methods": {"s": {"config": "configs/mnist5k/speed.yaml", "overides": []}}}, r"methods.s: unknown key 'overides'; did you mean 'overrides'\?"),
    ({"methods": {"a/b": "configs/mnist5k/speed.yaml"}}, r"method 'a/b': names are letters"),
    ({"teachers": ["speed-s1"]}, r"teachers: no train run 'speed-s1'; did you mean 'speed-s0'\?"),
    ({"teachers": "speed-s0"}, r"teachers: 'speed-s0' is not of type 'array'"),
    ({"methods": {"sct-x": "configs/mnist5k/speed.yaml"}}, r"method 'sct-x': names starting with 'sct-' are the sct students' runs"),
    ({"consistency_methods": ["scd", "sctt"]}, r"consistency_methods: no consistency method 'sctt'; did you mean 'sct'\?"),
    ({"overrides": {"train": ["trainer.progres=false"]}}, r"overrides.train: .*trainer.progres"),
    ({"tables": {"k_speedup": {"methods": ["speed"]}}}, r"table name 'k_speedup' is taken"),
    ({"teachers": []}, r"configure consistency models, but `teachers` is empty"),
    # a stage that runs in one process is refused several tasks, naming the key that asks for them
    ({"launcher": {"default": {"executor": "slurm", "tasks_per_node": 2}}},
     r"launcher.default.tasks_per_node: the autoencoder stage runs in one process, not in 1 node\(s\) x 2 task\(s\)"),
    ({"launcher": {"default": {"executor": "slurm", "tasks_per_node": 2}, "autoencoder": {"tasks_per_node": 1},
                   "classifier": {"tasks_per_node": 1}, "evaluate": {"executor": "slurm", "nodes": 2}}},
     r"launcher.evaluate.nodes: the evaluate stage runs in one process, not in 2 node\(s\)"),
    ({"launcher": {"train": {"executor": "slurm", "collective_timeout_s": 0}}}, r"collective_timeout_s must be at least 1"),
    ({"launcher": {"default": {"executor": "slurm", "tasks_per_node": 2}, "autoencoder": {"executor": "slurm", "nodes": 1}}},
     r"launcher.default.tasks_per_node: the autoencoder stage"),
])
def test_an_invalid_table_or_variant_is_refused_with_a_clear_message(change, message):
    from speedpipe.errors import ConfigError
    from speedpipe.workflow import Experiment

    pipe = {**yaml.safe_load((REPO / "tests/data/micro.yaml").read_text()), **change}
    if "tables" not in change:
        pipe.pop("tables")
    with pytest.raises(ConfigError, match=message):
        Experiment(pipe, base_dir=REPO)


def test_every_stage_that_splits_its_work_over_ranks_may_have_several_tasks():
    from speedpipe.stages import STAGES
    from speedpipe.workflow import Experiment

    several = {"executor": "slurm", "nodes": 2, "tasks_per_node": 2}
    one = {"executor": "slurm", "nodes": 1, "tasks_per_node": 1}
    pipe = {**yaml.safe_load((REPO / "tests/data/micro.yaml").read_text()),
            "launcher": {"default": several, "autoencoder": one, "classifier": one, "evaluate": one, "report": {"executor": "local"}}}
    Experiment(pipe, base_dir=REPO)  # accepted: no stage below is refused several tasks
    assert {name for name, stage in STAGES.items() if stage.ranks} == {"encode", "reference", "train", "distill", "sample"}


def test_consistency_methods_without_teachers_are_refused():
    from speedpipe.errors import ConfigError
    from speedpipe.experiment_file import CONSISTENCY_KEYS
    from speedpipe.workflow import Experiment

    pipe = {k: v for k, v in yaml.safe_load((REPO / "tests/data/micro.yaml").read_text()).items()
            if k not in CONSISTENCY_KEYS | {"consistency_methods"}}
    Experiment({**pipe, "teachers": []}, base_dir=REPO)  # the default [scd] alone: no consistency models, no complaint
    with pytest.raises(ConfigError, match=r"consistency_methods \['sct'\] configure consistency models, but `teachers` is empty"):
        Experiment({**pipe, "teachers": [], "consistency_methods": ["sct"]}, base_dir=REPO)


def test_an_invalid_table_is_refused_before_anything_runs(tmp_path):
    bad = micro_experiment(tables={"t": {"methods": ["baseline", "speedd"]}})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    result = snakemake(tmp_path, "--configfile", str(tmp_path / "bad.yaml"))
    assert result.returncode != 0 and "unknown method 'speedd'; did you mean 'speed'?" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_a_method_that_needs_no_teacher_is_planned_without_one(tmp_path):
    """teacher_free: [meanflow] with no teachers at all: the student meanflow-no-teacher is base_config's DiT, warm-started
    on the data; its job's params carry the network settings it reads (a teacher's students' carry none: their teacher
    brings them); the dry run plans its distill job from the latents alone, and its evaluations."""
    from speedpipe.experiment_file import TEACHER_KEYS
    from speedpipe.workflow import Experiment

    pipe = {k: v for k, v in micro_experiment(teachers=[], teacher_free=["meanflow"]).items()
            if k not in TEACHER_KEYS | {"consistency_methods"}}
    exp = Experiment(pipe)
    student = exp.distill_runs["meanflow-no-teacher"]
    assert student.teacher is None and list(exp.distill_runs) == ["meanflow-no-teacher"] and exp.teacher_samplers() == []
    d = exp.stage_config("distill", student)
    assert d["distill"]["teacher"] is None and d["distill"]["warm_start_target"] == "data" and d["distill"]["method"] == "meanflow"
    reads = exp.job_params("distill", {"student": "meanflow-no-teacher"})[0]["reads"]
    assert reads["model.name"] == d["model"]["name"] and reads["data.latent_norm"] == "channel"
    assert "distill.cfg_scale" not in reads  # micro sets 2.0: it guides a teacher, and there is none
    with_teacher = Experiment(micro_experiment()).job_params("distill", {"student": "scd-speed-s0"})[0]["reads"]
    assert not [k for k in with_teacher if k.startswith(("model.", "diffusion.", "data.latent_norm"))], with_teacher
    assert with_teacher["distill.cfg_scale"] == 2.0


def test_an_experiment_of_students_without_a_teacher_runs_to_its_report_and_check(tmp_path, micro_run):
    """teacher_free alone, on the micro experiment's data: a train method and two students without a teacher, through
    Snakemake to the report: the students' rows under teacher none without ratios, no teacher figure, a README that
    names no teacher, a summary whose entry "none" holds the students' numbers, and `speedpipe check` of the run
    against itself comparing them with no claim about a teacher."""
    import json

    import pandas as pd

    from speedpipe.check import judge
    from speedpipe.experiment_file import TEACHER_KEYS

    shutil.copytree(micro_run / "results/micro", tmp_path / "results/micro", symlinks=True,
                    ignore=shutil.ignore_patterns("train", "distill", "samples", "metrics"))
    pipe = {k: v for k, v in micro_experiment(experiment="free", data_from="micro", teachers=[], teacher_free=["meanflow", "sct"],
                                              methods={"baseline": str(REPO / "configs/mnist5k/baseline.yaml")}).items()
            if k not in TEACHER_KEYS | {"consistency_methods", "tables"}}
    (tmp_path / "free.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    result = snakemake(tmp_path, "--configfile", str(tmp_path / "free.yaml"))
    assert result.returncode == 0, result.stderr[-5000:]
    root = tmp_path / "results/free"
    scm = pd.read_csv(root / "tables/scm.csv")
    assert set(scm.teacher) == {"none"} and len(scm) == 2 * 2 * 2  # 2 methods x 2 checkpoints x 2 samplers
    assert not {"FID / teacher", "FID / ODE", "sampling speed-up"} & set(scm.columns)  # no teacher: no ratios, left out
    assert {m.split(" student")[0] for m in scm.model} == {"MeanFlow", "sCT"}
    assert not (root / "figures/teacher_grid.png").exists() and (root / "figures/teacher_vs_scm.png").stat().st_size > 0
    readme = (root / "README.md").read_text()
    assert "Without a teacher (teacher `none` in the tables): meanflow, sct" in readme and "Teachers [" not in readme
    summary = json.loads((root / "tables/summary.json").read_text())
    assert list(summary["teachers"]) == ["none"] and list(summary["teachers"]["none"]) == ["students"]
    assert sorted(summary["teachers"]["none"]["students"]) == ["meanflow", "sct"]
    expected = json.loads((REPO / "results/demo/expected.json").read_text())
    j = judge(summary, {**expected, "reference": summary})
    assert all(c["holds"] for c in j.conclusions) and not [n for n in j.numbers if n["moved"]]
    assert any(n["number"] == "meanflow student without a teacher scm1 FID at 4" for n in j.numbers), j.numbers


@pytest.mark.parametrize("change,message", [
    ({"teacher_free": ["scd"]}, "teacher_free: scd evaluates the teacher network"),
    ({"teacher_free": ["meanflow"], "overrides": {"distill": ["distill.meanflow.label_dropout=0.1", "model.class_dropout_prob=0"]}},
     "meanflow drops labels to the null class, and base_config's DiT has none"),
    ({"teacher_free": ["meanflow"], "overrides": {"distill": ["distill.meanflow.omega=2.0"]}},
     "meanflow-no-teacher: config key 'distill.meanflow.label_dropout': 0, but guidance in training"),
    ({"teacher_free": ["sct"], "overrides": {"distill": ["model.init_from=/nowhere/dit.pt"]}},
     "sct-no-teacher: config key 'model.init_from': /nowhere/dit.pt does not exist"),
    ({"teacher_free": ["meanflwo"]}, "teacher_free: no consistency method 'meanflwo'; did you mean 'meanflow'"),
    ({"teachers": [], "teacher_free": []}, r"\['distill_eval_steps', 'distill_steps', 'distill_warm_start', 'final_samples', "
                                           r"'scm_samplers'\] configure consistency models, but `teachers` and `teacher_free` are empty"),
])
def test_a_student_without_a_teacher_is_refused_what_needs_one_when_planned(change, message):
    """A method that evaluates a teacher, a label-dropping student on a DiT without a null class, MeanFlow's guidance
    without the null class label dropout trains, a DiT file that does not exist: refused by the preflight checks,
    before any job."""
    from speedpipe import preflight
    from speedpipe.errors import ConfigError
    from speedpipe.experiment_file import TEACHER_KEYS
    from speedpipe.workflow import Experiment

    pipe = micro_experiment(**change)
    if not pipe["teachers"]:
        pipe = {k: v for k, v in pipe.items() if k not in TEACHER_KEYS | {"consistency_methods"}}
    try:
        found = preflight.problems(Experiment(pipe))
    except ConfigError as err:
        found = [str(err)]
    assert any(re.search(message, p) for p in found), found
