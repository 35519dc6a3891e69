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
    o.finish(result, out, manifest["stage"])
