"""`negalign cache ls|info|gc`: look at and prune the cache."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from negalign_cli.cli.console import guarded, stdout
from negalign_cli.cli.options import CacheDir, cache_root

if TYPE_CHECKING:
    from negalign_cli.cache.workspace import Workspace

app = typer.Typer(
    help="Show and prune the cache (artifacts and per-item vectors).",
    epilog="Example: negalign cache ls; negalign cache info 3fa2b1c0; negalign cache gc --dry-run",
    no_args_is_help=True,
)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _workspace(cache_dir) -> Workspace:
    from negalign_cli.cache.workspace import Workspace

    return Workspace.open(cache_root(cache_dir))


@app.command("ls", epilog="Example: negalign cache ls --cache-dir ~/.negalign")
@guarded
def ls(
    cache_dir: CacheDir = None,
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage.", show_default=False)] = None,
) -> None:
    """List cached artifacts (newest first) and the per-item vector namespaces."""
    workspace = _workspace(cache_dir)
    records = [r for r in workspace.store.records() if stage is None or r["stage"] == stage]
    namespaces = workspace.items.namespaces()
    if not records and not namespaces:
        stdout().print(f"cache {workspace.root} is empty")
        return
    table = Table(title=f"{len(records)} artifact(s) in {workspace.root}", title_justify="left")
    for column in ("stage", "key", "created (UTC)", "size"):
        table.add_column(column, no_wrap=True)
    table.add_column("params", ratio=1)
    for record in records:
        created = record["created"][:16].replace("T", " ")
        table.add_row(
            record["stage"], record["key"][:12], created, _size(record["bytes"]), record["params_summary"]
        )
    stdout().print(table)
    if namespaces:
        items = Table(title="per-item vectors", title_justify="left")
        for column in ("kind", "namespace", "model", "dim", "dtype", "vectors", "last used (UTC)"):
            items.add_column(column, justify="right" if column == "vectors" else "left")
        for info in namespaces:
            used = datetime.fromtimestamp(info.last_used, timezone.utc).strftime("%Y-%m-%d %H:%M")
            items.add_row(
                info.kind, info.id[:12], info.model[:16], str(info.dim), info.dtype, str(info.count), used
            )
        stdout().print(items)
        stdout().print(f"{workspace.items.count()} vector(s) in {len(namespaces)} namespace(s)")


@app.command("info", epilog="Example: negalign cache info 3fa2b1c0")
@guarded
def info(
    key: Annotated[str, typer.Argument(help="Artifact key or a unique prefix of it (4+ characters).")],
    cache_dir: CacheDir = None,
) -> None:
    """Print an artifact's manifest: parameters, input digests, output files, counts, timing."""
    workspace = _workspace(cache_dir)
    full = workspace.store.resolve(key)
    manifest = workspace.store.manifest(full)
    record = workspace.store.index[full]
    stdout().print(f"[bold]{manifest['stage']}[/] {full}\n{workspace.root / record['path']}")
    stdout().print_json(json.dumps(manifest))


@app.command("gc", epilog="Example: negalign cache gc --items-older-than 30d --dry-run")
@guarded
def gc(
    cache_dir: CacheDir = None,
    items_older_than: Annotated[
        str | None,
        typer.Option(
            "--items-older-than",
            help="Also drop the per-item vectors of namespaces (model + settings) unused for this long "
            "(90m, 12h, 30d).",
            show_default=False,
        ),
    ] = None,
    items_model: Annotated[
        str | None,
        typer.Option(
            "--items-model",
            help="Also drop per-item vectors of models whose fingerprint starts so.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
) -> None:
    """Remove what nothing reaches: artifact folders missing from the index, index entries whose
    folder is gone, temporary folders of runs that died; optionally old or per-model vectors."""
    from negalign_cli.cache.workspace import parse_age

    age = parse_age(items_older_than) if items_older_than else None
    workspace = _workspace(cache_dir)
    report = workspace.gc(items_older_than=age, items_model=items_model, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    if report.reindexed_artifacts:
        again = "would index again" if dry_run else "indexed again"
        stdout().print(
            f"{again}: {len(report.reindexed_artifacts)} intact artifact(s) missing from the index"
        )
    stdout().print(
        f"{verb}: {len(report.unreachable_artifacts)} damaged unindexed artifact(s), "
        f"{len(report.orphan_temp_folders)} orphaned temp folder(s), "
        f"{len(report.dangling_index_entries)} dangling index entr(y/ies), "
        f"{report.items_removed} per-item vector(s); {_size(report.freed_bytes)} of files"
    )
    for name in report.unreachable_artifacts + report.orphan_temp_folders:
        stdout().print(f"  {name}")


@app.command("repair", epilog="Example: negalign cache repair --cache-dir ~/.negalign")
@guarded
def repair(cache_dir: CacheDir = None) -> None:
    """Mend a damaged cache: rebuild the artifact index from the artifact folders that verify,
    move a damaged vector store aside and keep every vector that can still be read (the rest is
    recomputed by the next run that needs it)."""
    workspace = _workspace(cache_dir)
    report = workspace.repair()
    if report.index_rebuilt:
        stdout().print(
            f"index rebuilt: {report.artifacts_indexed} artifact(s) indexed, "
            f"{report.artifacts_damaged} damaged folder(s) left out (cache gc removes them)"
        )
    else:
        stdout().print(f"index intact; {report.artifacts_indexed} unindexed intact artifact(s) indexed again")
    items = report.items
    if items.vectors_kept is None:
        stdout().print("per-item vectors intact")
    elif items.vectors_lost is None:
        stdout().print(
            "per-item vectors: the store could not be read at all and was set aside; every vector "
            "will be recomputed by the next run that needs it"
        )
    else:
        why = f"; the index was rebuilt because {items.index_problem}" if items.index_problem else ""
        stdout().print(
            f"per-item vectors: {items.vectors_kept} kept, {items.vectors_lost} unreadable "
            f"(recomputed by the next run that needs them){why}"
        )
    if items.records_kept is not None:
        stdout().print(f"namespace records: {items.records_kept} kept")
