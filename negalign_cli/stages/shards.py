"""Sharded ``embed images`` and ``cam`` runs, and ``negalign merge``.

A sharded run splits one image list into K contiguous slices. All shards of one run share a
folder (``--shards-dir``) holding:

- ``plan.json``: the frozen plan (stage, K, the image list's digest and size, the model
  fingerprint and every parameter of the stage). The first shard to start writes it (atomically,
  never overwriting); every later shard compares its own plan with it and is refused on any
  difference, so an array cannot mix two image lists, models or settings.
- ``images.json.gz``: the exact image list (paths, labels, extra columns, listed problems), so
  ``merge`` rebuilds the unsharded artifact without listing or hashing anything again.
- ``shard-00000-of-00004/``: each shard's artifact (exported with its manifest), its own cache
  (``cache/``, unless ``--cache-dir`` or ``$NEGALIGN_CACHE`` says otherwise: one SQLite file is
  never shared between nodes) and ``done.json``, written last. A resubmitted array skips every
  shard whose ``done.json`` matches the plan and whose files still verify.

``merge`` assembles the shards' rows into exactly the files an unsharded run writes (same key,
same bytes), with no model and no recomputation.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from negalign_cli.cache.statcache import StatCache, sha256_files
from negalign_cli.cache.store import MANIFEST, WRITTEN_DIGESTS, StageResult, StageSpec, verify_folder
from negalign_cli.cache.workspace import Workspace
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import canonical_json, printable_paths, sha256_json, sha256_text
from negalign_cli.inputs.listing import ImageList
from negalign_cli.inputs.tars import Member
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

from negalign_cli.stages.image_rows import (  # not stages/images.py: merge needs no torch
    CAM_STAGE,
    CAM_VERSION,
    EMBED_IMAGES_STAGE,
    EMBED_IMAGES_VERSION,
    ROW_FILES,
    Listing,
    image_table,
)

PLAN = "plan.json"
PLAN_IMAGES = "images.json.gz"
DONE = "done.json"
PLAN_FORMAT = 1
STAGE_VERSIONS = {EMBED_IMAGES_STAGE: EMBED_IMAGES_VERSION, CAM_STAGE: CAM_VERSION}


# ----------------------------------------------------------------------------- which shard
@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise NegalignError(f"shard {self.index}/{self.count}: need 0 ≤ i < K and K ≥ 1")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/K"`` (0-based i)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise NegalignError(f"--shard must look like i/K (e.g. 0/4), got {text!r}") from None
        return cls(index, count)

    def bounds(self, n: int) -> tuple[int, int]:
        """The slice of an ``n``-image list this shard takes (sizes differ by at most one)."""
        return self.index * n // self.count, (self.index + 1) * n // self.count

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard a scheduler assigned: a SLURM job array (``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN``, of ``SLURM_ARRAY_TASK_COUNT``) or torchrun (``RANK`` of
    ``WORLD_SIZE``); None outside both."""
    env = os.environ if environ is None else environ
    try:
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return Shard(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
        if "RANK" in env and "WORLD_SIZE" in env:
            return Shard(int(env["RANK"]), int(env["WORLD_SIZE"]))
    except ValueError as exc:
        raise NegalignError(f"cannot read the shard from the scheduler's variables: {exc}") from None
    return None


def resolve_shard(option: str | None, environ: Mapping[str, str] | None = None) -> Shard:
    """``--shard i/K`` if given, else the scheduler's; an error when neither says."""
    if option is not None:
        return Shard.parse(option)
    shard = shard_from_env(environ)
    if shard is None:
        raise NegalignError(
            "--shards-dir needs a shard: give --shard i/K, or run inside a SLURM job array "
            "(SLURM_ARRAY_TASK_ID/COUNT) or under torchrun (RANK/WORLD_SIZE)"
        )
    return shard


def shard_cache(shards_dir: Path, shard: Shard) -> Path:
    """A shard's own cache, inside its folder (the default when no cache is named)."""
    return Path(shards_dir) / shard.name / "cache"


# ----------------------------------------------------------------------------- the image list
def images_digest(images: ImageList) -> str:
    """What identifies an image list before any file is read (paths, labels, extra columns,
    listed problems)."""
    problems = sorted(images.problems.items())
    return sha256_json([images.paths, images.labels, images.extra, problems])


def subset(images: ImageList, start: int, stop: int) -> ImageList:
    """Images ``start:stop`` of a list, with their listed problems."""
    return ImageList(
        source=images.source,
        paths=images.paths[start:stop],
        labels=images.labels[start:stop],
        extra={name: values[start:stop] for name, values in images.extra.items()},
        problems={i - start: why for i, why in images.problems.items() if start <= i < stop},
        members={i - start: m for i, m in images.members.items() if start <= i < stop},
    )


def _write_images(path: Path, images: ImageList) -> None:
    record = {
        "source": images.source,
        "paths": images.paths,
        "labels": images.labels,
        "extra": images.extra,
        "problems": [[i, why] for i, why in sorted(images.problems.items())],
        "members": [[i, m.tar, m.name, m.offset, m.size] for i, m in sorted(images.members.items())],
    }
    with gzip.open(path, "wt", encoding="utf-8") as handle:  # ensure_ascii keeps odd bytes (surrogates)
        json.dump(record, handle, ensure_ascii=True)


def _read_images(path: Path) -> ImageList:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            record = json.load(handle)
        return ImageList(
            source=record["source"],
            paths=list(record["paths"]),
            labels=list(record["labels"]),
            extra={k: list(v) for k, v in record["extra"].items()},
            problems={int(i): str(why) for i, why in record["problems"]},
            members={  # images inside tar shards
                int(i): Member(str(tar), str(name), int(offset), int(size))
                for i, tar, name, offset, size in record.get("members", [])
            },
        )
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise NegalignError(f"the plan's image list {path} is unreadable ({exc})") from None


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    stage: str
    version: int
    shards: int
    images: str  # images_digest
    count: int
    source: str
    params: Mapping[str, Any]
    inputs: Mapping[str, str]  # the stage's inputs but the image list (model, classes)

    @classmethod
    def of(cls, spec: StageSpec, images: ImageList, shards: int) -> Plan:
        inputs = {k: v for k, v in spec.inputs.items() if k != "images"}
        return cls(
            spec.stage,
            spec.version,
            shards,
            images_digest(images),
            len(images),
            images.source,
            dict(spec.params),
            inputs,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "stage": self.stage,
            "version": self.version,
            "shards": self.shards,
            "images": {"digest": self.images, "count": self.count, "source": self.source},
            "params": dict(self.params),
            "inputs": dict(self.inputs),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Plan:
        return cls(
            record["stage"],
            int(record["version"]),
            int(record["shards"]),
            record["images"]["digest"],
            int(record["images"]["count"]),
            record["images"]["source"],
            record["params"],
            record["inputs"],
        )

    @property
    def digest(self) -> str:
        return sha256_text(canonical_json(self.to_json()))

    def spec(self, images_key: str) -> StageSpec:
        """The unsharded run's spec for the full list (its digests give ``images_key``)."""
        return StageSpec(self.stage, self.version, self.params, {**self.inputs, "images": images_key})

    def differences(self, other: Plan, ignore: tuple[str, ...] = ()) -> list[str]:
        """What differs from ``other`` (settings named in ``ignore`` aside)."""
        mine, theirs = self.to_json(), other.to_json()
        names = {"images": "image list", "inputs": "model or classes", "params": "settings"}
        out = []
        for field in ("stage", "version", "shards", "images", "inputs", "params"):
            if field == "params":
                changed = sorted(
                    k
                    for k in set(mine["params"]) | set(theirs["params"])
                    if k not in ignore and mine["params"].get(k) != theirs["params"].get(k)
                )
                if changed:
                    out.append(f"settings ({', '.join(changed)})")
            elif mine[field] != theirs[field]:
                out.append(names.get(field, field))
        return out


def read_plan(shards_dir: Path) -> Plan:
    path = Path(shards_dir) / PLAN
    if not path.is_file():
        raise NegalignError(f"{shards_dir} holds no {PLAN}: no shard of a sharded run has started there")
    try:
        plan = Plan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NegalignError(f"{path} is unreadable ({exc})") from None
    if plan.stage not in STAGE_VERSIONS:
        raise NegalignError(f"{path} plans an unknown stage {plan.stage!r}")
    return plan


def check_plan(shards_dir: Path, plan: Plan, ignore: tuple[str, ...] = ()) -> None:
    """Refuse ``plan`` when ``shards_dir`` holds a plan frozen for another run (another image list,
    model, classes, shard count or settings); nothing to check before the first shard started."""
    folder = Path(shards_dir)
    if not (folder / PLAN).exists():
        return
    differences = plan.differences(read_plan(folder), ignore)
    if differences:
        raise NegalignError(
            f"this run's {', '.join(differences)} differ from the plan frozen in {folder / PLAN}: its "
            "shards belong to another run; use another --shards-dir for this one (or delete that folder)"
        )


# While set, a shard stops once its plan is known (``launch`` checks a run locally this way).
_PLAN_ONLY: ContextVar[bool] = ContextVar("negalign_plan_only", default=False)


class Planned(BaseException):  # noqa: N818 - not an error: it carries the plan out of the command
    """Raised by :func:`run_shard` under :func:`plan_only`, carrying the plan and the image list."""

    def __init__(self, plan: Plan, images: ImageList) -> None:
        super().__init__("planned")
        self.plan = plan
        self.images = images


@contextlib.contextmanager
def plan_only() -> Iterator[None]:
    """Within this block a sharded ``embed images``/``cam`` command checks its options, lists its
    images and builds its plan, then raises :class:`Planned` instead of running or writing."""
    token = _PLAN_ONLY.set(True)
    try:
        yield
    finally:
        _PLAN_ONLY.reset(token)


def _write_new(path: Path, write: Callable[[Path], object]) -> bool:
    """Write ``path`` through a temporary file, never replacing an existing one; False if another
    process was first."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        try:
            os.link(tmp, path)  # atomic, and fails when the file exists
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def freeze_plan(shards_dir: Path, plan: Plan, images: ImageList) -> Plan:
    """Write the plan if this is the first shard, else check this shard's plan against it."""
    folder = Path(shards_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / PLAN).exists():
        _write_new(folder / PLAN_IMAGES, lambda p: _write_images(p, images))
        text = json.dumps(plan.to_json(), indent=2, sort_keys=True)
        _write_new(folder / PLAN, lambda p: p.write_text(text, encoding="utf-8"))
    frozen = read_plan(folder)
    differences = plan.differences(frozen)
    if differences:
        raise NegalignError(
            f"this shard's {', '.join(differences)} differ from the plan frozen in {folder / PLAN}; "
            "shards of one run must share the image list, model and settings (use another --shards-dir "
            "for a new run)"
        )
    return frozen


# ----------------------------------------------------------------------------- one shard
@dataclass(frozen=True)
class ShardOutcome:
    shard: Shard
    folder: Path
    skipped: bool  # done by an earlier run
    result: StageResult | None
    images: int  # images in this shard


def shard_done(shards_dir: Path, plan: Plan, shard: Shard, stat_cache: StatCache | None = None) -> bool:
    """Whether ``shard`` finished under ``plan`` and its files still verify (through ``stat_cache``:
    a file unchanged since it was verified is not read again)."""
    folder = Path(shards_dir) / shard.name
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict) or done.get("plan") != plan.digest:
        return False
    if done.get("shard") != [shard.index, shard.count]:  # another shard's folder copied here
        return False
    manifest, problem = verify_folder(folder / "artifact", stat_cache=stat_cache)
    return problem is None and manifest is not None and manifest.get("key") == done.get("key")


def run_shard(
    shards_dir: Path,
    shard: Shard,
    spec: StageSpec,
    images: ImageList,
    run: Callable[[ImageList], StageResult],
    reporter: Reporter | None = None,
    stat_cache: StatCache | None = None,
) -> ShardOutcome:
    """Freeze or check the plan, skip a finished shard, else run ``run`` on this shard's slice
    and publish its artifact and ``done.json``. ``spec`` is the stage's spec (its image key is
    ignored: the plan names the list by :func:`images_digest`)."""
    reporter = reporter or NullReporter()
    if shard.count > len(images):
        raise NegalignError(
            f"{shard.count} shards for {len(images)} images: use at most {len(images)} shards"
        )
    if _PLAN_ONLY.get():
        raise Planned(Plan.of(spec, images, shard.count), images)
    plan = freeze_plan(shards_dir, Plan.of(spec, images, shard.count), images)
    folder = Path(shards_dir) / shard.name
    start, stop = shard.bounds(len(images))
    if shard_done(shards_dir, plan, shard, stat_cache):
        reporter.info(f"shard {shard} is done already ({folder}); nothing to do")
        return ShardOutcome(shard, folder, True, None, stop - start)
    if start == stop:
        raise NegalignError(
            f"shard {shard} of {len(images)} images is empty: use at most {len(images)} shards"
        )
    result = run(subset(images, start, stop))
    (folder / DONE).unlink(missing_ok=True)
    result.artifact.export(folder / "artifact")
    done = {"plan": plan.digest, "shard": [shard.index, shard.count], "key": result.artifact.key}
    tmp = folder / f".{DONE}.tmp"
    tmp.write_text(json.dumps(done, indent=2), encoding="utf-8")
    os.replace(tmp, folder / DONE)
    return ShardOutcome(shard, folder, False, result, stop - start)


# ----------------------------------------------------------------------------- merge
def missing_shards(shards_dir: Path, plan: Plan, stat_cache: StatCache | None = None) -> list[Shard]:
    return [
        s
        for s in (Shard(i, plan.shards) for i in range(plan.shards))
        if not shard_done(shards_dir, plan, s, stat_cache)
    ]


def _foreign_folders(shards_dir: Path, plan: Plan) -> None:
    """Refuse a shard folder whose ``done.json`` names another shard (a folder copied or moved into
    the wrong place), before it could be merged as this shard's slice."""
    for index in range(plan.shards):
        shard = Shard(index, plan.shards)
        try:
            done = json.loads((shards_dir / shard.name / DONE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        claimed = done.get("shard") if isinstance(done, dict) else None
        if done.get("plan") == plan.digest and claimed != [index, plan.shards]:
            said = (
                f"shard {claimed[0]}/{claimed[1]}" if isinstance(claimed, list) and len(claimed) == 2 else "?"
            )
            raise NegalignError(
                f"{shards_dir / shard.name} holds the results of {said}, not of shard {shard} (its {DONE}): "
                f"delete that folder and rerun shard {shard}, then merge"
            )


def _check_slices(shards_dir: Path, plan: Plan, images: ImageList, tables: list[pa.Table]) -> None:
    """Each shard's rows must list exactly the images of its slice of the plan, in order."""
    for index, table in enumerate(tables):
        shard = Shard(index, plan.shards)
        start, stop = shard.bounds(len(images))
        wanted = printable_paths(images.paths[start:stop])
        # compared as Python lists: an Arrow array of `wanted` would import pandas (pa.array does)
        got = table.column("path").to_pylist()
        if got != wanted and (got := [str(p) for p in got]) != wanted:
            where = next((i for i, (a, b) in enumerate(zip(got, wanted, strict=False)) if a != b), None)
            detail = (
                f"{len(got)} rows for the slice's {len(wanted)} images"
                if where is None
                else f"row {where} is {got[where]!r}, the plan's {wanted[where]!r}"
            )
            raise NegalignError(
                f"{shards_dir / shard.name} does not hold shard {shard}'s images ({detail}): delete that "
                f"folder and rerun shard {shard}, then merge"
            )


def merge_shards(
    shards_dir: Path,
    workspace: Workspace,
    reporter: Reporter | None = None,
    expected: Plan | None = None,
    ignore: tuple[str, ...] = (),
) -> StageResult:
    """The unsharded artifact of a finished sharded run, assembled from the shards' rows (same
    key and bytes as a one-process run), stored in ``workspace``. With ``expected`` (the plan of
    the run the caller meant), a folder frozen for another run is refused."""
    reporter = reporter or NullReporter()
    shards_dir = Path(shards_dir)
    plan = read_plan(shards_dir)
    if STAGE_VERSIONS[plan.stage] != plan.version:
        raise NegalignError(
            f"{shards_dir / PLAN} was made for {plan.stage} version {plan.version}; this negalign writes "
            f"version {STAGE_VERSIONS[plan.stage]}: rerun the shards with this version"
        )
    if expected is not None:
        check_plan(shards_dir, expected, ignore)
    _foreign_folders(shards_dir, plan)
    stat_cache = workspace.store.stat_cache
    folders = [shards_dir / Shard(i, plan.shards).name / "artifact" for i in range(plan.shards)]
    with _verifying(shards_dir, plan, stat_cache) as verified:
        try:
            inputs = _merge_inputs(shards_dir, plan, folders, stat_cache)
            remembered = stat_cache.recall(inputs)
            if remembered is not None:  # these exact inputs were merged before: that artifact, if intact
                artifact = workspace.store.get(remembered.decode("ascii", "replace"))
                if artifact is not None and artifact.stage == plan.stage:
                    verified()
                    reporter.info(f"cache hit: {plan.stage} {artifact.key[:12]} (the merge of these shards)")
                    return StageResult(artifact, hit=True)
            with _system_arrow_pool():
                result = _computed_merge(shards_dir, plan, folders, workspace, reporter, verified)
        except Exception:
            verified()  # a shard that is not done explains any failure of the work begun beside it
            raise
    stat_cache.remember(inputs, result.artifact.key.encode("ascii"))
    return result


@contextlib.contextmanager
def _verifying(shards_dir: Path, plan: Plan, stat_cache: StatCache) -> Iterator[Callable[[], None]]:
    """Verify every shard (``missing_shards``: their files hashed against their manifests, where
    the stat cache cannot vouch for them) in a second thread, while the caller reads the plan's
    list and the shards' tables (hashlib releases the GIL: on a fresh cache that hashing is a
    quarter of a merge's CPU time). Yields the function that waits for it and raises the one-line
    error when a shard is not done; nothing is stored before it has returned."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="negalign-merge-verify") as pool:
        future = pool.submit(missing_shards, shards_dir, plan, stat_cache)

        def verified() -> None:
            missing = future.result()
            if missing:
                shown = ", ".join(str(s.index) for s in missing[:10]) + (" …" if len(missing) > 10 else "")
                raise NegalignError(
                    f"{len(missing)} of {plan.shards} shard(s) are not done (shard {shown}): rerun them "
                    "(finished shards are skipped), then merge"
                ) from None

        yield verified


@contextlib.contextmanager
def _system_arrow_pool() -> Iterator[None]:
    """Within this block pyarrow allocates with the C library's malloc. Its default allocator
    (mimalloc) takes 2 MiB pages and hands freed ones back to the system within milliseconds, then
    takes and zeroes fresh ones again: 1.1-1.5 s of system time in a merge of 2 x 10^5 images on a
    VM whose fresh pages are slow, 0.5 s with malloc (docs/performance.md)."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _computed_merge(
    shards_dir: Path,
    plan: Plan,
    folders: list[Path],
    workspace: Workspace,
    reporter: Reporter,
    verified: Callable[[], None],
) -> StageResult:
    """The merge itself (no remembered artifact): the image list, the shards' tables and rows;
    ``verified()`` (the shards' check) before anything is stored."""
    images = _read_images(shards_dir / PLAN_IMAGES)
    if images_digest(images) != plan.images or len(images) != plan.count:
        raise NegalignError(f"{shards_dir / PLAN_IMAGES} does not match {PLAN}: the shard folder is damaged")
    manifests = [json.loads((f / MANIFEST).read_text(encoding="utf-8")) for f in folders]
    tables = [read_table(f / files.IMAGE_TABLE) for f in folders]
    _check_slices(shards_dir, plan, images, tables)
    if sum(len(t) for t in tables) != len(images):
        raise NegalignError(
            f"the shards in {shards_dir} list {sum(len(t) for t in tables)} images, the plan {len(images)}"
        )
    merged = _merge_tables(tables)
    listing = Listing(images, merged.digests, merged.reasons)
    from_shard, from_row = merged.from_shard, merged.from_row

    def compute(folder: Path) -> dict[str, Any]:
        counts: dict[str, int] = {}
        hashed: dict[str, str] = {}
        with reporter.progress(f"merging {plan.shards} shards", len(ROW_FILES[plan.stage])) as advance:
            for name in ROW_FILES[plan.stage]:
                if name.endswith(".parquet"):
                    import pandas as pd  # the cam table only

                    frames = [pd.read_parquet(f / name) for f in folders]
                    picked = [p.iloc[from_row[from_shard == i]] for i, p in enumerate(frames)]
                    rows_table = _interleave_frames(picked, from_shard)
                    rows_table.to_parquet(folder / name, index=False)
                    if "cam_valid" in rows_table:
                        counts["cam_valid"] = int(rows_table["cam_valid"].sum())
                else:
                    parts = [np.load(f / name, mmap_mode="r") for f in folders]
                    hashed[name] = _save_rows(folder / name, parts, from_shard, from_row)
                advance(1)
        merged.write(folder / files.IMAGE_TABLE, listing)
        return {**_merged_manifest(plan, manifests, merged.count, counts), WRITTEN_DIGESTS: hashed}

    spec = plan.spec(listing.key)
    verified()
    return workspace.store.run(spec, compute, reporter)


def read_table(path: Path) -> pa.Table:
    """A parquet file as an Arrow table (with its schema's metadata), through the file reader:
    ``pq.read_table`` goes through ``pyarrow.dataset``, which imports pandas (half a second)."""
    import pyarrow.parquet as pq  # here: a merge served by its remembered key reads no table

    with pq.ParquetFile(path) as handle:
        return handle.read()


@dataclass
class _MergedTable:
    """The shards' ``images.parquet`` tables merged (``_merge_tables``): the image list's digests
    and reasons (for the key), where each output row comes from, and the merged table itself."""

    tables: list[pa.Table]
    digests: list[str | None]
    reasons: list[str]
    from_shard: np.ndarray  # per output row: the shard its row comes from
    from_row: np.ndarray  # and its row there
    columns: dict[str, pa.Array]  # the columns that differ from the shards' (row, status, reason)

    @property
    def count(self) -> int:
        return len(self.from_shard)

    def write(self, path: Path, listing: Listing) -> None:
        """``images.parquet``: the bytes ``image_table(...).to_parquet`` gives for the whole list,
        from the shards' own Arrow columns. Where the shards' schemas differ or the list has extra
        columns (pandas infers their types from the whole column, which a shard's schema cannot
        say), the table is built from lists as the unsharded run builds it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.tables[0].schema
        if listing.images.extra or any(not t.schema.equals(schema, check_metadata=True) for t in self.tables):
            rows = {
                d: int(r)
                for d, r in zip(self.digests, self.columns["row"].to_numpy(), strict=True)
                if r >= 0 and d is not None  # a row was stored only for an image with a digest
            }
            failures = {
                d: r
                for d, r, s in zip(
                    self.digests,
                    self.columns["reason"].to_pylist(),
                    self.columns["status"].to_pylist(),
                    strict=True,
                )
                if d and s != "ok"
            }
            image_table(listing, rows, failures).to_parquet(path, index=False)
            return
        # the labels are the plan's, as in a one-process run (the paths were checked against it):
        # the shards' where they are equal (pa.array of a list imports pandas, half a second)
        labels = pa.concat_arrays([t.column("label").combine_chunks() for t in self.tables])
        if labels.to_pylist() != listing.images.labels:
            labels = pa.array(listing.images.labels, type=schema.field("label").type)
        columns = {**self.columns, "label": labels}
        arrays = [
            columns[field.name]
            if field.name in columns
            else pa.concat_arrays([t.column(field.name).combine_chunks() for t in self.tables])
            for field in schema
        ]
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path, compression="snappy")


def _merge_tables(tables: list[pa.Table]) -> _MergedTable:
    """Merge the shards' ``images.parquet`` tables as one run over the whole list would have
    written it, with array operations only: an image is "ok" where its digest was processed by
    some shard; the output rows are the distinct ok digests in order of first appearance, each
    read from the first shard (in list order) that holds it; a failed image keeps the reason
    recorded for its digest (the last one in list order), an image without digest its own."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def column(name: str) -> pa.Array:
        return pa.concat_arrays([t.column(name).combine_chunks() for t in tables])

    empty, ok_text, skipped, not_processed = _arrow_strings("", "ok", "skipped", "not processed")
    digest = pc.fill_null(column("digest").cast(pa.string()), empty)
    recorded = pc.fill_null(column("reason").cast(pa.string()), empty)
    ok = _numpy(pc.equal(column("status").cast(pa.string()), ok_text))  # a null status: not ok
    local = _numpy(column("row"))
    shard_of = np.repeat(np.arange(len(tables)), [len(t) for t in tables])
    has = _numpy(pc.not_equal(digest, empty))
    encoded = digest.dictionary_encode()  # codes in order of first appearance
    codes = _numpy(encoded.indices)
    kinds = len(encoded.dictionary)
    done = np.zeros(kinds, dtype=bool)
    done[codes[ok & has]] = True  # digests some shard processed
    rank = np.cumsum(done) - 1  # their output row: order of first appearance
    is_row = has & done[codes]
    row = np.where(is_row, rank[codes], -1).astype(np.int64)
    # each output row's source: the first ok row of its digest
    ok_rows = np.flatnonzero(ok & has)
    _, first = np.unique(codes[ok_rows], return_index=True)
    source = ok_rows[first]
    # a digest that failed: the reason of its last failed row (what a dict built in order keeps)
    failed = np.flatnonzero(has & ~ok)
    last = np.full(kinds, -1, dtype=np.int64)
    np.maximum.at(last, codes[failed], failed)
    taken = np.arange(len(codes), dtype=np.int64)
    lost = has & ~is_row
    taken[lost] = last[codes[lost]]
    reason = recorded.take(_arrow(taken))
    reason = pc.if_else(_arrow(~has), pc.if_else(pc.equal(reason, empty), not_processed, reason), reason)
    reason = pc.if_else(_arrow(is_row), empty, reason)
    status = pc.if_else(_arrow(is_row), ok_text, skipped)
    schema = tables[0].schema
    columns = {
        "row": _arrow(row).cast(schema.field("row").type),
        "status": status.cast(schema.field("status").type),
        "reason": reason.cast(schema.field("reason").type),
    }
    digests = digest.to_pylist()
    listed = [d if d else None for d in digests]
    reasons = [r if not d else "" for d, r in zip(digests, recorded.to_pylist(), strict=True)]
    return _MergedTable(tables, listed, reasons, shard_of[source], local[source], columns)


# pyarrow imports pandas (~0.3-0.5 s) the first time it converts any Python or numpy value
# (pa.array, pa.scalar, a str given to a compute function, Array.to_numpy): the merge moves its
# arrays between numpy and Arrow through their buffers instead.
def _arrow_strings(*values: str) -> list[pa.Scalar]:
    """Arrow string scalars of a few constants."""
    import pyarrow as pa

    data = [value.encode("utf-8") for value in values]
    offsets = np.cumsum([0, *map(len, data)], dtype=np.int32)
    array = pa.Array.from_buffers(
        pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
    )
    return [array[i] for i in range(len(data))]


def _arrow(values: np.ndarray) -> pa.Array:
    """A 1-D int64 or bool numpy array as an Arrow array (no nulls), sharing or packing its bytes."""
    import pyarrow as pa

    if values.dtype == np.bool_:
        packed = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(packed)])
    ints = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(ints), [None, pa.py_buffer(ints)])


