"""`negalign score` and `negalign evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from negalign_cli import defaults
from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout
from negalign_cli.cli.render import render_results
from negalign_cli.errors import NegalignError

SCORE_EXAMPLE = (
    "Example: negalign score --images-dir emb/id --classes waterbird --negatives-split split "
    "--role-aware --model negalign-tiny-test --out scores/id"
)
EVALUATE_EXAMPLE = (
    "Example: negalign evaluate --id scores/id/scores.parquet --ood placesbg=scores/placesbg/scores.parquet "
    "--compare --lambda sweep --out results"
)


@guarded
def score(
    images_dir: Annotated[
        str,
        typer.Option("--images-dir", help="An `embed images` or `cam` --out folder, or its artifact key."),
    ],
    classes: Annotated[
        str, typer.Option("--classes", "-c", help="Class preset or a file, one class a line.")
    ],
    negatives_split: Annotated[
        Path | None,
        typer.Option(
            "--negatives-split",
            help="A split-vocab --out folder (roles for M2 and P_align).",
            show_default=False,
        ),
    ] = None,
    nouns: Annotated[
        str | None, typer.Option("--nouns", help="Noun negatives (without a split).", show_default=False)
    ] = None,
    adjs: Annotated[
        str | None,
        typer.Option("--adjs", help="Adjective-phrase negatives (without a split).", show_default=False),
    ] = None,
    cam_dir: Annotated[
        str | None,
        typer.Option(
            "--cam-dir", help="A `cam` --out folder (default: look in --images-dir).", show_default=False
        ),
    ] = None,
    model: o.Model = defaults.DEFAULT_MODEL,
    pretrained: o.Pretrained = None,
    groups: Annotated[int, typer.Option("--groups", min=1, help="NegLabel groups G.")] = 100,
    group_seed: Annotated[
        int | None,
        typer.Option("--group-seed", help="Seed of the group permutation [default: 0].", show_default=False),
    ] = None,
    group_seeds: Annotated[
        str | None,
        typer.Option(
            "--group-seeds",
            help="Score once per seed, e.g. 0,1,2 (each seed cached on its own) into one scores.parquet: "
            "`evaluate` then shows the grouped methods as mean ± std over the seeds.",
            show_default=False,
        ),
    ] = None,
    neg_topk: Annotated[
        int | None,
        typer.Option("--neg-topk", min=1, help="M1: the K largest negative logits only.", show_default=False),
    ] = None,
    role_aware: Annotated[
        bool, typer.Option("--role-aware", help="M2: object-leaning negatives for S*.")
    ] = False,
    include_ambiguous: Annotated[
        bool, typer.Option("--role-aware-include-ambiguous", help="M2 with ambiguous words too.")
    ] = False,
    multimatch: Annotated[
        bool, typer.Option("--multimatch/--no-multimatch", help="NegRefine multi-matching.")
    ] = True,
    mcm_temperature: Annotated[
        float, typer.Option("--mcm-temperature", help="MCM softmax temperature (a finite number above 0).")
    ] = 1.0,
    invalid_cam: Annotated[
        str,
        typer.Option(
            "--invalid-cam",
            help="P_align where the CAM is invalid: fallback (pool the whole image as background), "
            "zero (P_align = 0, which rewards the row) or exclude (S_final undefined; evaluate drops it).",
        ),
    ] = defaults.DEFAULT_INVALID_CAM,
    out: o.Out = None,
    cache_dir: o.CacheDir = None,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    batch_size: o.BatchSize = 1024,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Score every image: MCM, NegLabel (plain and *), NegRefine multi-matching, and the background
    terms (s_bg_pos, s_bg_neg, P_align) when CAM outputs exist. Writes scores.parquet. M3 (z-scoring)
    happens in `evaluate` (--scale-stabilize), where the ID set is known."""
    from negalign_cli.cache.statcache import STAT_CACHE, StatCache
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.compute.score_config import ScoreConfig
    from negalign_cli.inputs.words import load_classes, load_negatives
    from negalign_cli.stages.scoring import (
        check_cam_inputs,
        check_request,
        check_seeds,
        open_image_set,
        parse_group_seeds,
        resolve_folder,
        score_images,
        score_seeds,
    )
    from negalign_cli.stages.vocab import negatives_from_lists, negatives_from_split

    rt = o.runtime(cache_dir, device, precision, batch_size)
    report = o.reporter(verbose, quiet)
    seeds = parse_group_seeds(group_seeds) if group_seeds is not None else None
    if seeds is not None and group_seed is not None:
        raise NegalignError("give either --group-seed or --group-seeds, not both")
    if negatives_split is not None and (nouns or adjs):
        raise NegalignError("give either --negatives-split or --nouns/--adjs, not both")
    vocab = (
        negatives_from_split(negatives_split, StatCache(rt.cache_dir / STAT_CACHE))
        if negatives_split is not None
        else negatives_from_lists(
            load_negatives(nouns, report) if nouns else None, load_negatives(adjs, report) if adjs else None
        )
    )
    config = ScoreConfig(
        groups=groups,
        group_seed=seeds[0] if seeds else (group_seed or 0),
        mcm_temperature=mcm_temperature,
        neg_topk=neg_topk,
        role_aware=role_aware or include_ambiguous,
        include_ambiguous=include_ambiguous,
        invalid_cam=invalid_cam,
    )
    workspace = Workspace.open(rt.cache_dir)
    image_set = open_image_set(
        resolve_folder(images_dir, workspace),
        resolve_folder(cam_dir, workspace) if cam_dir else None,
        workspace.stat_cache,  # each file hashed once, or not at all when unchanged
    )
    check_request(vocab, config, has_cam=image_set.has_cam)  # before any weight is loaded
    if seeds is not None:
        check_seeds(config)
    class_list = load_classes(classes, report)
    check_cam_inputs(image_set, class_list)  # the CAM's classes and prompts are these (warnings: below)
    loaded = o.load(model, pretrained, rt, report, f"; {len(vocab.words)} negatives from {vocab.origin}")
    scored = ""
    if seeds is None:
        result = score_images(
            loaded, image_set, class_list, vocab, workspace, config,
            multimatch=multimatch, batch_size=rt.batch_size, reporter=report,
        )  # fmt: skip
    else:
        both = score_seeds(
            loaded, image_set, class_list, vocab, workspace, config, seeds,
            multimatch=multimatch, batch_size=rt.batch_size, reporter=report,
        )  # fmt: skip
        result = both.combined
        scored = ", group seeds " + ", ".join(
            f"{seed} ({r.artifact.key[:12]}{' hit' if r.hit else ''})" for seed, r in both.seeds.items()
        )
    counts = result.artifact.manifest["counts"]
    hit = " (cache hit)" if result.hit else ""
    invalid = (
        f", CAM invalid for {counts['cam_invalid']} (--invalid-cam {invalid_cam})"
        if counts.get("cam_invalid")
        else ""
    )
    stdout().print(
        f"score {result.artifact.key[:12]}{hit}: {counts['images']} images scored{invalid}{scored}"
    )
    folders = {image_set.folder, *filter(None, [image_set.cam_folder])}  # what was read: never replaced
    o.finish(result, out, "score", report, inputs=[p for f in folders for p in f.iterdir() if p.is_file()])


