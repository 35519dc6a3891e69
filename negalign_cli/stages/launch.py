"""``negalign launch``: run the shards of an ``embed images`` or ``cam`` run through submitit.

submitit's SLURM executor submits one job array (``--array-parallelism`` caps how many run at once;
a preempted or timed-out shard is requeued by submitit's checkpointing and resumes from its own
per-image cache). Its local executor runs the shards as processes on this machine, as many at a
time as ``parallel`` (one per GPU where there are several, each with its own
``CUDA_VISIBLE_DEVICES``), so the same command works on a laptop and on a cluster. Shards already
done under the frozen plan are not submitted again. Each shard is the ordinary command with
``--shard i/K --shards-dir DIR`` appended, run as a subprocess; its output goes to the shard's log.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from negalign_cli.errors import NegalignError
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages.shards import PLAN, missing_shards, read_plan

EXECUTORS = ("local", "slurm")
LOGS = "logs"
POLL_SECONDS = 0.5


class ShardJob:
    """One shard: ``negalign ARGS --shard i/K --shards-dir DIR`` in a subprocess. Picklable, and
    checkpointable: on preemption submitit requeues the same call (the rerun resumes from the
    shard's cache)."""

    def __init__(self, argv: Sequence[str], shards_dir: str, count: int) -> None:
        self.argv = list(argv)
        self.shards_dir = shards_dir
        self.count = count

    def command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "negalign_cli",
            *self.argv,
            "--shard",
            f"{index}/{self.count}",
            "--shards-dir",
            self.shards_dir,
        ]

    def __call__(self, index: int) -> int:
        completed = subprocess.run(self.command(index), check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"shard {index}/{self.count} exited with status {completed.returncode}")
        return index

    def checkpoint(self, index: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(ShardJob(self.argv, self.shards_dir, self.count), index)


@dataclass
class LaunchConfig:
    executor: str = "local"
    parallel: int | None = None  # local: shards at a time (default: one per GPU, else 1)
    array_parallelism: int = 64  # slurm
    timeout_min: int = 24 * 60
    gpus_per_shard: int | None = None  # default: 1 on SLURM, 1 per shard locally when there are GPUs
    cpus_per_shard: int | None = None
    mem_gb: int | None = None
    partition: str | None = None
    slurm_extra: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LaunchReport:
    submitted: list[int]
    skipped: list[int]  # done before this launch
    failed: dict[int, str]  # shard -> log file (or reason)


def pending_shards(shards_dir: Path, count: int) -> list[int]:
    """Shards still to run: all of them before the plan exists, else those not done under it."""
    if not (shards_dir / PLAN).exists():
        return list(range(count))
    plan = read_plan(shards_dir)
    if plan.shards != count:
        raise NegalignError(
            f"{shards_dir / PLAN} plans {plan.shards} shards, not {count}: use another --shards-dir "
            "for a new run"
        )
    return [s.index for s in missing_shards(shards_dir, plan)]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no CUDA runtime at all means no GPU
        return 0


def _executor(config: LaunchConfig, logs: Path) -> Any:
    import submitit

    if config.executor == "slurm":
        try:
            executor = submitit.AutoExecutor(folder=logs / "%A_%a", cluster="slurm")
        except RuntimeError as exc:  # submitit looks for srun
            raise NegalignError(
                f"--executor slurm needs SLURM's commands (srun, sbatch) on PATH ({exc}); "
                "use --executor local on a machine without SLURM"
            ) from None
        params: dict[str, Any] = {
            "timeout_min": config.timeout_min,
            "slurm_array_parallelism": config.array_parallelism,
            "gpus_per_node": 1 if config.gpus_per_shard is None else config.gpus_per_shard,
            "tasks_per_node": 1,
            "nodes": 1,
        }
        if config.cpus_per_shard:
            params["cpus_per_task"] = config.cpus_per_shard
        if config.mem_gb:
            params["mem_gb"] = config.mem_gb
        if config.partition:
            params["slurm_partition"] = config.partition
        if config.slurm_extra:
            params["slurm_additional_parameters"] = dict(config.slurm_extra)
        executor.update_parameters(**params)
        return executor
    if config.executor != "local":
        raise NegalignError(f"--executor must be {' or '.join(EXECUTORS)}, got {config.executor!r}")
    local = submitit.LocalExecutor(folder=logs / "%j")
    local.update_parameters(timeout_min=config.timeout_min)
    return local


def _log_of(job: Any) -> str:
    try:
        return str(job.paths.stderr)
    except Exception:  # noqa: BLE001 - a log path is a courtesy
        return "?"


def launch(
    argv: Sequence[str],
    shards_dir: Path,
    count: int,
    config: LaunchConfig,
    reporter: Reporter | None = None,
) -> LaunchReport:
    """Run every pending shard of ``negalign ARGV`` and wait for them."""
    reporter = reporter or NullReporter()
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    pending = pending_shards(shards_dir, count)
    skipped = sorted(set(range(count)) - set(pending))
    if skipped:
        reporter.info(f"{len(skipped)} shard(s) done already; submitting the other {len(pending)}")
    job = ShardJob(argv, str(shards_dir), count)
    failed: dict[int, str] = {}
    if not pending:
        return LaunchReport([], skipped, failed)
    executor = _executor(config, shards_dir / LOGS)
    if config.executor == "slurm":
        jobs = executor.map_array(job, pending)
        reporter.info(f"submitted SLURM job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} shards)")
        with reporter.progress(f"{len(jobs)} shard(s) on SLURM", len(jobs)) as advance:
            for index, handle in zip(pending, jobs, strict=True):
                _wait(handle, index, failed)
                advance(1)
        return LaunchReport(pending, skipped, failed)
    gpus = visible_gpus()
    parallel = config.parallel or max(1, gpus)
    per_shard = config.gpus_per_shard if config.gpus_per_shard is not None else (1 if gpus else 0)
    free = list(range(gpus)) if per_shard else []
    queue = list(pending)
    running: dict[int, tuple[Any, list[int]]] = {}
    with reporter.progress(f"{len(pending)} shard(s), {parallel} at a time", len(pending)) as advance:
        while queue or running:
            while queue and len(running) < parallel and (not per_shard or len(free) >= per_shard):
                index = queue.pop(0)
                devices = [free.pop(0) for _ in range(per_shard)]
                executor.update_parameters(gpus_per_node=per_shard, visible_gpus=devices)
                running[index] = (executor.submit(job, index), devices)
            for index in [i for i, (handle, _) in running.items() if handle.done()]:
                handle, devices = running.pop(index)
                free.extend(devices)
                _wait(handle, index, failed)
                advance(1)
            time.sleep(POLL_SECONDS)
    return LaunchReport(pending, skipped, failed)


def _wait(handle: Any, index: int, failed: dict[int, str]) -> None:
    try:
        handle.result()
    except Exception:  # noqa: BLE001 - any failure of a shard is reported with its log
        failed[index] = _log_of(handle)
