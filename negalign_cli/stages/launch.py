"""``negalign launch``: run the shards of an ``embed images`` or ``cam`` run through submitit.

submitit's SLURM executor submits one job array (``--array-parallelism`` caps how many run at once);
its local executor runs the shards as processes on this machine, as many at a time as ``parallel``
(one per GPU where there are several, each with its own ``CUDA_VISIBLE_DEVICES``), so the same
command works on a laptop and on a cluster. Shards already done under the frozen plan are not
submitted again. Each shard is the ordinary command with ``--shard i/K --shards-dir DIR --cache-dir
DIR/shard-…/cache`` appended, run as a subprocess; its output goes to the shard's log.

On SLURM the array is submitted held and released once every task's log folder exists (SLURM
before 23.02 does not create it, and a task that starts first dies without a log). The launcher
then follows the array with ``squeue`` (no accounting database needed): pending tasks with SLURM's
reason, running ones, finished ones. A task that SLURM requeues (``scontrol requeue``, preemption
with ``PreemptMode=REQUEUE``, submitit's own checkpoint on ``USR2`` before the time limit) is sent
SIGTERM: the shard stops without a result and runs again under the same id, resuming from its
per-image cache, and the launcher keeps waiting for it. A task that leaves the queue without a
result (cancelled, timed out, killed) is a failed shard.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from negalign_cli.errors import NegalignError
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages.shards import PLAN, Shard, missing_shards, read_plan, shard_cache

EXECUTORS = ("local", "slurm")
LOGS = "logs"
LAUNCH_RECORD = "launch.json"  # the SLURM array last submitted for this folder
POLL_SECONDS = 0.5
SLURM_POLL = (1.0, 30.0)  # squeue: first interval, then doubling up to the second
TERMINATED = 143  # a shard stopped by SIGTERM: requeued, preempted, cancelled or out of time
RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING")
# states a task ends in; PREEMPTED and the rest may still turn into PENDING when SLURM requeues it
FINISHED = (
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
)
GRACE_POLLS = 5  # queue polls (2 s apart) a task must look finished without a result to count as failed


class ShardJob:
    """One shard: ``negalign ARGS --shard i/K --shards-dir DIR --cache-dir CACHE`` in a subprocess.
    Picklable, and checkpointable: on submitit's time-limit signal it requeues the same call (the
    rerun resumes from the shard's cache). On SIGTERM (SLURM requeues, preempts, cancels or times
    out the task) the shard is stopped and this process exits without a result, so that a requeued
    task is waited for and a cancelled one counts as failed, never as finished."""

    def __init__(self, argv: Sequence[str], shards_dir: str, count: int) -> None:
        self.argv = list(argv)
        self.shards_dir = shards_dir
        self.count = count

    def command(self, index: int) -> list[str]:
        cache = shard_cache(Path(self.shards_dir), Shard(index, self.count))
        return [
            sys.executable,
            "-m",
            "negalign_cli",
            *self.argv,
            "--shard",
            f"{index}/{self.count}",
            "--shards-dir",
            self.shards_dir,
            "--cache-dir",
            str(cache),
        ]

    def __call__(self, index: int) -> int:
        child = subprocess.Popen(self.command(index))
        terminated: list[int] = []

        def forward(signum: int, _frame: Any) -> None:
            terminated.append(signum)
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        main = threading.current_thread() is threading.main_thread()  # signals are the main thread's
        previous = signal.signal(signal.SIGTERM, forward) if main else None
        try:
            code = child.wait()
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        if terminated or code in (-signal.SIGTERM, TERMINATED):
            sys.stderr.flush()
            os._exit(TERMINATED)  # no result file: SLURM decides whether the task runs again
        if code != 0:
            raise RuntimeError(f"shard {index}/{self.count} exited with status {code}")
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
    gpus_per_shard: int | None = None  # None: none on SLURM, one per shard locally where there are GPUs
    cpus_per_shard: int | None = None
    mem_gb: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None  # default negalign-<stage>
    gres: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    setup: Sequence[str] = ()  # shell lines run before each shard (e.g. module load …)
    slurm_extra: Mapping[str, str] = field(default_factory=dict)
    max_wait_s: float | None = None  # slurm: give up waiting after this long (the array keeps running)
    verbose: bool = False  # show submitit's own log lines


@dataclass
class LaunchReport:
    submitted: list[int]
    skipped: list[int]  # done before this launch
    failed: dict[int, str]  # shard -> its log file
    why: dict[int, str] = field(default_factory=dict)  # shard -> how it failed, where known
    errors: dict[int, str] = field(default_factory=dict)  # shard -> the first `error:` line of its log


# ----------------------------------------------------------------------------- time limits
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str, option: str = "--time") -> int:
    """Seconds in one of SLURM's time formats: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS``."""
    match = _SLURM_TIME.match(text.strip())
    if not match:
        raise NegalignError(
            f"{option} must be a SLURM time (MM, HH:MM:SS or D-HH:MM:SS, e.g. 90, 04:00:00, 1-12:00:00), "
            f"got {text!r}"
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif third is not None:  # HH:MM:SS
        total = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # MM:SS
        total = int(first) * 60 + int(second)
    else:  # MM
        total = int(first) * 60
    if total <= 0:
        raise NegalignError(f"{option} must be longer than zero, got {text!r}")
    return total


# ----------------------------------------------------------------------------- what is left
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


# ----------------------------------------------------------------------------- executors
def slurm_parameters(config: LaunchConfig, stage: str = "run") -> dict[str, Any]:
    """submitit's SLURM parameters for ``config`` (GPUs only when asked for)."""
    params: dict[str, Any] = {
        "time": config.timeout_min,
        "array_parallelism": config.array_parallelism,
        "ntasks_per_node": 1,
        "nodes": 1,
        "job_name": config.job_name or f"negalign-{stage}",
    }
    if config.gpus_per_shard:
        params["gpus_per_node"] = config.gpus_per_shard
    optional = {
        "cpus_per_task": config.cpus_per_shard,
        "mem": f"{config.mem_gb}GB" if config.mem_gb else None,
        "partition": config.partition,
        "account": config.account,
        "qos": config.qos,
        "gres": config.gres,
        "constraint": config.constraint,
        "exclude": config.exclude,
        "mail_type": config.mail_type,
        "mail_user": config.mail_user,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if config.setup:
        params["setup"] = list(config.setup)
    extra = {key.replace("-", "_"): value for key, value in config.slurm_extra.items()}
    named = sorted(set(extra) & set(params))
    if named:
        raise NegalignError(
            f"--slurm-arg {', '.join(named)} repeats a launch option: give --{named[0].replace('_', '-')} "
            "(or its launch equivalent) instead"
        )
    if extra:
        # submitit writes these last, under the names given: with '_' they replace its own defaults
        params["additional_parameters"] = extra
    return params


def _executor(config: LaunchConfig, logs: Path, stage: str = "run") -> Any:
    import submitit

    if config.executor == "slurm":
        missing = [c for c in ("srun", "sbatch", "squeue", "scontrol") if shutil.which(c) is None]
        if missing:
            raise NegalignError(
                f"--executor slurm needs SLURM's commands on PATH ({', '.join(missing)} not found); "
                "use --executor local on a machine without SLURM"
            )
        executor = submitit.SlurmExecutor(folder=logs / "%j")
        executor.update_parameters(**slurm_parameters(config, stage))
        return executor
    if config.executor != "local":
        raise NegalignError(f"--executor must be {' or '.join(EXECUTORS)}, got {config.executor!r}")
    local = submitit.LocalExecutor(folder=logs / "%j")
    local.update_parameters(timeout_min=config.timeout_min)
    return local


@contextlib.contextmanager
def _submitit_logs(verbose: bool) -> Iterator[None]:
    """submitit's WARNING lines (``Bypassing sacct error`` on clusters without accounting) stay out
    of the terminal unless ``-v``."""
    logger = logging.getLogger("submitit")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _log_of(job: Any) -> str:
    try:
        return str(job.paths.stderr)
    except Exception:  # noqa: BLE001 - a log path is a courtesy
        return "?"


def first_error(log: str) -> str | None:
    """The first ``error: …`` line a shard printed (its one-line user error), if any."""
    try:
        with open(log, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("error:"):
                    return line.strip()
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- launch
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
    if not pending:
        return LaunchReport([], skipped, {})
    why: dict[int, str] = {}
    logs = shards_dir / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    stage = "-".join(argv[:2]) if argv[:2] == ["embed", "images"] else argv[0]
    with _submitit_logs(config.verbose):
        if config.executor == "slurm":
            _refuse_running_array(shards_dir)
            executor = _executor(config, logs, stage)
            failed = _run_slurm(executor, job, pending, shards_dir, config, reporter, why)
        else:
            executor = _executor(config, logs, stage)
            failed = _run_local(executor, job, pending, config, reporter)
    errors = {i: e for i, log in failed.items() if (e := first_error(log))}
    return LaunchReport(pending, skipped, failed, why, errors)


def _run_local(
    executor: Any, job: ShardJob, pending: list[int], config: LaunchConfig, reporter: Reporter
) -> dict[int, str]:
    gpus = visible_gpus()
    parallel = config.parallel or max(1, gpus)
    per_shard = config.gpus_per_shard if config.gpus_per_shard is not None else (1 if gpus else 0)
    free = list(range(gpus)) if per_shard else []
    queue = list(pending)
    running: dict[int, tuple[Any, list[int]]] = {}
    failed: dict[int, str] = {}
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
                try:
                    handle.result()
                except Exception:  # noqa: BLE001 - any failure of a shard is reported with its log
                    failed[index] = _log_of(handle)
                advance(1)
            time.sleep(POLL_SECONDS)
    return failed


# ----------------------------------------------------------------------------- SLURM
def _sbatch_error(exc: BaseException, captured: str) -> NegalignError:
    text = " ".join(f"{exc} {captured}".split())
    lines = re.findall(r"sbatch: error: ([^\n]*?)(?= sbatch: |$)", text)
    detail = "; ".join(dict.fromkeys(line.strip() for line in lines if line.strip())) or text[:300]
    return NegalignError(
        f"SLURM refused the job array: {detail} (check --partition, --account, --qos, --gpus-per-shard, "
        "--gres, --time and --slurm-arg against `sinfo` and your site's limits)"
    )


def _scontrol(*args: str) -> None:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NegalignError(f"scontrol {' '.join(args)} failed: {' '.join(done.stderr.split())[:300]}")


def _scancel(array: str) -> None:
    with contextlib.suppress(OSError):
        subprocess.run(["scancel", array], capture_output=True, check=False)


def _squeue(array: str) -> dict[str, tuple[str, str]] | None:
    """``{task id: (state, reason)}`` of the array's tasks the controller still knows (finished ones
    stay listed for its MinJobAge); None when squeue fails."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-j", array, "-o", "%i|%T|%r"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:  # the whole array has left the controller's memory
            return {}
        return None
    tasks = {}
    for line in done.stdout.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        tasks[job_id.strip()] = (state.strip(), reason.strip())
    return tasks


def _refuse_running_array(shards_dir: Path) -> None:
    """A relaunch while the last array still has tasks queued or running would run them twice."""
    try:
        record = json.loads((shards_dir / LAUNCH_RECORD).read_text(encoding="utf-8"))
        array = str(record["array"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    tasks = {t: s for t, s in (_squeue(array) or {}).items() if s[0] not in FINISHED}
    if tasks:
        raise NegalignError(
            f"SLURM job array {array} of this --shards-dir still has {len(tasks)} task(s) queued or running: "
            f"wait for them (squeue -j {array}) or cancel them (scancel {array}), then run this again"
        )


def _run_slurm(
    executor: Any,
    job: ShardJob,
    pending: list[int],
    shards_dir: Path,
    config: LaunchConfig,
    reporter: Reporter,
    why: dict[int, str],
) -> dict[int, str]:
    held = {**executor.parameters.get("additional_parameters", {}), "hold": True}
    executor.update_parameters(additional_parameters=held)  # released once every log folder exists
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # submitit echoes sbatch's stderr itself
            jobs = executor.map_array(job, pending)
    except Exception as exc:  # noqa: BLE001 - every sbatch refusal becomes one line
        raise _sbatch_error(exc, captured.getvalue()) from None
    array = str(jobs[0].job_id).split("_")[0]
    try:
        for handle in jobs:  # submitit made them when it placed each task's pickle; make sure
            handle.paths.folder.mkdir(parents=True, exist_ok=True)
        tasks = {str(h.job_id): i for h, i in zip(jobs, pending, strict=True)}
        record = json.dumps({"array": array, "tasks": tasks})
        (shards_dir / LAUNCH_RECORD).write_text(record, encoding="utf-8")
        _scontrol("release", array)
    except BaseException:
        _scancel(array)
        raise
    reporter.info(
        f"submitted SLURM job array {array} ({len(jobs)} shard(s)); logs in {shards_dir / LOGS}/{array}_*/"
    )
    try:
        return _follow(array, dict(zip(pending, jobs, strict=True)), config, reporter, why)
    except KeyboardInterrupt:
        reporter.warn(f"stopped waiting; the array keeps running (scancel {array} stops it)")
        raise


def _follow(
    array: str, jobs: dict[int, Any], config: LaunchConfig, reporter: Reporter, why: dict[int, str]
) -> dict[int, str]:
    """Wait for the array's tasks; returns the failed shards' logs (and says in ``why`` how a task
    that left the queue without a result ended). Result files are looked for every second, the
    queue asked at growing intervals (1 s doubling to 30 s)."""
    failed: dict[int, str] = {}
    open_tasks = dict(jobs)
    absent: dict[int, int] = {}  # queue polls in a row a task was neither queued nor finished
    started = time.monotonic()
    interval, next_poll = SLURM_POLL[0], 0.0
    last_line = ""
    with reporter.progress(f"{len(jobs)} shard(s) on SLURM (job array {array})", len(jobs)) as advance:
        while open_tasks:
            for index, handle in list(open_tasks.items()):
                if handle.paths.result_pickle.exists():
                    try:
                        handle.result()
                    except Exception:  # noqa: BLE001 - reported with its log
                        failed[index] = _log_of(handle)
                    del open_tasks[index]
                    advance(1)
            queue = _squeue(array) if open_tasks and time.monotonic() >= next_poll else None
            if queue is not None:
                pending, running = [], 0
                for index, handle in list(open_tasks.items()):
                    task = str(handle.job_id)
                    state, reason = queue.get(task, ("", ""))
                    if state and state not in FINISHED:
                        absent.pop(index, None)
                        if state in RUNNING:
                            running += 1
                        else:
                            pending.append(reason if reason and reason != "None" else "")
                        continue
                    if handle.paths.result_pickle.exists():
                        continue  # finished since the look above: taken next second
                    absent[index] = absent.get(index, 0) + 1
                    if absent[index] >= GRACE_POLLS:  # ended (or gone) without a result
                        failed[index] = _log_of(handle)
                        why[index] = (
                            f"SLURM ended it as {state}, without a result"
                            if state
                            else "it left the queue without a result (cancelled, out of time or killed)"
                        )
                        del open_tasks[index]
                        advance(1)
                done = len(jobs) - len(open_tasks) - len(failed)
                reasons = sorted({r for r in pending if r})
                line = (
                    f"job array {array}: {len(pending)} pending"
                    f"{' (' + ', '.join(reasons) + ')' if reasons else ''}, {running} running, {done} done"
                    f"{f', {len(failed)} failed' if failed else ''}"
                )
                if line != last_line and open_tasks:
                    reporter.info(line)
                    last_line = line
                next_poll = time.monotonic() + (2.0 if absent else interval)
                interval = min(interval * 2, SLURM_POLL[1])
            if not open_tasks:
                break
            if config.max_wait_s is not None and time.monotonic() - started > config.max_wait_s:
                raise NegalignError(
                    f"stopped waiting after --max-wait; job array {array} keeps running ({last_line}): "
                    "when it has finished, run this command again (finished shards are skipped) or "
                    "`negalign merge`"
                )
            time.sleep(1.0)
    return failed