def _numpy(array: pa.Array) -> np.ndarray:
    """A bool Arrow array as numpy bools (null: False), an integer one as int64 (null: -1)."""
    import pyarrow as pa

    n, at = len(array), array.offset

    def bits(buffer: pa.Buffer | None, fill: bool) -> np.ndarray:
        if buffer is None:
            return np.full(n, fill)
        return np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")[at : at + n].astype(bool)

    if pa.types.is_boolean(array.type):
        validity, data = array.buffers()
        return bits(data, False) & bits(validity, True)
    array = array.cast(pa.int64())
    n, at = len(array), array.offset
    validity, data = array.buffers()
    if data is None:  # empty
        return np.zeros(0, dtype=np.int64)
    values = np.frombuffer(data, np.int64)[at : at + n]
    return np.where(bits(validity, True), values, -1) if array.null_count else values.copy()


_MERGE_INPUTS = 1  # what _merge_inputs covers; bump it when the merge reads anything else


def _merge_inputs(shards_dir: Path, plan: Plan, folders: list[Path], stat_cache: StatCache) -> str:
    """A name for everything a merge reads: the plan, the sha256 of the image list file and of
    every shard's manifest.json (whose outputs were just verified against their files, through
    ``stat_cache``: an unchanged file is not read again). Equal names, equal merged artifacts."""
    named = [shards_dir / PLAN_IMAGES, *(folder / MANIFEST for folder in folders)]
    digests = sha256_files(named, stat_cache)
    return f"merge {_MERGE_INPUTS} {sha256_json([plan.stage, plan.version, plan.digest, digests])}"


