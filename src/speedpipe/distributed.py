"""torch.distributed set-up from the environment: torchrun (RANK/WORLD_SIZE) or SLURM tasks (SLURM_PROCID/SLURM_NTASKS)."""
import datetime
import os
import socket
from contextlib import contextmanager
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
    """Join the process group when the environment describes several ranks (unless the job already has: see
    process_group_for_job); a no-op for one process."""
    env = _env_ranks()
    if env.world_size > 1:
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        if not dist.is_initialized():
            join_process_group(_backend(device_type == "cuda"), env.rank, env.world_size)
    return env


def _backend(cuda: bool) -> str:
    """gloo for CPU tensors, with nccl for CUDA tensors where the job has GPUs."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


_job_group = False  # the process group was joined for a whole job: its stages leave it open


@contextmanager
def process_group_for_job():
    """One process group for every stage of a multi-task job. A group per stage on the same port races: a rank done
    with one stage would join the next stage's rendezvous at a peer's store still serving the last."""
    global _job_group
    env = _env_ranks()
    if env.world_size == 1:
        yield env
        return
    cuda = torch.cuda.is_available() and env.local_rank < torch.cuda.device_count()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    join_process_group(_backend(cuda), env.rank, env.world_size)
    _job_group = True
    try:
        yield env
    except BaseException:
        _job_group = False  # a failed collective may leave the group unusable: the process ends, its peers time out
        raise
    _job_group = False
    dist.destroy_process_group()


def join_process_group(backend: str, rank: int, world_size: int):
    """init_process_group at MASTER_ADDR:MASTER_PORT, with the launcher's collective timeout (a collective waiting on a
    rank that is gone fails after it); a rendezvous address this node cannot resolve is named before anything waits."""
    host = os.environ.get("MASTER_ADDR", "")
    try:
        socket.getaddrinfo(host, None)
    except OSError as err:
        raise RuntimeError(f"rank {rank} on {socket.gethostname()}: the rendezvous address MASTER_ADDR={host!r} does not "
                           f"resolve here ({err})") from None
    seconds = os.environ.get("SPEEDPIPE_COLLECTIVE_TIMEOUT_S")  # the launcher's; else torch's default (gloo 30, nccl 10 min)
    timeout = {"timeout": datetime.timedelta(seconds=int(seconds))} if seconds else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **timeout)


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


def all_reduce_max(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    return -all_reduce_min(-t, env)


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if env.world_size == 1:
        return [obj]
    objects = [None] * env.world_size
    dist.all_gather_object(objects, obj)
    return objects


def barrier(env: DistEnv):
    if env.world_size > 1:
        dist.barrier()


def shutdown(env: DistEnv):
    if env.world_size > 1 and dist.is_initialized() and not _job_group:
        dist.destroy_process_group()
