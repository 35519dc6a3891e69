"""`negalign models`: the architectures negalign can build."""

from __future__ import annotations

from typing import Annotated

import typer

from negalign_cli.cli.console import guarded, stdout

EXAMPLE = "Example: negalign models --filter ViT-B"


@guarded
def models(
    filter_text: Annotated[
        str | None,
        typer.Option("--filter", "-f", help="Only names containing this text.", show_default=False),
    ] = None,
    names_only: Annotated[bool, typer.Option("--names", help="One name a line, nothing else.")] = False,
) -> None:
    """List model architectures: the project's own (no weights needed) and open_clip's, with the
    open_clip weight tags each one knows."""
    from rich.table import Table

    from negalign_cli.model_names import list_architectures  # open_clip's names and tags, read without torch
    from negalign_cli.modelref import PROJECT_MODELS  # torch-free, as the names and tags

    infos = [
        i
        for i in list_architectures(PROJECT_MODELS)
        if not filter_text or filter_text.lower() in i.name.lower()
    ]
    if names_only:
        for info in infos:
            typer.echo(info.name)
        return
    table = Table(title=f"{len(infos)} architectures", title_justify="left")
    table.add_column("model", style="bold")
    table.add_column("from")
    table.add_column("needs --pretrained")
    table.add_column("open_clip tags / notes", overflow="fold")
    for info in infos:
        notes = info.description or ", ".join(info.tags) or "no tags: pass a checkpoint path or 'random'"
        table.add_row(info.name, info.source, "yes" if info.needs_weights else "no", notes)
    stdout().print(table)