@guarded
def evaluate_command(
    id_file: Annotated[Path, typer.Option("--id", help="ID scores: scores.parquet or any CSV/parquet.")],
    ood: Annotated[list[str], typer.Option("--ood", help="NAME=FILE, repeatable.")],
    ood_groups: Annotated[
        list[str] | None,
        typer.Option(
            "--ood-group",
            help="NAME=SET1,SET2: also report the mean over these --ood sets, repeatable "
            "(OpenOOD: --ood-group near=ssb_hard,ninco --ood-group far=inaturalist,textures,openimage_o).",
            show_default=False,
        ),
    ] = None,
    benchmark: Annotated[
        str | None,
        typer.Option(
            "--benchmark",
            help="A preset (`negalign benchmarks`): groups the --ood sets as it does (near/far), warns "
            "for a set it expects that is missing, and adds its published rows beside this run's "
            "(--metrics neglabel). --ood names match its sets case-insensitively (dtd = Textures).",
            show_default=False,
        ),
    ] = None,
    score_column: Annotated[
        str | None,
        typer.Option("--score", help="Evaluate this one column (any method, any tool).", show_default=False),
    ] = None,
    lambdas: Annotated[
        str | None,
        typer.Option(
            "--lambda",
            help="NegAlign λ: sweep (0,0.5,1,2,5,10), a list 0,1,2 or a value.",
            show_default=False,
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="The method table: MCM, NegLabel, NegRefine, NegLabel* and NegAlign side by side "
            "(default: only the chosen score: --score, else NegAlign, else NegLabel*).",
        ),
    ] = False,
    metrics: Annotated[
        str, typer.Option("--metrics", help="neglabel (ID positive) or openood (OOD positive).")
    ] = ("neglabel"),
    select_on: Annotated[
        str | None,
        typer.Option(
            "--select-lambda-on",
            help="Choose λ on this OOD set (validation), not per set.",
            show_default=False,
        ),
    ] = None,
    scale_stabilize: Annotated[
        bool, typer.Option("--scale-stabilize", help="M3: z-score S* and P_align with ID statistics.")
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration", help="M3 statistics from a file (results.json or JSON).", show_default=False
        ),
    ] = None,
    drop_nonfinite: Annotated[bool, typer.Option("--drop-nonfinite", help="Leave out NaN/inf rows.")] = False,
    allow_mixed_settings: Annotated[
        bool,
        typer.Option(
            "--allow-mixed-settings",
            help="Compare score files made with different score settings, classes or negatives.",
        ),
    ] = False,
    id_group: Annotated[
        list[str] | None,
        typer.Option(
            "--id-group",
            help="NAME=FILE, repeatable: an ID subgroup (a manifest or folder of images scored in --id, "
            "matched by path); reports the share of it each method rejects at the threshold keeping 95% "
            "of all ID images. Example: --id-group minority=toy/groups/minority.csv",
            show_default=False,
        ),
    ] = None,
    out: o.Out = None,
    cache_dir: o.CacheDir = None,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Metrics (AUROC, FPR@95, AUPR-In, AUPR-Out) of ID against each OOD set for the chosen score
    (--score; else NegAlign = S* + λ·P_align with a λ sweep from the stored components; else
    NegLabel*), or the method table with --compare. Writes results.json, metrics.csv, table.csv
    (the paper-style table), roc.png and score_hist.png.

    Example (the MOS suite beside the published MCM/NegLabel/NegRefine rows):

    negalign evaluate --id imagenet.parquet --ood iNaturalist=inat.parquet --ood SUN=sun.parquet
    --ood Places=places.parquet --ood Textures=dtd.parquet --benchmark imagenet-mos --compare
    --out results/mos"""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.stages import files
    from negalign_cli.stages.evaluation import (
        EvaluateRequest,
        evaluate,
        parse_lambdas,
        parse_ood,
        parse_ood_groups,
    )

    report = o.reporter(verbose, quiet)
    request = EvaluateRequest(
        id_path=id_file.expanduser(),
        oods=parse_ood(ood),
        score_column=score_column,
        lambdas=parse_lambdas(lambdas),
        compare=compare,
        convention=metrics,
        select_on=select_on,
        scale_stabilize=scale_stabilize or calibration is not None,
        calibration_path=calibration,
        drop_nonfinite=drop_nonfinite,
        allow_mixed_settings=allow_mixed_settings,
        groups=parse_ood_groups(ood_groups),
        id_groups=parse_ood(id_group or [], "--id-group", required=False),
        benchmark=benchmark,
    )
    result = evaluate(request, Workspace.open(o.cache_root(cache_dir)), report)
    from negalign_cli.stages.results_json import loads_results

    results = loads_results(result.artifact.file(files.RESULTS).read_text(encoding="utf-8"))
    render_results(results)
    o.finish(result, out, "evaluate", report, inputs=[Path(p) for p in request.paths().values()])
