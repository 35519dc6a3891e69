"""The ``embed images`` and ``cam`` stages.

Both work in two layers: a per-image cache keyed by the image's content digest (filled batch by
batch, so an interrupted run keeps what it finished and a rerun encodes only the rest), and an
artifact that assembles the rows for one image list. ``cam`` also stores each image's embedding
in the embedding cache, so ``embed images`` after ``cam`` encodes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from negalign_cli import settings
from negalign_cli.cache.items import Namespace
from negalign_cli.cache.statcache import StatCache
from negalign_cli.cache.store import Artifact, StageResult, StageSpec
from negalign_cli.cache.workspace import Workspace
from negalign_cli.defaults import CLASS_TEMPLATES, DEFAULT_MAX_PIXELS, DEFAULT_STORE_DTYPE, STORE_DTYPES
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.datasets import (  # the decoder, for the key
    decoder_key,
    default_workers,
    resolve_decoder,
)
from negalign_cli.inputs.listing import ImageList, digest_all, is_transient
from negalign_cli.inputs.words import WordList, load_templates
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files
from negalign_cli.stages.image_rows import (  # what merge reads too, without torch
    CAM_STAGE,
    CAM_VERSION,
    EMBED_IMAGES_STAGE,
    EMBED_IMAGES_VERSION,
    Listing,
)
from negalign_cli.stages.image_rows import image_table as _table
from negalign_cli.stages.image_rows import row_order as _row_order
from negalign_cli.stages.text import list_name, text_embeddings

if TYPE_CHECKING:  # a stage gets a modelref.LazyModel (built on first use) or a models.LoadedModel
    import pandas as pd
    import torch

    from negalign_cli.compute.cam_layout import CamConfig, CamRows
    from negalign_cli.inputs.tars import Member
    from negalign_cli.modelref import AnyModel

# torch, the encoders (compute/vision.py) and the decoding datasets are imported inside the
# compute steps, which the store runs only on a miss: a cache hit imports no torch. pandas (and
# pyarrow) is imported where a table is read or written: not on a hit without skipped images.

IMAGE_ITEMS_VERSION = 1
CAM_ITEMS_VERSION = 2
# A batch that no DataLoader worker delivers within this many seconds is an error, never a hang.
WORKER_TIMEOUT = 600.0


def digest_images(
    images: ImageList,
    reporter: Reporter | None = None,
    workers: int = 8,
    stat_cache: StatCache | None = None,
) -> Listing:
    """Content digests of every listed image; a listed problem (outside the data root, an empty
    entry) is recorded as the image's reason and the file is never opened. With a ``stat_cache``,
    a file whose size, mtime, inode and device are unchanged since it was hashed is not read."""
    reporter = reporter or NullReporter()
    digests: list[str | None] = [None] * len(images)
    if not images.problems and not images.members:  # a plain folder: every path is a file to read
        readable = files = list(range(len(images)))
        reasons = [""] * len(images)
        members: list[Member] = []
        paths = images.paths
    else:
        readable = [i for i in range(len(images)) if i not in images.problems]
        reasons = [images.problems.get(i, "") for i in range(len(images))]
        files = [i for i in readable if i not in images.members]
        members = [images.members[i] for i in readable if i in images.members]  # in tar shards
        paths = [images.paths[i] for i in files]
    with reporter.progress(f"hashing images: {images.name}", len(readable)) as advance:
        if stat_cache is None:
            found = digest_all([*paths, *members], workers)
        else:
            found = stat_cache.digests(paths, lambda todo: digest_all([paths[i] for i in todo], workers))
            found += stat_cache.digests(  # a member is vouched for by its shard's stat
                [f"{m.id}\0{m.offset}" for m in members],
                lambda todo: digest_all([members[i] for i in todo], workers),
                [m.tar for m in members],
            )
        if len(files) == len(images) or len(members) == len(images):  # `found` is in list order
            digests = [digest for digest, _ in found]
            reasons = [reason for _, reason in found]
        else:
            order = files + [i for i in readable if i in images.members]
            for index, (digest, reason) in zip(order, found, strict=True):
                digests[index], reasons[index] = digest, reason
        advance(len(readable))
    if stat_cache is not None and stat_cache.hits:
        reporter.debug(f"{stat_cache.hits} digest(s) from the stat cache, {stat_cache.hashed} file(s) hashed")
    if images.refused:
        reporter.warn(
            f"{images.refused} listed path(s) lead outside the data root and were refused "
            "(images.parquet records them; --allow-outside-root reads them)"
        )
    return Listing(images, digests, reasons)


def image_namespace(workspace: Workspace, model: AnyModel, decoder: str = "pil") -> Namespace:
    params = {"precision": model.precision, "version": IMAGE_ITEMS_VERSION}
    if decoder != "pil":  # the batched decoder's resize differs slightly from PIL's: keep them apart
        params["decoder"] = decoder_key(decoder)
    return workspace.items.namespace("image", model.fingerprint, params, model.embed_dim)


def _run_missing(
    listing: Listing,
    missing: Sequence[str],
    first: dict[str, int],
    model: AnyModel,
    process: Callable[[torch.Tensor, list[str]], Callable[[], None] | None],
    *,
    batch_size: int,
    workers: int,
    reporter: Reporter,
    what: str,
    decoder: str = "pil",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, str]:
    """Decode and run ``process(batch, digests)`` over the images whose digests are missing;
    returns decoding failures (digest -> reason). ``process`` may return a function that finishes
    the batch (stores its results): on a GPU it is called after the next batch has been started,
    so the GPU computes batch k + 1 while the host stores batch k (no synchronisation in between);
    on a CPU at once."""
    failures: dict[str, str] = {}
    if not missing:
        return failures
    import torch

    from negalign_cli.inputs.datasets import ImageDataset, collate

    paths = [listing.images.location(first[d]) for d in missing]  # a file, or a member of a tar shard
    settings.loader_sharing(workers)
    batches: Iterable[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]
    if decoder == "torch":  # the reader pool: batched decoding on the device, two batches in flight
        from negalign_cli.inputs.reader import decoded_batches

        batches = decoded_batches(
            paths,
            model.preprocess_cfg,
            model.image_transform(),
            torch.device(model.device),  # a LazyModel's is a settings.DeviceName (a str)
            batch_size=batch_size,
            workers=workers,
            max_pixels=max_pixels,
            timeout=WORKER_TIMEOUT,
        )
    else:
        batches = torch.utils.data.DataLoader(
            ImageDataset(paths, model.image_transform(), max_pixels),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=model.device.type == "cuda",
            timeout=WORKER_TIMEOUT if workers else 0,
        )
    pending: Callable[[], None] | None = None
    overlap = model.device.type == "cuda"
    with reporter.progress(f"{what} images: {listing.images.name}", len(paths)) as advance:
        waited = time.perf_counter()
        try:
            for number, (indices, batch, failed) in enumerate(batches, start=1):
                started = time.perf_counter()
                for index, reason in failed:
                    failures[missing[index]] = reason
                if batch is not None:
                    batch = model.to_input(batch, non_blocking=True)
                    previous, pending = pending, process(batch, [missing[i] for i in indices])
                    if previous is not None:
                        previous()
                    if not overlap and pending is not None:  # on a CPU there is nothing to overlap
                        now: Callable[[], None] = pending
                        pending = None
                        now()
                advance(len(indices) + len(failed))
                done = time.perf_counter()
                reporter.debug(
                    f"batch {number}: {len(indices)} image(s), {len(failed)} failed; decoding waited "
                    f"{started - waited:.3f} s, model {done - started:.3f} s"
                )
                waited = done
        finally:  # what was computed is stored, also when the run stops here (Ctrl-C, an error)
            if pending is not None:
                pending()
    return failures


def to_host(*tensors: torch.Tensor) -> Callable[[], list[np.ndarray]]:
    """Start copying device tensors to the host; the returned function waits for the copies (a
    CUDA event, not a device-wide synchronisation) and gives numpy arrays. On the CPU it is
    immediate."""
    if not tensors or tensors[0].device.type != "cuda":
        arrays = [t.detach().cpu().numpy() for t in tensors]
        return lambda: arrays
    import torch

    copies = [t.detach().to("cpu", non_blocking=True) for t in tensors]
    event = torch.cuda.Event()
    event.record()

    def ready() -> list[np.ndarray]:
        event.synchronize()
        return [c.numpy() for c in copies]

    return ready


def _check_strict(table: pd.DataFrame, strict: bool, reporter: Reporter) -> None:
    skipped = table[table["status"] != "ok"]
    if skipped.empty:
        return
    shown = "; ".join(f"{p}: {r}" for p, r in zip(skipped["path"][:3], skipped["reason"][:3], strict=True))
    message = f"skipped {len(skipped)} image(s) ({shown}{'; …' if len(skipped) > 3 else ''})"
    if strict:
        raise NegalignError(f"{message}; --strict turns skips into a failure (finished images stay cached)")
    reporter.warn(f"{message}; images.parquet records each reason")


def _transient_skips(artifact: Artifact) -> str | None:
    """A stored list whose skips include transient ones (a file that vanished, an unreadable
    disk) is not final: the next run retries those images (the rest come from the cache)."""
    if not artifact.manifest.get("counts", {}).get("skipped"):
        return None
    import pandas as pd

    table = pd.read_parquet(artifact.file(files.IMAGE_TABLE), columns=["status", "reason", "digest"])
    # only failures while decoding (the file had a digest): a hashing failure is part of the key
    skipped = table[(table["status"] != "ok") & (table["digest"] != "")]
    transient = sum(is_transient(str(reason)) for reason in skipped["reason"])
    return f"{transient} image(s) were skipped for a passing reason; retrying them" if transient else None


def _strict_on_hit(result: StageResult, strict: bool, reporter: Reporter) -> StageResult:
    """``--strict`` holds on a cache hit too: the stored list of skipped images is checked again."""
    if result.hit and strict and result.artifact.manifest.get("counts", {}).get("skipped"):
        import pandas as pd

        _check_strict(pd.read_parquet(result.artifact.file(files.IMAGE_TABLE)), strict, reporter)
    return result


@dataclass
class Filled:
    """The per-image rows of one image list, after filling the cache where needed."""

    values: np.ndarray  # one row per distinct embedded content, in output order
    digests: list[str]  # the digest of each of those rows
    table: pd.DataFrame  # images.parquet: every listed path, with the row of its content
    computed: int
    cached: int

    @property
    def duplicates(self) -> int:
        """Listed paths whose bytes equal an earlier path's (they share its row)."""
        return int((self.table["status"] == "ok").sum()) - len(self.values)


