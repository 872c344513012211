"""A budget study reads a long run's checkpoint at B as the model a run of B iterations ends with: neither the
learning rate nor the EMA may depend on the total number of iterations (configs/pipeline/budget_mnist.yaml)."""
import torch

from speedpipe.checkpoint import load_checkpoint
from speedpipe.config import load_config
from speedpipe.stages import train


def test_a_long_runs_checkpoint_at_b_is_the_end_of_a_run_of_b_iterations(tiny_train_config, tmp_path):
    common = ["trainer.ckpt_every=1000", "optim.warmup_steps=2"]  # a warm-up too: it is counted from the start, not the end
    short = train.run(load_config(tiny_train_config, [*common, "trainer.steps=4", f"trainer.run_dir={tmp_path / 'short'}"],
                                  phase="train"))
    long = train.run(load_config(tiny_train_config, [*common, "trainer.steps=8", "trainer.ckpt_steps=[4]",
                                                     f"trainer.run_dir={tmp_path / 'long'}"], phase="train"))
    a, b = load_checkpoint(short / "ckpt-0000004.pt"), load_checkpoint(long / "ckpt-0000004.pt")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}: the long run's point differs from the short run's end"
    assert a["opt"]["param_groups"][0]["lr"] == b["opt"]["param_groups"][0]["lr"]


def test_an_experiment_reads_another_experiments_data_only_if_made_with_its_settings(micro_run):
    """data_from: the budget study reads the demo's autoencoder, latents, classifier and reference instead of making its
    own -- only where they were made with the settings it would make them with; otherwise it is refused before any job
    runs, naming the stage and the key, and nothing of the other experiment is written."""
    import yaml

    from conftest import planned_jobs, snakemake

    pipe = yaml.safe_load((micro_run / "micro.yaml").read_text())
    pipe.update(experiment="reuse", data_from="micro")
    (micro_run / "reuse.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    dry = snakemake(micro_run, "-n", "--configfile", str(micro_run / "reuse.yaml"))
    assert dry.returncode == 0, dry.stderr[-3000:]
    rules = {job.split("[")[0] for job in planned_jobs(dry.stdout)}
    assert "train" in rules and not rules & {"autoencoder", "encode", "classifier", "reference"}
    assert "data_from" not in dry.stderr  # no problem found

    pipe["overrides"]["classifier"] = ["eval.classifier_steps=11"]
    (micro_run / "reuse.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    data = micro_run / "results/micro"
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file() and "logs" not in p.parts}
    refused = snakemake(micro_run, "--configfile", str(micro_run / "reuse.yaml"))
    assert refused.returncode != 0
    assert "data_from: micro: its classifier stage was made with other settings (eval.classifier_steps: 10 there, 11 here)" \
        in refused.stderr
    assert not (micro_run / "results/reuse/train").exists()
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file() and "logs" not in p.parts} == before
