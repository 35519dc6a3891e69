"""`negalign merge` and `negalign launch`: sharded runs of `embed images` and `cam`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout

MERGE_EXAMPLE = (
    "Example: negalign embed images --images val.csv --shard 0/2 --shards-dir runs/val; "
    "(same with --shard 1/2); negalign merge runs/val --out emb/val"
)


@guarded
def merge(
    shards_dir: Annotated[
        Path,
        typer.Argument(help="The --shards-dir of a sharded `embed images` or `cam` run.", show_default=False),
    ],
    out: o.Out = None,
    cache_dir: o.CacheDir = None,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Assemble the shards of a finished sharded run into the artifact one unsharded run would
    write (same cache key, byte-identical files), with no model and no recomputation. Refuses while
    a shard is missing, and names the shards to rerun. The merged artifact goes to --cache-dir (the
    shards' own caches stay in their folders)."""
    _merge(shards_dir, out, cache_dir, verbose, quiet)


def _merge(shards_dir: Path, out, cache_dir, verbose: int, quiet: bool, expected=None, ignore=()) -> None:
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.stages.shards import merge_shards, read_plan

    root = o.cache_root(cache_dir)
    report = o.reporter(verbose, quiet)
    result = merge_shards(shards_dir, Workspace.open(root), report, expected, ignore)
    manifest = result.artifact.manifest
    c = manifest["counts"]
    rows = c.get("embedded", c.get("processed", 0))
    shards = read_plan(shards_dir).shards  # this run's, not a cached artifact's earlier merge
    stdout().print(
        f"{manifest['stage']} {result.artifact.key[:12]}: merged {shards} "
        f"shard(s), {rows} of {c.get('images', 0)} images, {c.get('skipped', 0)} skipped"
        f"{o.duplicates_note(c)}{' (cache hit)' if result.hit else ''}"
    )
    o.finish(result, out, manifest["stage"], report)


LAUNCH_EXAMPLE = (
    "Example: negalign launch embed images --images val.csv --model ViT-B-16 --pretrained w.pt "
    "--device cuda --shards 8 --shards-dir runs/val --executor slurm --partition gpu --account proj1 "
    "--time 04:00:00 --out emb/val"
)
STAGE_COMMANDS = {"embed": ["embed", "images"], "cam": ["cam"]}
# resolved by each shard for its own device (auto: torch on CUDA, PIL elsewhere), so the launcher's
# own check, made on this machine's CPU, cannot know it
DEVICE_PARAMS = ("decoder",)