def _fill(
    listing: Listing,
    namespace: Namespace,
    model: AnyModel,
    process: Callable[[torch.Tensor, list[str]], Callable[[], None] | None],
    *,
    batch_size: int,
    workers: int,
    decoder: str,
    strict: bool,
    reporter: Reporter,
    what: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    companions: Sequence[Namespace] = (),
) -> Filled:
    """Look every distinct image up in ``namespace``, run ``process`` on the missing ones (which
    must store their rows there, and in every ``companions`` namespace), and assemble the rows in
    list order with ``images.parquet``. An image missing from a companion (a run stopped between
    the two writes, a vector that failed its checksum) counts as missing too."""
    first = listing.unique_valid()
    digests = list(first)
    values, found = namespace.get_many(digests)
    for companion in companions:
        found &= companion.get_many(digests)[1]
    corrupt = namespace.corrupt + sum(c.corrupt for c in companions)
    if corrupt:
        reporter.warn(f"{corrupt} cached vector(s) failed their checksum; recomputing them")
    missing = [d for d, hit in zip(digests, found, strict=True) if not hit]
    cached = int(found.sum())
    reporter.info(f"{what} images: {listing.images.name}: {len(missing)} to compute, {cached} from the cache")
    failures = _run_missing(
        listing,
        missing,
        first,
        model,
        process,
        batch_size=batch_size,
        workers=workers,
        reporter=reporter,
        what=what,
        decoder=decoder,
        max_pixels=max_pixels,
    )
    if missing:
        values, found = namespace.get_many(digests)
        for companion in companions:
            found &= companion.get_many(digests)[1]
    _require_all(
        namespace, [d for d, hit in zip(digests, found, strict=True) if not hit and d not in failures]
    )
    rows = _row_order(listing, {d for d, hit in zip(digests, found, strict=True) if hit})
    table = _table(listing, rows, failures)
    if not rows:
        shown = "; ".join(f"{p}: {r}" for p, r in zip(table["path"][:3], table["reason"][:3], strict=True))
        raise NegalignError(
            f"none of the {len(table)} listed image(s) could be read ({shown}); nothing was stored"
        )
    _check_strict(table, strict, reporter)
    position = {d: i for i, d in enumerate(digests)}
    ordered = values[[position[d] for d in rows]] if rows else values[:0]
    return Filled(ordered, list(rows), table, len(missing) - len(failures), cached)


