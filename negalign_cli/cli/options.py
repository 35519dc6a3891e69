"""Options shared by every command (one definition each), and the runtime they build."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from negalign_cli.cli.console import RichReporter, debug_enabled, fail
from negalign_cli.defaults import COMPILE_MODES, DEFAULT_MODEL, DEFAULT_PRETRAINED, PRECISIONS, STORE_DTYPES
from negalign_cli.settings import CACHE_ENV, DEVICE_ENV, Runtime, contain_writes, resolve_cache_dir


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


assert tuple(p.value for p in Precision) == PRECISIONS  # the names live in defaults.py


class CompileMode(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


assert tuple(c.value for c in CompileMode) == COMPILE_MODES


CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar=CACHE_ENV,
        help=f"Cache folder (else ${CACHE_ENV}, else ./.negalign-cache).",
        show_default=False,
    ),
]
Device = Annotated[
    str, typer.Option("--device", envvar=DEVICE_ENV, help=f"auto, cpu, cuda or cuda:N (else ${DEVICE_ENV}).")
]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="Model precision (fp16 needs CUDA).")]
Compile = Annotated[
    CompileMode,
    typer.Option(
        "--compile",
        help="torch.compile the image tower: auto (on CUDA only), on, off. Compiled code is kept in the "
        "cache's compiled/ folder; a compile that fails falls back to eager with one warning.",
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Items per forward pass.")]
Verbose = Annotated[int, typer.Option("-v", "--verbose", count=True, help="More detail (repeatable).")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Only warnings, errors and results.")]


def checked_model(name: str) -> str:
    """``--model`` checked as it is parsed, before a command lists or hashes anything (and without
    torch): an unknown name is one error line with the closest known names."""
    from negalign_cli.errors import NegalignError
    from negalign_cli.model_names import check_model_name

    try:
        return check_model_name(name)
    except NegalignError as exc:
        if debug_enabled():
            raise
        raise fail(str(exc), exc.exit_code) from None


def check_passed_model(argv: list[str]) -> None:
    """The ``--model`` among options passed on to other commands (``launch``'s shards), checked
    as if it were parsed here: a wrong name fails once, before any shard is submitted."""
    for index, arg in enumerate(argv):
        if arg in ("--model", "-m") and index + 1 < len(argv):
            checked_model(argv[index + 1])
        elif arg.startswith("--model="):
            checked_model(arg.split("=", 1)[1])


Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        callback=checked_model,
        help="open_clip architecture or a project model (`negalign models`), or OpenAI's name (ViT-B/16: "
        "with OpenAI's weights); negalign-toy is the bundled toy CLIP.",
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip tag (e.g. openai), local checkpoint path, or 'random' "
        f"[default: {DEFAULT_PRETRAINED} for {DEFAULT_MODEL}]. Not needed for negalign-* models.",
        show_default=False,
    ),
]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Also write the user-facing files here.")]


def runtime(cache_dir: Path | None, device: str, precision: Precision | str, batch_size: int) -> Runtime:
    value = precision.value if isinstance(precision, Precision) else precision
    rt = Runtime.create(cache_dir=cache_dir, device=device, precision=value, batch_size=batch_size)
    contain_writes(rt.cache_dir)
    return rt


def cache_root(cache_dir: Path | None) -> Path:
    """The cache folder of a command that needs no device (evaluate, cache ls/gc/repair)."""
    root = resolve_cache_dir(cache_dir)
    contain_writes(root)
    return root


def reporter(verbose: int, quiet: bool) -> RichReporter:
    return RichReporter(-1 if quiet else verbose)


def check_weights(model: str, pretrained: str | None, rt: Runtime | None = None) -> None:
    """Before any image is listed or hashed: the weights exist (a file, a project model, an
    open_clip tag that is cached or can be downloaded now). A model the cache's fingerprint table
    knows (``modelref``) was checked when it was built: nothing is imported for it."""
    if rt is not None:
        from negalign_cli.modelref import FingerprintTable, plan_model, planning_elsewhere, resolve_ref

        if FingerprintTable(rt.cache_dir).get(resolve_ref(model, pretrained, rt.device, rt.precision)):
            return
        if planning_elsewhere():  # the launch driver: a child process builds it, checking the weights
            plan_model(model, pretrained, rt.cache_dir, rt.device, rt.precision)
            return
    from negalign_cli.models import check_weights

    check_weights(model, pretrained)


def load(
    model: str,
    pretrained: str | None,
    rt: Runtime,
    report: RichReporter,
    detail: str = "",
    compile: CompileMode | str = CompileMode.off,
):
    """The command's model (``modelref.LazyModel``): its identity from the cache's fingerprint
    table, the network built only when a stage computes something (a miss), or now when the table
    does not know it yet. Says which model, and warns loudly when its weights are random.
    ``compile`` is ``--compile`` (the image tower's torch.compile) of the commands that take it;
    the others run the tower eagerly (the toy demo's few images would wait for a compile)."""
    from negalign_cli.modelref import plan_model

    started = time.perf_counter()
    mode = compile.value if isinstance(compile, CompileMode) else compile
    loaded = plan_model(model, pretrained, rt.cache_dir, rt.device, rt.precision, report, compile=mode)
    report.info(f"model {loaded.describe()}{detail}")
    how = "built" if loaded.built else "from the fingerprint table (not built)"
    report.debug(
        f"model {how} in {time.perf_counter() - started:.2f} s; fingerprint {loaded.fingerprint}; "
        f"preprocessing {loaded.preprocess_cfg}; cache {rt.cache_dir}"
    )
    if loaded.random_weights:
        report.warn(
            f"{loaded.name} has random weights ({loaded.weights}): its scores mean nothing; it is for "
            "tests and speed measurements (try --model negalign-toy, or real weights with --pretrained)"
        )
    return loaded


Images = Annotated[
    str,
    typer.Option(
        "--images",
        "-i",
        help="A folder (ImageFolder: label = first sub-folder), a manifest (path[,label] CSV or OpenOOD "
        "'relative/path label' lines), a Waterbirds metadata.csv, or webdataset tar shards "
        "('data/{00000..00099}.tar', as img2dataset writes them).",
    ),
]
DataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root", help="Root of the manifest's relative paths (default: its folder).", show_default=False
    ),
]
Split = Annotated[
    str | None,
    typer.Option("--split", help="Waterbirds split: train, val, test (or 0, 1, 2).", show_default=False),
]
StoreDtype = Annotated[
    str,
    typer.Option(
        "--store-dtype",
        help=f"{' or '.join(STORE_DTYPES)} for the .npy outputs (float16 halves the files and moves "
        "scores by up to ~1e-3; docs/maths.md).",
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        help="DataLoader worker processes (default: cores − 1, at most 8).",
        show_default=False,
    ),
]
Strict = Annotated[bool, typer.Option("--strict", help="Fail if any image is skipped.")]
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        min=1,
        help="Skip (never decode) images with more pixels than this: the decompression-bomb guard.",
    ),
]
AllowOutsideRoot = Annotated[
    bool,
    typer.Option(
        "--allow-outside-root",
        help="Read listed paths and symlinks that lead outside the data root (refused by default).",
    ),
]

ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="Run shard i of K (0-based, e.g. 0/4) of a sharded run; default: from SLURM_ARRAY_TASK_ID/"
        "SLURM_ARRAY_TASK_COUNT or torchrun's RANK/WORLD_SIZE. Needs --shards-dir.",
        show_default=False,
    ),
]
ShardsDir = Annotated[
    Path | None,
    typer.Option(
        "--shards-dir",
        help="Folder shared by the shards of one run (plan.json, one folder per shard); "
        "`negalign merge` assembles them. Each shard keeps its own cache there unless --cache-dir is given.",
        show_default=False,
    ),
]


