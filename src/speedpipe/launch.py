"""Where a stage runs: in this process (`executor: local`) or as a SLURM job through submitit (`executor: slurm`).

For SLURM the job is named after the stage and a hash of its resolved config and of the folder it was launched from,
and its submitit folder is derived from the same hash: a re-run after Snakemake itself died finds the job still
pending or running among the user's own jobs (squeue --me) and waits for it instead of submitting a duplicate. Job state is polled with squeue and, once the
job left the queue, scontrol (clusters without accounting have no sacct, where submitit alone would wait
forever on a cancelled job); a failed, cancelled or timed-out job raises with its id, state and stderr tail.
Multi-task jobs get their DDP environment from submitit's TorchDistributedEnvironment; preempted or
timed-out jobs save their state at the end of the current step (speedpipe.loop), are requeued by submitit and resume
from it.
"""
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import time
from pathlib import Path

from speedpipe.errors import ConfigError
from speedpipe.launcher_settings import LauncherConfig, parse_launcher, refuse_tasks
from speedpipe.stages import STAGES

# Every state from which a job still runs or comes back (squeue's long names); any other state has ended it.
QUEUED_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                 "SUSPENDED", "PREEMPTED", "SIGNALING", "STOPPED", "RESV_DEL_HOLD", "STAGE_OUT")


def config_hash(stage: str, config) -> str:
    """12 hex digits naming a job: its stage, its resolved config and the folder it was launched from (relative paths in
    the config mean another results folder in another checkout, so two clones, or two users, never share a job)."""
    return hashlib.sha256(json.dumps([stage, config, str(Path.cwd().resolve())], sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_in_process(stage: str, config: dict):
    return STAGES[stage].run(config)


def run_recording_usage(jobs: list[tuple[str, dict]], usage: str | None = None) -> list:
    """Run the stages in this process (the ranks of a multi-task job in one process group for all of them); with
    `usage`, write the wall time, CPU time (this process and its children, e.g. data-loader workers) and peak memory
    they took to that JSON file: the record of where they ran, which Snakemake's own benchmark of a SLURM job (the
    waiting process) cannot give. Every rank's own record is gathered into it (rank 0 writes), so a task that ran
    alone on the whole job shows."""
    from speedpipe.distributed import gather_objects, process_group_for_job

    start, before = time.perf_counter(), _cpu_seconds()
    with process_group_for_job() as env:
        results = [run_in_process(stage, config) for stage, config in jobs]
        if not usage:
            return results
        peak_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        import torch

        ranks = gather_objects({"rank": env.rank, "host": platform.node(), "pid": os.getpid(), "threads": torch.get_num_threads(),
                                "wall_s": round(time.perf_counter() - start, 3), "cpu_s": round(_cpu_seconds() - before, 3),
                                "peak_rss_mb": round(peak_kb / 1024, 1)}, env)
    if env.is_main:
        from speedpipe.io import atomic_write_text

        atomic_write_text(usage, json.dumps({
            "stages": [stage for stage, _ in jobs], "wall_s": max(r["wall_s"] for r in ranks),
            "cpu_s": round(sum(r["cpu_s"] for r in ranks), 3), "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "host": ranks[0]["host"], "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "world_size": len(ranks),
            "ranks": ranks}, indent=2))
    return results


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def batch_identity(jobs: list[tuple[str, dict]]) -> tuple[str, str]:
    """(label, hash) of a batch of stage runs: the stage name and config_hash for a single run."""
    if len(jobs) == 1:
        return jobs[0][0], config_hash(*jobs[0])
    label = "+".join(dict.fromkeys(stage for stage, _ in jobs))
    return label, config_hash(label, [config for _, config in jobs])


class StageJob:
    """The callable submitit pickles: sets up the DDP environment of its task and runs the stages in order."""

    def __init__(self, jobs: list[tuple[str, dict]], usage: str | None = None):
        self.jobs, self.usage = jobs, usage

    def __call__(self):
        import os

        import submitit

        from speedpipe.loop import defer_signals_to_step_boundaries

        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if "SLURM_CPUS_PER_TASK" in os.environ:  # torch would start a thread per core of the node: tasks sharing a node
            import torch  # (without a cgroup binding their CPUs) then fight over them, and every collective waits

            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        defer_signals_to_step_boundaries()  # a long stage saves its state at the end of the step, then submitit requeues
        return [str(result) for result in run_recording_usage(self.jobs, self.usage)]

    def checkpoint(self):
        """On preemption or the pre-timeout signal (called by submitit once the running loop has saved latest.pt at
        a step boundary): requeue; the stages resume from it (a batch's finished outputs are re-made identically)."""
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.jobs, self.usage))


def launch_many(jobs: list[tuple[str, dict]], settings: dict | None = None, log=print, usage: str | None = None) -> list:
    """Run several stages, in order, in one process (local) or one SLURM job: one interpreter start-up for all.
    usage: a JSON file for the resources they took where they ran (run_recording_usage)."""
    launcher = parse_launcher(settings or {})
    for stage, _ in jobs:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
        if not STAGES[stage].ranks:
            refuse_tasks(stage, launcher)
    if launcher.executor == "local":
        from speedpipe.loop import signals_deferred_to_step_boundaries

        with signals_deferred_to_step_boundaries():  # a local job stopped by SIGTERM or Ctrl-C saves its step first
            return run_recording_usage(jobs, usage)
    return SlurmLauncher(launcher, log).run(jobs, usage)


