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
