"""`negalign bench`: throughput and peak memory of every flow, in one run on one device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout

EXAMPLE = (
    "Example: negalign bench --device cpu --batch-size 8 --json bench.json  "
    "(on a GPU: negalign bench --device cuda --precision fp16 --batch-size 512)"
)


@guarded
def bench(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", callback=o.checked_model, help="open_clip architecture (random weights)."
        ),
    ] = "ViT-B-16",
    pretrained: Annotated[
        str,
        typer.Option("--pretrained", help="Weights: random (speed does not depend on them) or a file/tag."),
    ] = "random",
    quick_gelu: Annotated[
        bool | None,
        typer.Option(
            "--quick-gelu/--gelu",
            help="Random weights in the QuickGELU or GELU architecture (default: as the model's OpenAI "
            "weights, QuickGELU for ViT-B-16). Real weights decide for themselves.",
            show_default=False,
        ),
    ] = None,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    compile: o.Compile = o.CompileMode.auto,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Images per batch of the model flows.")
    ] = 16,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Timed batches per repetition.")] = 2,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repetitions (median).")] = 3,
    classes: Annotated[int, typer.Option("--classes", min=1, help="ID classes for scoring.")] = 1000,
    negatives: Annotated[
        int, typer.Option("--negatives", min=100, help="Negative labels for scoring.")
    ] = 10000,
    score_images: Annotated[
        int, typer.Option("--score-images", min=1, help="Cached embeddings scored per repetition.")
    ] = 20000,
    per_image: Annotated[
        int, typer.Option("--per-image", min=1, help="Images of the per-image reference flow.")
    ] = 4,
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Also time embedding from these image files.", show_default=False),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader workers with --images.")] = 0,
    embeddings: Annotated[
        str,
        typer.Option(
            "--embeddings",
            help="Embeddings scored: real-like (mixtures of related class and negative features, "
            "real data's distinct-pair counts) or random (unit vectors: every pair distinct).",
        ),
    ] = "real-like",
    flows: Annotated[
        str,
        typer.Option(
            "--flows",
            help="Comma-separated groups: model (forward, embed, CAM), score (GEMM, scoring), "
            "pipeline (full pipeline, also from --images files; per-image flow), decode (embed "
            "images' decoding path beside a bare PIL loop over the same JPEG files, and --decode "
            "torch's reader pool on the device); none: only --e2e.",
        ),
    ] = "model,score,pipeline",
    decode_workers: Annotated[
        int | None,
        typer.Option(
            "--decode-workers",
            min=0,
            help="DataLoader workers of the decode flow and of --e2e (default: as embed images).",
            show_default=False,
        ),
    ] = None,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e",
            help="Also time the real pipeline (embed texts, cam, score, evaluate) from synthetic "
            "ImageNet-sized JPEG files to the method table, cold and warm, on a MOS-sized benchmark "
            "(50,000 ID + 35,640 OOD images) times --e2e-scale.",
        ),
    ] = False,
    e2e_scale: Annotated[
        float, typer.Option("--e2e-scale", min=0.0, help="Fraction of the MOS-sized benchmark's images.")
    ] = 1.0,
    e2e_dir: Annotated[
        Path | None,
        typer.Option(
            "--e2e-dir",
            help="Where --e2e keeps its JPEG files (written once) and its cache, and the decode flow "
            "its files (default: negalign-bench-e2e and negalign-bench-jpegs in the temporary folder).",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write every figure and the environment here.", show_default=False),
    ] = None,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Measure images/s and peak memory of: the image tower's bare forward, embed, embed + CAM +
    background, scoring from cache (all columns) beside the bare GEMM it cannot beat, multi-matching,
    the full pipeline, and the per-image reference flow (batch 1, texts per image, full-backward
    CAM), with the speed-up ratios. Warm-up excluded, median of --repeats. Figures, not a test."""
    import json

    from negalign_cli.errors import NegalignError
    from negalign_cli.settings import Runtime
    from negalign_cli.stages.bench import BenchConfig, run_bench

    if images is not None and not images.exists():
        raise NegalignError(f"--images {images} does not exist")
    value = precision.value if isinstance(precision, o.Precision) else precision
    rt = Runtime.create(cache_dir=None, device=device, precision=value, batch_size=batch_size)
    report = o.reporter(verbose, quiet)
    from negalign_cli.models import load_model, openai_quick_gelu
    from negalign_cli.stages.bench import EMBEDDINGS

    if embeddings not in EMBEDDINGS:
        raise NegalignError(f"unknown --embeddings {embeddings!r}: use {', '.join(EMBEDDINGS)}")
    if quick_gelu is None:
        quick_gelu = openai_quick_gelu(model)
    # random weights are the point here, in the architecture users run
    mode = compile.value if isinstance(compile, o.CompileMode) else compile
    loaded = load_model(
        model, pretrained, rt.device, rt.precision, random_quick_gelu=quick_gelu, compile=mode
    )
    report.info(f"model {loaded.describe()}")
    config = BenchConfig(
        batch_size=batch_size,
        batches=batches,
        repeats=repeats,
        classes=classes,
        negatives=negatives,
        score_images=score_images,
        per_image=per_image,
        images=images,
        workers=workers,
        embeddings=embeddings,
        flows=tuple(part.strip() for part in flows.split(",") if part.strip() not in ("", "none")),
        decode_workers=decode_workers,
        scratch=e2e_dir / "decode" if e2e_dir else None,
    )
    record = run_bench(loaded, config, report)
    if e2e:
        import os
        import tempfile

        from negalign_cli.stages.bench_e2e import E2EConfig, run_e2e

        folder = e2e_dir or Path(tempfile.gettempdir()) / "negalign-bench-e2e"
        e2e_config = E2EConfig(
            folder,
            scale=e2e_scale,
            classes=classes,
            negatives=negatives,
            batch_size=batch_size,
            workers=decode_workers,
            write_workers=(os.cpu_count() or 1) if e2e_scale >= 0.05 else 0,  # tiny runs: no pool
        )
        record["e2e"] = run_e2e(loaded, e2e_config, report)
    from negalign_cli.cli.render import render_bench

    stdout().print(render_bench(record))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(record, indent=2), encoding="utf-8")
        stdout().print(f"wrote {json_out}")
