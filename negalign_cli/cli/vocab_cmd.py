"""`negalign mine-negatives` and `negalign split-vocab`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from negalign_cli import defaults
from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout
from negalign_cli.defaults import DEFAULT_EXCLUDE, DEFAULT_TAU, DEFAULT_TOP_P

MINE_EXAMPLE = "Example: negalign mine-negatives --classes waterbird --model negalign-tiny-test --out d"
SPLIT_EXAMPLE = (
    "Example: negalign split-vocab --nouns neg_labels_noun.txt --adjs neg_labels_adj.txt "
    "--model negalign-tiny-test --out d"
)


@guarded
def mine(
    classes: Annotated[
        str, typer.Option("--classes", "-c", help="Class preset or a file, one class a line.")
    ],
    model: o.Model = defaults.DEFAULT_MODEL,
    pretrained: o.Pretrained = None,
    lexicon: Annotated[
        Path | None,
        typer.Option(
            "--lexicon",
            help="Folder of noun.*.txt / adj.*.txt files (default: bundled WordNet 3.0).",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        str, typer.Option("--exclude", help="Comma-separated lexicon files to skip ('' for none).")
    ] = ",".join(DEFAULT_EXCLUDE),
    top_p: Annotated[
        float, typer.Option("--top-p", help="Share of nouns and of phrases kept.")
    ] = DEFAULT_TOP_P,
    quantile: Annotated[
        float, typer.Option("--quantile", help="Quantile of the cosines to the ID classes.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the CSP suffix draw.")] = 0,
    out: o.Out = None,
    cache_dir: o.CacheDir = None,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    batch_size: o.BatchSize = 1024,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Mine negative labels from WordNet as NegLabel does in its CSP form (NegRefine's recipe): nouns
    and adjective phrases least similar to the ID classes. Writes neg_labels_noun.txt,
    neg_labels_adj.txt and mining_scores.csv."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.inputs.lexicon import load_lexicon
    from negalign_cli.inputs.words import load_classes
    from negalign_cli.stages.vocab import mine_negatives

    rt = o.runtime(cache_dir, device, precision, batch_size)
    report = o.reporter(verbose, quiet)
    class_list = load_classes(classes, report)
    words = load_lexicon(lexicon)
    loaded = o.load(
        model,
        pretrained,
        rt,
        report,
        f"; lexicon {words.source} ({len(words)} words in {len(words.files)} files)",
    )
    excluded = tuple(x.strip().removesuffix(".txt") for x in exclude.split(",") if x.strip())
    result = mine_negatives(
        loaded,
        class_list,
        words,
        Workspace.open(rt.cache_dir),
        exclude=excluded,
        top_p=top_p,
        quantile=quantile,
        seed=seed,
        batch_size=rt.batch_size,
        reporter=report,
    )
    c = result.artifact.manifest["counts"]
    hit = " (cache hit)" if result.hit else ""
    nouns = f"{c['kept_nouns']} of {c['candidate_nouns']} nouns"
    phrases = f"{c['kept_adjectives']} of {c['candidate_adjectives']} adjective phrases"
    dropped = f"{c['dropped_as_class_name']} nouns equal to a class dropped"
    stdout().print(f"mine-negatives {result.artifact.key[:12]}{hit}: kept {nouns} and {phrases} ({dropped})")
    o.finish(result, out, "mine-negatives", report)


@guarded
def split(
    nouns: Annotated[
        str | None,
        typer.Option(
            "--nouns", help="Noun negatives: a file or negrefine-imagenet-noun.", show_default=False
        ),
    ] = None,
    adjs: Annotated[
        str | None,
        typer.Option(
            "--adjs", help="Adjective-phrase negatives: a file or negrefine-imagenet-adj.", show_default=False
        ),
    ] = None,
    model: o.Model = defaults.DEFAULT_MODEL,
    pretrained: o.Pretrained = None,
    tau: Annotated[
        float, typer.Option("--tau", help="obj if r ≥ tau, bg if r ≤ −tau, else ambiguous.")
    ] = DEFAULT_TAU,
    obj_templates: Annotated[
        str | None,
        typer.Option(
            "--obj-templates",
            help="Object templates: a set name or a file (default: object).",
            show_default=False,
        ),
    ] = None,
    bg_templates: Annotated[
        str | None,
        typer.Option(
            "--bg-templates",
            help="Background templates: a set name or a file (default: background).",
            show_default=False,
        ),
    ] = None,
    out: o.Out = None,
    cache_dir: o.CacheDir = None,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    batch_size: o.BatchSize = 1024,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Split negative labels into object-leaning, background-leaning and ambiguous words with the
    NegAlign word classifier: r(w) = cos(e, E_obj) − cos(e, E_bg). Writes split_scores.csv,
    neg_obj.txt, neg_bg.txt, neg_ambiguous.txt. A new --tau reuses the cached scores."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.inputs.words import load_negatives, load_templates
    from negalign_cli.stages.vocab import VocabEntry, split_scores, split_vocab, summarise_split

    if tau < 0:
        raise typer.BadParameter("must be ≥ 0", param_hint="--tau")
    rt = o.runtime(cache_dir, device, precision, batch_size)
    report = o.reporter(verbose, quiet)
    entries = [
        VocabEntry(load_negatives(path, report), source)
        for path, source in ((nouns, "noun"), (adjs, "adj"))
        if path is not None
    ]
    if not entries:
        raise typer.BadParameter("give --nouns, --adjs or both", param_hint="--nouns/--adjs")
    object_set = load_templates(obj_templates) if obj_templates else None
    background_set = load_templates(bg_templates) if bg_templates else None
    loaded = o.load(model, pretrained, rt, report)
    workspace = Workspace.open(rt.cache_dir)
    scores = split_scores(
        loaded,
        entries,
        workspace,
        object_templates=object_set,
        background_templates=background_set,
        batch_size=rt.batch_size,
        reporter=report,
    )
    truncated = scores.artifact.manifest["counts"].get("truncated_prompts", 0)
    if truncated:
        report.warn(f"{truncated} prompt(s) were longer than the model's context and were cut at the end")
    result = split_vocab(scores.artifact, workspace, tau=tau, reporter=report)
    _render_summary(summarise_split(result.artifact), tau)
    o.finish(result, out, "split-vocab", report)


def _render_summary(summary, tau: float) -> None:
    from rich.table import Table

    from negalign_cli.defaults import ROLES

    table = Table(title=f"roles at tau = {tau:g}", title_justify="left")
    table.add_column("source")
    table.add_column("entries", justify="right")
    for role in ROLES:
        table.add_column(role, justify="right")
    for row in summary.table.itertuples(index=False):
        row = row._asdict()
        table.add_row(
            row["source"], str(row["total"]), *(f"{row[r]} ({row[f'{r}_pct']:.1f}%)" for r in ROLES)
        )
    stdout().print(table)
    for title, frame in (
        ("most object-leaning", summary.most_object),
        ("most background-leaning", summary.most_background),
    ):
        words = Table(title=title, title_justify="left")
        for column in ("word", "source", "r"):
            words.add_column(column, justify="right" if column == "r" else "left")
        for item in frame.itertuples(index=False):
            words.add_row(str(item.word), item.source, f"{item.r_score:+.4f}")
        stdout().print(words)