def shard_setup(shard: str | None, shards_dir: Path | None, out: Path | None, cache_dir: Path | None):
    """(shard, cache folder) of a sharded run, or (None, cache_dir) for a plain one."""
    from negalign_cli.errors import NegalignError

    if shards_dir is None:
        if shard is not None:
            raise NegalignError("--shard needs --shards-dir (the folder the shards of one run share)")
        return None, cache_dir
    if out is not None:
        raise NegalignError(
            "a shard writes into --shards-dir, not --out: "
            "`negalign merge DIR --out OUT` writes the whole artifact"
        )
    from negalign_cli.stages.shards import resolve_shard, shard_cache

    chosen = resolve_shard(shard)
    if cache_dir is None and not os.environ.get(CACHE_ENV):
        cache_dir = shard_cache(shards_dir, chosen)
    return chosen, cache_dir


def run_shard(shard, shards_dir: Path, spec, image_list, run, report, stat_cache) -> None:
    """One shard of a sharded `embed images`/`cam` run: its slice hashed and run by ``run`` (the
    stage on a digested listing), published in ``shards_dir``, and its summary line."""
    from negalign_cli.stages.images import digest_images
    from negalign_cli.stages.shards import run_shard as run_one

    outcome = run_one(
        shards_dir,
        shard,
        spec,
        image_list,
        lambda part: run(digest_images(part, report, stat_cache=stat_cache)),
        report,
        stat_cache,
    )
    shard_summary(outcome)