# A merged row file is written in chunks of this many bytes (a multiple of any file system's
# direct-I/O alignment), straight from our buffer to the disk where the system allows it
# (``O_DIRECT``): the copy into fresh page-cache pages cost 1.9-3.9 s of system time for 410 MB on
# a VM, the direct write about 0.3-0.5 s of waiting. The file is then not in the page cache: the
# next command reads it from the disk (docs/performance.md, "a computed merge").
_WRITE_CHUNK = 16 << 20
_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every write goes through the page cache


class _RowWriter:
    """Hashes one file's chunks as they are handed over and writes them in a second thread
    (``os.write`` releases the GIL: the disk's time overlaps the gathering and hashing of the
    next chunk), through ``O_DIRECT`` where the file system takes it; an aligned write it refuses
    (``EINVAL``) or a short one, and the unaligned tail, go through the page cache. The bytes and
    their sha256 are the same either way."""

    def __init__(self, path: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.digest = hashlib.sha256()
        self.direct = bool(_DIRECT)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags | _DIRECT, 0o666)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise
            self.direct = False  # a file system without direct I/O
            self.fd = os.open(path, flags, 0o666)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="negalign-merge-write")

    def submit(self, view: memoryview) -> Any:
        """Hash ``view`` here, then write it in the writer thread after the chunks submitted
        before (a future: wait for it before reusing the buffer behind ``view``)."""
        self.digest.update(view)
        return self.pool.submit(self._write, view)

    def _write(self, view: memoryview) -> None:
        while len(view):
            if self.direct and len(view) % _WRITE_CHUNK:
                self._buffered()  # the unaligned tail
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered()  # an alignment this file system will not take
                continue
            view = view[written:]
            if len(view) and self.direct:
                self._buffered()  # a short write: the rest is not aligned any more

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_DIRECT)
        self.direct = False

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # a write under way ends first
        os.close(self.fd)


