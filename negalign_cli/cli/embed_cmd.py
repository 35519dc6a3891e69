"""`negalign embed texts`: class and negative-label text embeddings."""

from __future__ import annotations

from typing import Annotated

import typer

from negalign_cli import defaults
from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout

app = typer.Typer(
    help="Encode texts and images once; every later stage reads the cache.",
    epilog="Example: negalign embed images --images data/val --model negalign-toy --out emb/val",
    no_args_is_help=True,
)

TEXTS_EXAMPLE = (
    "Example: negalign embed texts --classes waterbird --model negalign-tiny-test --out d  "
    "(with real weights: --model ViT-B-16 --pretrained /path/ViT-B-16.pt --classes imagenet "
    "--negatives neg_labels_noun.txt)"
)


@app.command("texts", epilog=TEXTS_EXAMPLE)
@guarded
def texts(
    classes: Annotated[
        str,
        typer.Option(
            "--classes", "-c", help="Class preset (imagenet, waterbird, ...) or a file, one class a line."
        ),
    ],
    model: o.Model = defaults.DEFAULT_MODEL,
    pretrained: o.Pretrained = None,
    negatives: Annotated[
        str | None,
        typer.Option(
            "--negatives",
            "-n",
            help="Negative-label file (one label a line) or a bundled "
            "list: negrefine-imagenet-noun, negrefine-imagenet-adj.",
            show_default=False,
        ),
    ] = None,
    templates: Annotated[
        str,
        typer.Option(
            "--templates",
            help="Template set for classes (noun, adjective, object, background, "
            "bare) or a file with one template a line containing {}.",
        ),
    ] = "noun",
    negative_templates: Annotated[
        str | None,
        typer.Option(
            "--negative-templates",
            help="Template set for negatives (default: as --templates).",
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
    """Encode ID class names (and optionally negative labels) with prompt templates: each word is
    the normalised mean of its prompt embeddings (NegLabel's recipe). Writes class_embeddings.npy +
    classes.txt (and negative_embeddings.npy + negatives.txt)."""
    from negalign_cli.inputs.words import load_classes, load_negatives, load_templates

    rt = o.runtime(cache_dir, device, precision, batch_size)
    report = o.reporter(verbose, quiet)
    class_list = load_classes(classes, report)
    negative_list = load_negatives(negatives, report) if negatives is not None else None
    template_set = load_templates(templates)
    negative_set = load_templates(negative_templates) if negative_templates else None
    from negalign_cli.cache.workspace import Workspace  # after the inputs are checked: cheap errors first
    from negalign_cli.stages.text import embed_texts

    loaded = o.load(model, pretrained, rt, report)
    workspace = Workspace.open(rt.cache_dir)
    result = embed_texts(
        loaded,
        class_list,
        template_set,
        workspace,
        negatives=negative_list,
        negative_templates=negative_set,
        batch_size=rt.batch_size,
        reporter=report,
    )
    counts = result.artifact.manifest["counts"]
    status = (
        "cache hit"
        if result.hit
        else f"encoded {counts['encoded']}, {counts['from_item_cache']} from item cache"
    )
    summary = f"embed-texts {result.artifact.key[:12]}: {counts['classes']} classes"
    if "negatives" in counts:
        summary += f", {counts['negatives']} negatives"
    stdout().print(f"{summary} ({status})")
    if counts.get("truncated_prompts"):
        report.warn(
            f"{counts['truncated_prompts']} prompt(s) were longer than the model's context and were cut"
        )
    o.finish(result, out, "embed-texts", report)


IMAGES_EXAMPLE = (
    "Example: negalign embed images --images data/waterbird/metadata.csv --split test "
    "--model negalign-tiny-test "
    "--out emb/id"
)


@app.command("images", epilog=IMAGES_EXAMPLE)
@guarded
def images(
    images: o.Images,
    data_root: o.DataRoot = None,
    split: o.Split = None,
    model: o.Model = defaults.DEFAULT_MODEL,
    pretrained: o.Pretrained = None,
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
    batch_size: o.BatchSize = 256,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Encode images once (per-image cache by content digest: renamed files and reruns cost
    nothing, new files are all that is encoded). Writes image_embeddings.npy and images.parquet
    (row, path, label, digest, status, reason)."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.inputs.datasets import resolve_decoder
    from negalign_cli.inputs.listing import list_images
    from negalign_cli.stages.images import digest_images, embed_images, embed_images_spec

    chosen_shard, cache_dir = o.shard_setup(shard, shards_dir, out, cache_dir)
    rt = o.runtime(cache_dir, device, precision, batch_size)
    report = o.reporter(verbose, quiet)
    o.check_weights(model, pretrained, rt)  # before any image is hashed: missing weights fail at once
    image_list = list_images(images, data_root, split, allow_outside_root=allow_outside_root)
    stat_cache = Workspace.open(rt.cache_dir).stat_cache  # unchanged files are not hashed again
    listing = digest_images(image_list, report, stat_cache=stat_cache) if chosen_shard is None else None
    loaded = o.load(model, pretrained, rt, report, compile=compile)

    def run(listing):
        return embed_images(
            loaded,
            listing,
            Workspace.open(rt.cache_dir),
            store_dtype=store_dtype,
            batch_size=rt.batch_size,
            workers=workers,
            strict=strict,
            decoder=decode,
            max_pixels=max_pixels,
            reporter=report,
        )

    if chosen_shard is not None and shards_dir is not None:
        spec = embed_images_spec(
            loaded,
            "",
            store_dtype=store_dtype,
            decoder=resolve_decoder(decode, loaded.device),
            max_pixels=max_pixels,
        )
        o.run_shard(chosen_shard, shards_dir, spec, image_list, run, report, stat_cache)
        return
    result = run(listing)
    c = result.artifact.manifest["counts"]
    status = "cache hit" if result.hit else f"encoded {c['encoded']}, cached {c['cached']}"
    stdout().print(
        f"embed-images {result.artifact.key[:12]}: {c['embedded']} of {c['images']} images embedded, "
        f"{c['skipped']} skipped{o.duplicates_note(c)} ({status})"
    )
    o.finish(result, out, "embed-images", report)
