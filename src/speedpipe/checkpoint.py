"""Checkpoint files of long stages: `ckpt-{step:07d}.pt`, written atomically, read with weights_only=True
(speedpipe.loop writes and resumes them)."""
from pathlib import Path

import torch

from speedpipe.io import atomic_torch_save, safe_torch_load
from speedpipe.layout import CKPT_NAME, checkpoint as checkpoint_path


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of the finished checkpoints in run_dir, oldest first (temporary files are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_NAME.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, run_dir, step: int) -> Path:
    path = checkpoint_path(run_dir, step)
    atomic_torch_save(state, path)
    return path


def load_checkpoint(path) -> dict:
    return safe_torch_load(path)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a stage draws from: torch's global CPU (and CUDA) RNG plus its own generators."""
    state = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in generators.items():
        g.set_state(state[name])