@guarded
def launch(
    ctx: typer.Context,
    stage: Annotated[
        str,
        typer.Argument(
            help="embed (= embed images) or cam; then that command's own options, passed to every shard.",
            show_default=False,
        ),
    ],
    shards: Annotated[int, typer.Option("--shards", min=1, help="Number of shards K.")],
    shards_dir: Annotated[
        Path,
        typer.Option(
            "--shards-dir",
            help="Folder the shards share (plan, shard folders with their own caches, logs/).",
            show_default=False,
        ),
    ],
    executor: Annotated[
        str, typer.Option("--executor", help="local (processes on this machine) or slurm (a job array).")
    ] = "local",
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            min=1,
            help="local: shards at a time (default: one per GPU, else 1).",
            show_default=False,
        ),
    ] = None,
    array_parallelism: Annotated[
        int, typer.Option("--array-parallelism", min=1, help="slurm: array tasks running at once.")
    ] = 64,
    time_limit: Annotated[
        str,
        typer.Option(
            "--time", help="Time limit of one shard, in SLURM's formats: MM, HH:MM:SS or D-HH:MM:SS."
        ),
    ] = "1-00:00:00",
    gpus_per_shard: Annotated[
        int | None,
        typer.Option(
            "--gpus-per-shard",
            min=0,
            help="GPUs per shard (default: 1 when the shards' --device is cuda, or is auto on a machine "
            "with a GPU; else none).",
            show_default=False,
        ),
    ] = None,
    cpus_per_shard: Annotated[
        int | None, typer.Option("--cpus-per-shard", min=1, help="slurm: CPUs per task.", show_default=False)
    ] = None,
    mem_gb: Annotated[
        int | None, typer.Option("--mem-gb", min=1, help="slurm: memory per task (GB).", show_default=False)
    ] = None,
    partition: Annotated[
        str | None, typer.Option("--partition", help="slurm: the partition.", show_default=False)
    ] = None,
    account: Annotated[
        str | None, typer.Option("--account", help="slurm: the account to charge.", show_default=False)
    ] = None,
    qos: Annotated[
        str | None, typer.Option("--qos", help="slurm: the quality of service.", show_default=False)
    ] = None,
    job_name: Annotated[
        str | None,
        typer.Option(
            "--job-name",
            help="slurm: the array's name (default: negalign-STAGE, e.g. negalign-cam).",
            show_default=False,
        ),
    ] = None,
    gres: Annotated[
        str | None,
        typer.Option("--gres", help="slurm: generic resources, e.g. gpu:a100:1.", show_default=False),
    ] = None,
    constraint: Annotated[
        str | None, typer.Option("--constraint", help="slurm: node features, e.g. a100.", show_default=False)
    ] = None,
    exclude: Annotated[
        str | None, typer.Option("--exclude", help="slurm: nodes to avoid.", show_default=False)
    ] = None,
    mail_type: Annotated[
        str | None, typer.Option("--mail-type", help="slurm: mail on, e.g. END,FAIL.", show_default=False)
    ] = None,
    mail_user: Annotated[
        str | None, typer.Option("--mail-user", help="slurm: mail to.", show_default=False)
    ] = None,
    setup: Annotated[
        list[str] | None,
        typer.Option(
            "--setup",
            help="slurm: a shell line run before each shard, e.g. 'module load cuda' (repeatable).",
            show_default=False,
        ),
    ] = None,
    slurm_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--slurm-arg",
            help="slurm: any other sbatch setting KEY=VALUE (repeatable), e.g. reservation=r1.",
            show_default=False,
        ),
    ] = None,
    max_wait: Annotated[
        str | None,
        typer.Option(
            "--max-wait",
            help="slurm: stop waiting after this long (MM or HH:MM:SS); the array keeps running.",
            show_default=False,
        ),
    ] = None,
    out: o.Out = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            envvar=o.CACHE_ENV,
            help=f"Cache of the merge (else ${o.CACHE_ENV}, else ./.negalign-cache). Each shard keeps its "
            "own cache in its folder under --shards-dir.",
            show_default=False,
        ),
    ] = None,
    no_merge: Annotated[bool, typer.Option("--no-merge", help="Run the shards only; merge later.")] = False,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Run `embed images` or `cam` as K shards through submitit (local processes by default, a SLURM
    job array with --executor slurm), wait, and merge them into --out. The command, its options and
    its image list are checked here first, against the plan of an earlier launch into the same
    --shards-dir too. Shards done under that plan are not run again, so rerunning the same command
    after a failure runs only what is missing; a requeued or preempted shard is waited for and
    resumes from its cache. Every option after STAGE that `launch` does not know goes to the shards.
    The launcher must outlive the array (or use --no-merge and `negalign merge` later)."""
    from negalign_cli.errors import NegalignError
    from negalign_cli.stages.launch import EXECUTORS, LaunchConfig, parse_time, visible_gpus
    from negalign_cli.stages.launch import launch as run_launch
    from negalign_cli.stages.shards import check_plan

    if stage not in STAGE_COMMANDS:
        raise NegalignError(f"launch runs {' or '.join(STAGE_COMMANDS)}, not {stage!r}")
    if executor not in EXECUTORS:
        raise NegalignError(f"--executor must be {' or '.join(EXECUTORS)}, got {executor!r}")
    passed = list(ctx.args)
    if stage == "embed" and passed[:1] == ["images"]:
        passed = passed[1:]
    for refused in ("--shard", "--shards-dir", "--out", "--viz"):
        if refused in passed or any(a.startswith(refused + "=") for a in passed):
            raise NegalignError(f"{refused} is launch's to set: give it to launch, not to the shards")
    o.check_passed_model(passed)  # a wrong --model fails here, not in every shard
    extra = {}
    for item in slurm_arg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NegalignError(f"--slurm-arg must look like KEY=VALUE, got {item!r}")
        extra[key] = value
    timeout_min = -(-parse_time(time_limit) // 60)  # SLURM counts whole minutes
    max_wait_s = None if max_wait is None else float(parse_time(max_wait, "--max-wait"))
    device = _passed_value(passed, "--device") or os.environ.get("NEGALIGN_DEVICE", "auto")
    if gpus_per_shard is None and executor == "slurm":
        gpus_per_shard = 1 if device.startswith("cuda") or (device == "auto" and visible_gpus()) else 0
    report = o.reporter(verbose, quiet)
    plan = _check_locally(
        [*STAGE_COMMANDS[stage], *passed, *(["--quiet"] if quiet else [])], shards_dir, shards
    )
    check_plan(shards_dir, plan, DEVICE_PARAMS)
    config = LaunchConfig(
        executor=executor,
        parallel=parallel,
        array_parallelism=array_parallelism,
        timeout_min=timeout_min,
        gpus_per_shard=gpus_per_shard,
        cpus_per_shard=cpus_per_shard,
        mem_gb=mem_gb,
        partition=partition,
        account=account,
        qos=qos,
        job_name=job_name,
        gres=gres,
        constraint=constraint,
        exclude=exclude,
        mail_type=mail_type,
        mail_user=mail_user,
        setup=tuple(setup or ()),
        slurm_extra=extra,
        max_wait_s=max_wait_s,
        verbose=verbose > 0,
    )
    result = run_launch([*STAGE_COMMANDS[stage], *passed], shards_dir, shards, config, report)
    if result.failed:
        first = min(result.failed)
        told = result.errors.get(first)
        detail = f"{told.removeprefix('error:').strip()}" if told else result.why.get(first, "it failed")
        others = f" and {len(result.failed) - 1} more" if len(result.failed) > 1 else ""
        advice = (
            "fix, then rerun the same command"
            if result.errors
            else "run the same command again (or see the log)"
        )
        raise NegalignError(
            f"{len(result.failed)} of {shards} shard(s) failed: shard {first}/{shards}: {detail} "
            f"(log {result.failed[first]}){others}; {advice}: finished shards are skipped"
        )
    stdout().print(
        f"{len(result.submitted)} shard(s) ran, {len(result.skipped)} were done already ({shards_dir})"
    )
    if not no_merge:
        _merge(shards_dir, out, cache_dir, verbose, quiet, expected=plan, ignore=DEVICE_PARAMS)


def _passed_value(args: list[str], name: str) -> str | None:
    """The last value of option ``name`` among the shards' arguments."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _check_locally(argv: list[str], shards_dir: Path, count: int):
    """Run the shards' command here as shard 0, on the CPU, up to its plan: its options, its image
    list and its model are checked before anything is submitted. Returns the plan. Imports no
    torch: a model shard 0's fingerprint table lacks is built (and its row written) by a child."""
    from typer.main import get_command

    from negalign_cli.cli.app import app
    from negalign_cli.errors import NegalignError
    from negalign_cli.modelref import fingerprint_elsewhere
    from negalign_cli.stages.shards import Planned, Shard, plan_only, shard_cache

    cache = shard_cache(shards_dir, Shard(0, count))
    args = [*argv, "--shard", f"0/{count}", "--shards-dir", str(shards_dir), "--cache-dir", str(cache)]
    command = get_command(app)
    try:  # a model shard 0's cache does not know yet is built in a child process: no torch here
        with plan_only(), fingerprint_elsewhere():
            code = command.main([*args, "--device", "cpu"], prog_name="negalign", standalone_mode=False)
    except Planned as planned:
        return planned.plan
    except typer.exceptions.TyperException as exc:  # a usage error: Typer's own click
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise NegalignError(f"the shards' options: {message}") from None
    if code:  # the command printed its own one-line error
        raise typer.Exit(code)
    raise NegalignError(f"{' '.join(argv[:2])} did not reach its plan: please report it")
