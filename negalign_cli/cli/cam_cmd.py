"""`negalign cam`: batched Grad-CAM, foreground masks and background embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from negalign_cli import defaults
from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout
from negalign_cli.defaults import BG_POOLS, CAM_METHODS
from negalign_cli.errors import NegalignError

EXAMPLE = (
    "Example: negalign cam --images data/waterbird/metadata.csv --split test --classes waterbird "
    "--model negalign-tiny-test --viz 8 --viz-dir viz --out emb/id"
)


@guarded
def cam(
    images: o.Images,
    classes: Annotated[
        str, typer.Option("--classes", "-c", help="Class preset or a file, one class a line.")
    ],
    data_root: o.DataRoot = None,
    split: o.Split = None,
    model: o.Model = defaults.DEFAULT_MODEL,
    pretrained: o.Pretrained = None,
    cam_method: Annotated[str, typer.Option("--cam-method", help=f"{' or '.join(CAM_METHODS)}.")] = "gradcam",
    block: Annotated[int, typer.Option("--block", help="Block whose ln_1 output is hooked (-1: last).")] = -1,
    fg_percentile: Annotated[
        float, typer.Option("--fg-percentile", help="Foreground: patches ≥ this percentile.")
    ] = (80.0),
    dilate: Annotated[
        int, typer.Option("--dilate", min=0, help="Grow the foreground by this many patches.")
    ] = 1,
    bg_pool: Annotated[
        str, typer.Option("--bg-pool", help=f"Background embedding: {', '.join(BG_POOLS)}.")
    ] = "tokens",
    viz: Annotated[int, typer.Option("--viz", min=0, help="Write this many overlay PNGs.")] = 0,
    viz_dir: Annotated[
        Path | None,
        typer.Option("--viz-dir", help="Folder for --viz PNGs (default: --out/viz).", show_default=False),
    ] = None,
    store_dtype: o.StoreDtype = defaults.DEFAULT_STORE_DTYPE,
    workers: o.Workers = None,
    strict: o.Strict = False,
    decode: o.Decode = "auto",
    max_pixels: o.MaxPixels = defaults.DEFAULT_MAX_PIXELS,
    allow_outside_root: o.AllowOutsideRoot = False,
    shard: o.ShardOpt = None,
    shards_dir: o.ShardsDir = None,
    out: o.Out = None,
    cache_dir: o.CacheDir = None,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    compile: o.Compile = o.CompileMode.auto,
    batch_size: o.BatchSize = 128,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Grad-CAM at ln_1 of --block toward each image's predicted class, foreground = top patches
    (dilated), background embedding pooled from the rest. One forward per batch also gives the
    image embedding. Writes background_embeddings.npy, cams.npy, cam.parquet, and
    image_embeddings.npy + images.parquet, so the folder is a complete `score` input."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.compute.cam_layout import CamConfig
    from negalign_cli.inputs.datasets import resolve_decoder
    from negalign_cli.inputs.listing import list_images
    from negalign_cli.inputs.words import load_classes
    from negalign_cli.stages import files
    from negalign_cli.stages.images import cam_images, cam_spec, digest_images
    from negalign_cli.stages.plots import write_cam_overlays

    if viz and out is None and viz_dir is None:
        raise NegalignError("--viz writes under --out (or --viz-dir): give one of them")
    if viz and shards_dir is not None:
        raise NegalignError(
            "--viz draws from the whole run: use it after `negalign merge`, not with --shards-dir"
        )
    chosen_shard, cache_dir = o.shard_setup(shard, shards_dir, out, cache_dir)
    rt = o.runtime(cache_dir, device, precision, batch_size)
    report = o.reporter(verbose, quiet)
    config = CamConfig(
        method=cam_method, block=block, fg_percentile=fg_percentile, dilate=dilate, bg_pool=bg_pool
    )
    config.validate(10**6)  # names and ranges; the block is checked against the model below
    class_list = load_classes(classes, report)
    o.check_weights(model, pretrained, rt)  # before any image is hashed: missing weights fail at once
    image_list = list_images(images, data_root, split, allow_outside_root=allow_outside_root)
    stat_cache = Workspace.open(rt.cache_dir).stat_cache  # unchanged files are not hashed again
    listing = digest_images(image_list, report, stat_cache=stat_cache) if chosen_shard is None else None
    loaded = o.load(model, pretrained, rt, report, compile=compile)

    def run(listing):
        return cam_images(
            loaded,
            listing,
            class_list,
            Workspace.open(rt.cache_dir),
            config,
            store_dtype=store_dtype,
            batch_size=rt.batch_size,
            workers=workers,
            strict=strict,
            decoder=decode,
            max_pixels=max_pixels,
            reporter=report,
        )

    if chosen_shard is not None and shards_dir is not None:
        spec = cam_spec(
            loaded,
            "",
            class_list,
            config,
            store_dtype=store_dtype,
            decoder=resolve_decoder(decode, loaded.device),
            max_pixels=max_pixels,
        )
        o.run_shard(chosen_shard, shards_dir, spec, image_list, run, report, stat_cache)
        return
    result = run(listing)
    c = result.artifact.manifest["counts"]
    hit = " (cache hit)" if result.hit else f" ({c['computed']} computed)"
    stdout().print(
        f"cam {result.artifact.key[:12]}: {c['processed']} of {c['images']} images, CAM valid for "
        f"{c['cam_valid']}, {c['skipped']} skipped{o.duplicates_note(c)}{hit}"
    )
    o.finish(result, out, "cam", report, redraws=(files.VIZ_DIR,) if viz and viz_dir is None else ())
    if viz:
        folder = viz_dir if viz_dir is not None else Path(str(out)) / files.VIZ_DIR
        written = write_cam_overlays(result.artifact.path, viz, folder, loaded.image_size)
        stdout().print(f"wrote {len(written)} overlay(s) to {folder}")