def shard_summary(outcome) -> None:
    from negalign_cli.cli.console import stdout

    if outcome.skipped:
        stdout().print(f"shard {outcome.shard}: done already ({outcome.images} images); skipped")
        return
    c = outcome.result.artifact.manifest["counts"]
    stdout().print(
        f"shard {outcome.shard}: {outcome.images} images, {c['skipped']} skipped "
        f"({'cache hit' if outcome.result.hit else 'computed'}); wrote {outcome.folder}"
    )


def duplicates_note(counts: dict) -> str:
    """For the summary line: byte-identical files share one embedding row and get equal scores."""
    n = counts.get("duplicates", 0)
    return f", {n} path(s) byte-identical to an earlier one (sharing its row)" if n else ""


def finish(
    result,
    out: Path | None,
    label: str,
    report: RichReporter | None = None,
    redraws: tuple[str, ...] = (),
    inputs: Iterable[Path] = (),
) -> None:
    """Export the artifact to ``--out`` (or say where it is): the last line of most commands. Files
    an earlier run left in ``--out`` that this artifact lacks are removed (stage outputs only);
    what was drawn there from another artifact (a report, CAM overlays) is named in a warning,
    unless the command draws it again now (``redraws``). An export that would replace or remove
    one of ``inputs`` (the files the command read) is refused."""
    from negalign_cli.cache.store import MANIFEST
    from negalign_cli.cli.console import stdout
    from negalign_cli.stages import files

    if out is None:
        stdout().print(f"{label} artifact: {result.artifact.path}")
        return
    report = report or RichReporter()
    before = _manifest_key(out / MANIFEST)
    written = result.artifact.export(out, known=files.ARTIFACT_FILES, reporter=report, inputs=inputs)
    stdout().print(f"wrote {', '.join(p.name for p in written)} to {out}")
    drawn = sorted(name for name in files.RENDERED - set(redraws) if (out / name).exists())
    if drawn and before != result.artifact.key:
        report.warn(
            f"{', '.join(drawn)} in {out} were drawn from the output that was there before: rerun the "
            "command that made them (report, cam --viz) or delete them"
        )


def _manifest_key(path: Path) -> str | None:
    import json

    from negalign_cli.hashing import read_regular  # a FIFO there is passed over, never opened

    try:
        key = json.loads(read_regular(path).decode("utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


Decode = Annotated[
    str,
    typer.Option(
        "--decode",
        help="JPEG decoding: auto (torch on CUDA, pil on CPU), pil (PIL in DataLoader workers), torch "
        "(readers send bytes; batched TorchCodec/torchvision decoding and resize on the device).",
    ),
]