def run_job(experiment, rule: str, wildcards: dict, threads: int, usage: str | None = None) -> list:
    """One Snakemake job (workflow/scripts/stage.py): its stages' configs resolved from the experiment, run where the
    experiment's launcher says. Only a job that runs its stages here imports torch: one that waits on SLURM does not,
    so a profile's many jobs in flight on a login node are light processes."""
    jobs = experiment.jobs(rule, wildcards)
    settings = experiment.launcher(jobs[0][0])
    if parse_launcher(settings).executor == "local":
        import torch

        torch.set_num_threads(threads)
    return launch_many(jobs, settings, usage=usage)


class SlurmJobFailed(RuntimeError):
    pass


class SlurmLauncher:
    def __init__(self, launcher: LauncherConfig, log=print):
        self.cfg, self.log = launcher, log

    def folder(self, stage, config, digest) -> Path:
        base = Path(self.cfg.folder) if self.cfg.folder else Path(config["output_dir"]) / config["experiment"] / ".slurm"
        return base / f"{stage}-{digest}"

    def executor(self, folder: Path, name: str):
        import submitit

        c = self.cfg
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        # every task: the collectives' timeout and, where set, the network interface of their traffic
        setup = [f"export SPEEDPIPE_COLLECTIVE_TIMEOUT_S={c.collective_timeout_s}"]
        if c.socket_ifname:
            setup += [f"export GLOO_SOCKET_IFNAME={c.socket_ifname}", f"export NCCL_SOCKET_IFNAME={c.socket_ifname}"]
        params = dict(job_name=name, nodes=c.nodes, ntasks_per_node=c.tasks_per_node, cpus_per_task=c.cpus_per_task,
                      mem=f"{c.mem_gb}GB", time=c.time_min, signal_delay_s=min(120, 30 * c.time_min),
                      additional_parameters=dict(c.additional), setup=setup,
                      srun_args=["--kill-on-bad-exit=1"])  # a task that dies ends the job: its peers never wait on it
        if c.gpus_per_node:
            params["gpus_per_node"] = c.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(c, key):
                params[key] = getattr(c, key)
        executor.update_parameters(**params)
        return executor

    def run(self, jobs: list[tuple[str, dict]], usage: str | None = None) -> list:
        import submitit

        label, digest = batch_identity(jobs)
        name = f"speedpipe-{label}-{digest}"
        folder = self.folder(label, jobs[0][1], digest)
        existing = queued_job_ids(name)
        if existing:
            job = submitit.SlurmJob(folder=folder, job_id=existing[0])
            self.log(f"speedpipe: re-attaching to SLURM job {job.job_id} ({name}), still in the queue")
        else:
            job = self.executor(folder, name).submit(StageJob(jobs, usage))
            self.log(f"speedpipe: submitted SLURM job {job.job_id} ({name}), logs in {folder}")
        return self.wait(job)

    def wait(self, job):
        """Poll until the job leaves the queue, streaming every task's stdout into our log as it grows."""
        from submitit.core.utils import JobPaths

        tasks = self.cfg.nodes * self.cfg.tasks_per_node
        streams = [LogStream(JobPaths(job.paths.folder, job.job_id, task).stdout, self.log,
                             "[slurm]" if task == 0 else f"[slurm task {task}]") for task in range(tasks)]
        while True:
            for stream in streams:
                stream.flush()
            state = job_state(job.job_id)
            if state in QUEUED_STATES:
                time.sleep(self.cfg.poll_seconds)
                continue
            if state == "COMPLETED" and not job.paths.result_pickle.exists():
                time.sleep(self.cfg.poll_seconds)  # the batch script ended; submitit's result file may lag a moment
            if state == "COMPLETED" and job.paths.result_pickle.exists():
                return job.results()[0]  # task 0's result (every task of a DDP job returns the same)
            paths = [JobPaths(job.paths.folder, job.job_id, task) for task in range(tasks)]
            silent = [f"{task} ({task_host(path.stdout)})" for task, path in enumerate(paths) if not path.result_pickle.exists()]
            raise SlurmJobFailed(
                f"SLURM job {job.job_id} ended in state {state}."
                + (f" Task(s) {', '.join(silent)} ended without a result or an error: killed, or their node lost." if silent else "")
                + "".join(f"\n--- last lines of task {task}'s stderr ({path.stderr}) ---\n{tail(path.stderr)}"
                          for task, path in enumerate(paths)))


class LogStream:
    """Forwards the lines appended to a file since the last flush (a task's stdout) to a log function."""

    def __init__(self, path, log, prefix="[slurm]"):
        self.path, self.log, self.prefix, self.offset = Path(path), log, prefix, 0

    def flush(self):
        if not self.path.exists():
            return
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        for line in text.splitlines():
            self.log(f"{self.prefix} {line}")


def queued_job_ids(name: str) -> list[str]:
    out = subprocess.run(["squeue", "--me", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SlurmJobFailed(f"squeue failed: {out.stderr.strip()}")
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()[1] in QUEUED_STATES]


def job_state(job_id: str) -> str | None:
    """The job's state from squeue while queued, else from scontrol (works without accounting/sacct)."""
    main_id = str(job_id).split("_")[0]
    out = subprocess.run(["squeue", "--me", "-h", "-j", main_id, "-o", "%T"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()[0]
    out = subprocess.run(["scontrol", "show", "job", main_id], capture_output=True, text=True)
    match = re.search(r"JobState=(\w+)", out.stdout)
    return match.group(1) if match else "UNKNOWN (left the queue; scontrol no longer knows it: raise MinJobAge)"


def task_host(stdout) -> str:
    """The node a task ran on, from submitit's first line in its stdout."""
    match = re.search(r"JobEnvironment\(job_id=\S+, hostname=([^,]+),", Path(stdout).read_text(errors="replace")) \
        if Path(stdout).exists() else None
    return f"on {match.group(1)}" if match else "never started"


def tail(path, lines: int = 30) -> str:
    path = Path(path)
    if not path.exists():
        return "(no stderr file)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