def _save_rows(path: Path, parts: list[np.ndarray], from_shard: np.ndarray, from_row: np.ndarray) -> str:
    """``np.save`` of the rows ``parts[from_shard[k]][from_row[k]]`` (k in order), the same bytes,
    never gathered into a copy of the whole array: the rows are gathered chunk by chunk into one
    of two reused buffers (one ``np.take`` per stretch of rows from one shard) and written whole
    chunks at a time by :class:`_RowWriter`, which hashes them (the store need not read the file
    back). A row past the end of its shard's file is refused (the gather clips no index).
    Returns the sha256 of the bytes written."""
    import mmap

    first = parts[0]
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
        raise NegalignError(f"the shards' {path.name} files differ in shape or type: rerun the shards")
    count = len(from_shard)
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    if count and (from_row.min() < 0 or np.any(from_row >= lengths[from_shard])):
        raise NegalignError(f"the shards' tables name rows their {path.name} files lack: rerun the shards")
    header = {
        "descr": np.lib.format.dtype_to_descr(first.dtype),
        "fortran_order": False,
        "shape": (count, *first.shape[1:]),
    }
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    row_shape = first.shape[1:]
    row_bytes = first.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    # a chunk is topped up with whole rows to _WRITE_CHUNK bytes or more; what passes its end
    # starts the next one
    size = _WRITE_CHUNK + max(row_bytes, len(head.getvalue()))
    buffers = [mmap.mmap(-1, size), mmap.mmap(-1, size)]  # page-aligned, as direct I/O needs
    pending: list[Any] = [None, None]
    bounds = [*(np.flatnonzero(np.diff(from_shard) != 0) + 1).tolist(), count]  # where a shard's stretch ends
    writer = _RowWriter(path)
    try:
        which, fill, k, stretch = 0, len(head.getvalue()), 0, 0
        buffers[0][:fill] = head.getvalue()
        while True:
            buffer = memoryview(buffers[which])
            more = -(-(_WRITE_CHUNK - fill) // row_bytes) if row_bytes else count
            stop = k + min(count - k, max(0, more))
            while k < stop:  # each stretch of one shard's rows in this chunk: one gather
                while bounds[stretch] <= k:
                    stretch += 1
                end = min(stop, bounds[stretch])
                into = np.frombuffer(buffer, first.dtype, (end - k) * row_bytes // first.dtype.itemsize, fill)
                source = parts[int(from_shard[k])]
                np.take(source, from_row[k:end], axis=0, out=into.reshape(end - k, *row_shape), mode="clip")
                fill, k = fill + (end - k) * row_bytes, end
            last = k == count and fill <= _WRITE_CHUNK
            out = fill if last else _WRITE_CHUNK
            pending[which] = writer.submit(buffer[:out])
            other = 1 - which
            if pending[other] is not None:
                pending[other].result()  # the other buffer's chunk is written: it is free again
                pending[other] = None
            if last:
                pending[which].result()
                break
            buffers[other][: fill - out] = buffers[which][out:fill]
            which, fill = other, fill - out
    finally:
        writer.close()
    return writer.digest.hexdigest()


def _interleave_frames(frames: list[pd.DataFrame], from_shard: np.ndarray) -> pd.DataFrame:
    """Rows taken shard by shard put back in output order (``from_shard`` names each row's shard)."""
    import pandas as pd

    merged = pd.concat(frames, ignore_index=True)
    position = np.concatenate([np.flatnonzero(from_shard == i) for i in range(len(frames))])
    return merged.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)


def _merged_manifest(
    plan: Plan, manifests: list[dict[str, Any]], rows: int, recounted: Mapping[str, int]
) -> dict[str, Any]:
    counts = [m.get("counts", {}) for m in manifests]
    summed = {
        name: sum(int(c.get(name, 0)) for c in counts)
        for name in ("images", "skipped", "encoded", "cached", "computed")
        if any(name in c for c in counts)
    }
    summed["embedded" if plan.stage == EMBED_IMAGES_STAGE else "processed"] = rows
    summed["duplicates"] = plan.count - summed.get("skipped", 0) - rows
    summed.update(recounted)
    extra: dict[str, Any] = {"counts": summed, "images_source": plan.source}
    for name in ("model", "sources"):  # `sources`: the classes a `cam` run used, for score's messages
        if name in manifests[0]:
            extra[name] = manifests[0][name]
    extra["merged_from"] = {
        "shards": plan.shards,
        "keys": [m.get("key") for m in manifests],
        "plan": plan.digest,
    }
    return extra
