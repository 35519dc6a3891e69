"""`negalign report`: an `evaluate` folder as HTML (self-contained), Markdown and LaTeX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout
from negalign_cli.defaults import DEFAULT_REPORT_CELLS

EXAMPLE = "Example: negalign report results --out report; then open report/report.html"


@guarded
def report(
    results_dir: Annotated[
        Path,
        typer.Argument(
            help="An `evaluate --out` folder (results.json and its manifest.json).", show_default=False
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write report.html, report.md, report.tex and figures/ "
            "[default: RESULTS_DIR/report].",
            show_default=False,
        ),
    ] = None,
    cells: Annotated[
        int,
        typer.Option(
            "--cams", min=1, help="CAM overlays per set of the most, and of the least, ID-like images."
        ),
    ] = DEFAULT_REPORT_CELLS,
    cache_dir: o.CacheDir = None,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Render an evaluation: the method table in both metric conventions (per OOD set, per
    --ood-group and the mean, best values marked), the λ curve, ROC curves of every method, score
    histograms, a grid of CAM overlays of the most and least ID-like images of every set (with the
    true mask on the toy world) and the provenance (model fingerprint, data digests, settings,
    library versions). The score files and `cam` folders are found through the manifests."""
    from negalign_cli.cache.store import ArtifactStore
    from negalign_cli.stages.report import build_report

    root = o.cache_root(cache_dir)  # side files (matplotlib's cache) go under the cache
    store = ArtifactStore(root)  # the figures are cached like any output
    try:
        result = build_report(
            results_dir,
            out,
            cells=cells,
            reporter=o.reporter(verbose, quiet),
            stat_cache=store.stat_cache,  # unchanged score files are not read again
            store=store,  # a figure drawn before from the same data is copied, not drawn
        )
    finally:
        store.close()
    stdout().print(f"wrote {', '.join(p.name for p in result.written)} to {result.out}")
