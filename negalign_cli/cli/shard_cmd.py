"""`negalign merge` and `negalign launch`: sharded runs of `embed images` and `cam`."""

from __future__ import annotations

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
    a shard is missing, and names the shards to rerun."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.stages.shards import merge_shards

    root = o.cache_root(cache_dir)
    report = o.reporter(verbose, quiet)
    result = merge_shards(shards_dir, Workspace.open(root), report)
    manifest = result.artifact.manifest
    c = manifest["counts"]
    rows = c.get("embedded", c.get("processed", 0))
    shards = manifest.get("merged_from", {}).get("shards", "?")
    stdout().print(
        f"{manifest['stage']} {result.artifact.key[:12]}: merged {shards} "
        f"shard(s), {rows} of {c.get('images', 0)} images, {c.get('skipped', 0)} skipped"
        f"{o.duplicates_note(c)}{' (cache hit)' if result.hit else ''}"
    )
    o.finish(result, out, manifest["stage"], report)


LAUNCH_EXAMPLE = (
    "Example: negalign launch embed images --images val.csv --model ViT-B-16 --pretrained w.pt "
    "--shards 8 --shards-dir runs/val --executor slurm --partition gpu --out emb/val"
)
STAGE_COMMANDS = {"embed": ["embed", "images"], "cam": ["cam"]}


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
            "--shards-dir", help="Folder the shards share (plan, shard folders, logs).", show_default=False
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
    timeout_min: Annotated[
        int, typer.Option("--time", min=1, help="Time limit of one shard, in minutes.")
    ] = 24 * 60,
    gpus_per_shard: Annotated[
        int | None,
        typer.Option(
            "--gpus-per-shard",
            min=0,
            help="GPUs per shard (default: 1 where there are GPUs).",
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
    slurm_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--slurm-arg",
            help="slurm: an extra sbatch setting KEY=VALUE (repeatable), e.g. account=proj1.",
            show_default=False,
        ),
    ] = None,
    out: o.Out = None,
    no_merge: Annotated[bool, typer.Option("--no-merge", help="Run the shards only; merge later.")] = False,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Run `embed images` or `cam` as K shards through submitit (local processes by default, a SLURM
    job array with --executor slurm), wait, and merge them into --out. Shards done under the frozen
    plan are not run again, so rerunning the same command after a failure or a preemption runs only
    what is missing. Every option after STAGE that `launch` does not know goes to the shards."""
    from negalign_cli.errors import NegalignError
    from negalign_cli.stages.launch import EXECUTORS, LaunchConfig
    from negalign_cli.stages.launch import launch as run_launch

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
    config = LaunchConfig(
        executor=executor,
        parallel=parallel,
        array_parallelism=array_parallelism,
        timeout_min=timeout_min,
        gpus_per_shard=gpus_per_shard,
        cpus_per_shard=cpus_per_shard,
        mem_gb=mem_gb,
        partition=partition,
        slurm_extra=extra,
    )
    report = o.reporter(verbose, quiet)
    result = run_launch([*STAGE_COMMANDS[stage], *passed], shards_dir, shards, config, report)
    if result.failed:
        shown = "; ".join(f"shard {i}: log {log}" for i, log in sorted(result.failed.items())[:3])
        raise NegalignError(
            f"{len(result.failed)} of {shards} shard(s) failed ({shown}); run the same command again: "
            "finished shards are skipped"
        )
    stdout().print(
        f"{len(result.submitted)} shard(s) ran, {len(result.skipped)} were done already ({shards_dir})"
    )
    if not no_merge:
        merge(shards_dir, out=out, verbose=verbose, quiet=quiet)