def _require_all(namespace: Namespace, vanished: Sequence[str]) -> None:
    """Every image this run found or computed must still be in the cache when the artifact is
    assembled; if one vanished (a concurrent `cache gc`, a damaged store), nothing is stored."""
    if vanished:
        raise NegalignError(
            f"{len(vanished)} cached vector(s) of this run vanished from the {namespace.info.kind} cache "
            "while it ran (a concurrent `negalign cache gc`, or a damaged cache); nothing was stored: "
            "rerun the command"
        )


def _check_store_dtype(store_dtype: str) -> None:
    if store_dtype not in STORE_DTYPES:
        raise NegalignError(f"--store-dtype must be {' or '.join(STORE_DTYPES)}, got {store_dtype!r}")


# ----------------------------------------------------------------------------- embed images
def embed_images_spec(
    model: AnyModel,
    images_key: str,
    *,
    store_dtype: str = DEFAULT_STORE_DTYPE,
    decoder: str = "pil",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> StageSpec:
    """What identifies an ``embed images`` run (``decoder`` already resolved for the device)."""
    _check_store_dtype(store_dtype)
    params: dict[str, object] = {
        "store_dtype": store_dtype,
        "precision": model.precision,
        "items_version": IMAGE_ITEMS_VERSION,
        "max_pixels": max_pixels,
    }
    if decoder != "pil":
        params["decoder"] = decoder_key(decoder)
    return StageSpec(
        EMBED_IMAGES_STAGE, EMBED_IMAGES_VERSION, params, {"model": model.fingerprint, "images": images_key}
    )


def embed_images(
    model: AnyModel,
    listing: Listing,
    workspace: Workspace,
    *,
    store_dtype: str = DEFAULT_STORE_DTYPE,
    batch_size: int = 256,
    workers: int | None = None,
    strict: bool = False,
    decoder: str = "pil",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reporter: Reporter | None = None,
) -> StageResult:
    """``image_embeddings.npy`` (one row per distinct readable image) and ``images.parquet``."""
    reporter = reporter or NullReporter()
    workers = default_workers() if workers is None else workers
    decoder = resolve_decoder(decoder, cast("torch.device", model.device))  # reads its .type only
    spec = embed_images_spec(
        model, listing.key, store_dtype=store_dtype, decoder=decoder, max_pixels=max_pixels
    )

    namespace = image_namespace(workspace, model, decoder)

    def compute(folder):
        tower = model.tower  # compiled or eager, as --compile says (models.ImageTower)

        def process(batch, batch_digests):
            ready = to_host(tower.encode(batch, reporter))
            return lambda: namespace.put_many(batch_digests, ready()[0])

        filled = _fill(
            listing,
            namespace,
            model,
            process,
            batch_size=batch_size,
            workers=workers,
            decoder=decoder,
            strict=strict,
            reporter=reporter,
            what="embedding",
            max_pixels=max_pixels,
        )
        np.save(folder / files.IMAGE_EMBEDDINGS, filled.values.astype(store_dtype))
        filled.table.to_parquet(folder / files.IMAGE_TABLE, index=False)
        return {
            "counts": {
                "images": len(listing.images),
                "embedded": len(filled.values),
                "duplicates": filled.duplicates,
                "skipped": int((filled.table["status"] != "ok").sum()),
                "encoded": filled.computed,
                "cached": filled.cached,
            },
            "model": model.describe(),
            "images_source": listing.images.source,
        }

    with workspace.items.lease(namespace):  # `cache gc` leaves these vectors alone meanwhile
        result = workspace.store.run(spec, compute, reporter, revalidate=_transient_skips)
    return _strict_on_hit(result, strict, reporter)


# ----------------------------------------------------------------------------- cam
def _write_cam_outputs(
    folder: Path,
    rows: CamRows,
    embeddings: np.ndarray,
    table: pd.DataFrame,
    classes: WordList,
    store_dtype: str,
) -> None:
    """The files of a ``cam`` artifact; every array has one row per distinct embedded image."""
    import pandas as pd

    np.save(folder / files.IMAGE_EMBEDDINGS, embeddings.astype(store_dtype))
    table.to_parquet(folder / files.IMAGE_TABLE, index=False)
    np.save(folder / files.BACKGROUND_EMBEDDINGS, rows.background.astype(store_dtype))
    np.save(folder / files.CAMS, rows.cams.astype(np.float16))  # only drawn: half precision is plenty
    np.save(folder / files.FOREGROUND, rows.foreground)
    pd.DataFrame(
        {
            "pred_class": rows.pred_class,
            "pred_name": np.array(classes.words, dtype=object)[rows.pred_class]
            if len(rows.pred_class)
            else [],
            "pred_score": rows.pred_score,
            "cam_valid": rows.valid,
            "fg_fraction": rows.fg_fraction,
        }
    ).to_parquet(folder / files.CAM_TABLE, index=False)


def _cam_namespace(
    workspace: Workspace, model: AnyModel, config: CamConfig, classes: WordList, cells: int, decoder: str
):
    from negalign_cli.compute.cam_layout import cam_row_width  # planning: the row layout, torch-free

    dim = cam_row_width(model.embed_dim, cells)
    params = {
        **asdict(config),
        "classes": classes.digest,
        "class_templates": load_templates(CLASS_TEMPLATES).digest,  # the prompts of the CAM's target
        "precision": model.precision,
        "version": CAM_ITEMS_VERSION,
    }
    if decoder != "pil":
        params["decoder"] = decoder_key(decoder)
    return workspace.items.namespace("cam", model.fingerprint, params, dim)


def cam_spec(
    model: AnyModel,
    images_key: str,
    classes: WordList,
    config: CamConfig,
    *,
    store_dtype: str = DEFAULT_STORE_DTYPE,
    decoder: str = "pil",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> StageSpec:
    """What identifies a ``cam`` run (``decoder`` already resolved for the device)."""
    _check_store_dtype(store_dtype)
    config.validate(model.vision_blocks)  # from the fingerprint table: the model is not built here
    params: dict[str, object] = {
        **asdict(config),
        "store_dtype": store_dtype,
        "precision": model.precision,
        "max_pixels": max_pixels,
    }
    if decoder != "pil":
        params["decoder"] = decoder_key(decoder)
    inputs = {
        "model": model.fingerprint,
        "images": images_key,
        "classes": classes.digest,
        "class_templates": load_templates(CLASS_TEMPLATES).digest,  # `score` checks both against its own
    }
    return StageSpec(CAM_STAGE, CAM_VERSION, params, inputs)


def cam_images(
    model: AnyModel,
    listing: Listing,
    classes: WordList,
    workspace: Workspace,
    config: CamConfig,
    *,
    store_dtype: str = DEFAULT_STORE_DTYPE,
    batch_size: int = 128,
    workers: int | None = None,
    strict: bool = False,
    decoder: str = "pil",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reporter: Reporter | None = None,
) -> StageResult:
    """Batched Grad-CAM: ``background_embeddings.npy``, ``cams.npy``, ``foreground.npy``,
    ``cam.parquet``, plus the ``image_embeddings.npy``/``images.parquet`` of the same forward, so the
    folder scores alone."""
    reporter = reporter or NullReporter()
    grid = model.grid  # a tower Grad-CAM cannot use fails here, before anything is read
    workers = default_workers() if workers is None else workers
    decoder = resolve_decoder(decoder, cast("torch.device", model.device))  # reads its .type only
    spec = cam_spec(
        model, listing.key, classes, config, store_dtype=store_dtype, decoder=decoder, max_pixels=max_pixels
    )

    cams_ns = _cam_namespace(workspace, model, config, classes, grid[0] * grid[1], decoder)
    images_ns = image_namespace(workspace, model, decoder)

    def compute(folder):
        import torch

        from negalign_cli.compute.vision import pack_cam_rows, unpack_cam_rows

        class_features = torch.from_numpy(
            text_embeddings(
                model,
                classes.words,
                load_templates(CLASS_TEMPLATES),
                workspace,
                reporter=reporter,
                label=f"classes {list_name(classes.source)}",
            ).vectors
        )

        tower = model.tower  # compiled or eager, as --compile says (models.ImageTower)

        def process(batch, batch_digests):
            out = tower.cam(batch, class_features, config, reporter)
            ready = to_host(out.embeddings)

            def finish():
                images_ns.put_many(batch_digests, ready()[0])  # first: see _fill
                cams_ns.put_many(batch_digests, pack_cam_rows(out))

            return finish

        filled = _fill(
            listing,
            cams_ns,
            model,
            process,
            batch_size=batch_size,
            workers=workers,
            decoder=decoder,
            strict=strict,
            reporter=reporter,
            what="Grad-CAM on",
            max_pixels=max_pixels,
            companions=[images_ns],
        )
        rows = unpack_cam_rows(filled.values, model.embed_dim, grid)
        embeddings, found = images_ns.get_many(filled.digests)
        _require_all(images_ns, [d for d, hit in zip(filled.digests, found, strict=True) if not hit])
        _write_cam_outputs(folder, rows, embeddings, filled.table, classes, store_dtype)
        return {
            "counts": {
                "images": len(listing.images),
                "processed": len(filled.values),
                "duplicates": filled.duplicates,
                "skipped": int((filled.table["status"] != "ok").sum()),
                "computed": filled.computed,
                "cam_valid": int(rows.valid.sum()),
            },
            "model": model.describe(),
            "images_source": listing.images.source,
            "sources": {"classes": classes.source},
        }

    with workspace.items.lease(cams_ns, images_ns):
        result = workspace.store.run(spec, compute, reporter, revalidate=_transient_skips)
    return _strict_on_hit(result, strict, reporter)
