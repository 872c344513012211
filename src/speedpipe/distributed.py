"""torch.distributed set-up from the environment: torchrun (RANK/WORLD_SIZE) or SLURM tasks (SLURM_PROCID/SLURM_NTASKS)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from speedpipe.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_ranks() -> DistEnv:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("SLURM job with several tasks but no MASTER_ADDR/MASTER_PORT: launch through speedpipe.launch or torchrun")
        return DistEnv(int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0)), int(os.environ["SLURM_NTASKS"]))
    return DistEnv()


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group when the environment describes several ranks; a no-op for one process."""
    env = _env_ranks()
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env


def resolve_device(name: str, key: str = "device") -> torch.device:
    """auto | cpu | cuda -> a torch.device, refusing cuda where none is visible (naming the config key)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}': 'cuda' requested but no CUDA device is visible")
    return torch.device(name)


def setup_device(name: str, key: str = "device") -> tuple[torch.device, DistEnv]:
    """The device of this rank (cuda:LOCAL_RANK under DDP) and the joined process group's ranks."""
    device = resolve_device(name, key)
    env = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    return device, env


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def all_reduce_min(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def barrier(env: DistEnv):
    if env.world_size > 1:
        dist.barrier()


def shutdown(env: DistEnv):
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
