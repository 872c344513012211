"""An experiment file's launcher settings (where a stage's jobs run), checked without importing the launcher: the
experiment is validated while Snakemake parses the workflow."""
import re
from dataclasses import dataclass, field, fields

from speedpipe.errors import ConfigError

SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:=@%+/-]*")  # no whitespace, quotes or shell metacharacters


@dataclass
class LauncherConfig:
    executor: str = "local"  # local | slurm
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    nodes: int = 1
    tasks_per_node: int = 1  # = GPUs per node for DDP: one rank per task
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int = 4
    time_min: int = 60
    additional: dict = field(default_factory=dict)  # extra sbatch parameters, e.g. {"exclusive": ""}
    poll_seconds: float = 2.0
    folder: str = ""  # submitit logs; default: {output_dir}/{experiment}/.slurm
    # multi-task jobs: the network interface torch.distributed's traffic takes on every node (gloo's and nccl's socket
    # interface, e.g. ib0; empty: what the node's host name resolves to), and how long a collective waits for a rank
    # before it fails (a rank that died also ends the job at once: srun --kill-on-bad-exit)
    socket_ifname: str = ""
    collective_timeout_s: int = 1800


def parse_launcher(settings: dict) -> LauncherConfig:
    """Validate launcher settings before anything is submitted; errors name the key and the value."""
    known = {f.name: f for f in fields(LauncherConfig)}
    for key, value in settings.items():
        if key not in known:
            raise ConfigError(f"launcher: unknown key {key!r}; expected one of {sorted(known)}")
        kind = known[key].type
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"launcher.{key}: expected a non-negative integer, got {value!r}")
        if kind is str and (not isinstance(value, str) or not SAFE_VALUE.fullmatch(value)):
            raise ConfigError(f"launcher.{key}: {value!r} contains whitespace, quotes or shell metacharacters")
        if kind is float and (not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"launcher.{key}: expected a positive number, got {value!r}")
        if kind is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"launcher.{key}: expected a mapping of sbatch options")
            for k, v in value.items():
                if not SAFE_VALUE.fullmatch(str(k)) or not SAFE_VALUE.fullmatch(str(v)):
                    raise ConfigError(f"launcher.{key}.{k}: {v!r} contains whitespace, quotes or shell metacharacters")
    cfg = LauncherConfig(**settings)
    if cfg.executor not in ("local", "slurm"):
        raise ConfigError(f"launcher.executor: {cfg.executor!r} is not 'local' or 'slurm'")
    if cfg.nodes < 1 or cfg.tasks_per_node < 1 or cfg.time_min < 1 or cfg.collective_timeout_s < 1:
        raise ConfigError("launcher: nodes, tasks_per_node, time_min and collective_timeout_s must be at least 1")
    return cfg


def many_tasks_key(cfg: LauncherConfig) -> str:
    """The key that makes a job of several tasks: nodes where more than one, else tasks_per_node."""
    return "nodes" if cfg.nodes > 1 else "tasks_per_node"


def refuse_tasks(stage: str, cfg: LauncherConfig, where: str = "launcher"):
    """A stage that runs in one process gets one task: several would each do all its work and write its files at once."""
    if cfg.executor == "slurm" and cfg.nodes * cfg.tasks_per_node > 1:
        raise ConfigError(f"{where}.{many_tasks_key(cfg)}: the {stage} stage runs in one process, not in {cfg.nodes} node(s) x "
                          f"{cfg.tasks_per_node} task(s): give it nodes: 1 and tasks_per_node: 1")
