"""How `negalign merge` writes the merged row files: chunk by chunk from two reused buffers, the
whole chunks through O_DIRECT where the file system takes it (the page cache for an unaligned
tail, a write it refuses, or a file system without direct I/O), hashed in a writer thread; with
pyarrow on the system allocator and without importing pandas. Whatever the path, the files are
the bytes one unsharded run writes; a disk that fills up mid-write is one error line and leaves
no partial artifact."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from negalign_cli.hashing import sha256_text
from negalign_cli.inputs.listing import ImageList
from negalign_cli.stages import files, shards
from negalign_cli.stages.image_rows import (
    EMBED_IMAGES_STAGE,
    EMBED_IMAGES_VERSION,
    Listing,
    image_table,
    row_order,
)
from tests.faults.helpers import cli, one_line_error
from tests.faults.test_storage_faults import fill, tmpfs
from tests.helpers import IMPORT_SPY

ROOT = Path(__file__).resolve().parents[1]
MERGED = (files.IMAGE_EMBEDDINGS, files.IMAGE_TABLE)


# ----------------------------------------------------------------------------- synthetic runs
def _vectors(contents: list[int], dim: int) -> np.ndarray:
    """Each content's vector, a fixed function of it (as an encoder's is of the image)."""
    grid = np.outer(np.asarray(contents, dtype=np.float64) + 1.0, np.arange(1, dim + 1)) * 0.37
    return np.sin(grid).astype(np.float32).reshape(len(contents), dim)


def _run(images: ImageList, contents: list[int | None], dim: int, dtype: str):
    """What `embed images` computes for ``images`` (image i holds content ``contents[i]``, None:
    unreadable): the listing and the function writing its artifact."""
    digests = [None if c is None else sha256_text(f"image {c}") for c in contents]
    reasons = ["" if c is not None else "cannot identify image file" for c in contents]
    listing = Listing(images, digests, reasons)
    found = row_order(listing, {d for d in digests if d is not None})
    content_of = {d: c for d, c in zip(digests, contents, strict=True) if d is not None}

    def compute(out: Path) -> dict[str, object]:
        order = sorted(found, key=found.__getitem__)
        np.save(out / files.IMAGE_EMBEDDINGS, _vectors([content_of[d] for d in order], dim).astype(dtype))
        image_table(listing, found, {}).to_parquet(out / files.IMAGE_TABLE, index=False)
        skipped = digests.count(None)
        counts = {"images": len(images), "embedded": len(found), "skipped": skipped}
        counts.update(duplicates=len(images) - skipped - len(found), encoded=len(found), cached=0)
        return {"counts": counts, "images_source": images.source}

    return listing, compute


def _sharded_and_whole(tmp_path: Path, contents: list[int | None], count: int, dim: int, dtype: str):
    """A finished sharded run in ``tmp_path/runs`` (the layout `run_shard` writes) and the
    artifact folder of one unsharded run over the same list."""
    from negalign_cli.cache.store import StageSpec
    from negalign_cli.cache.workspace import Workspace

    n = len(contents)
    images = ImageList(
        "/data", [f"/data/c{i % 3}/{i:05d}.png" for i in range(n)], [f"c{i % 3}" for i in range(n)], {}
    )
    params = {"store_dtype": dtype, "precision": "fp32", "items_version": 1, "max_pixels": 89_478_485}
    spec = StageSpec(EMBED_IMAGES_STAGE, EMBED_IMAGES_VERSION, params, {"model": "test-model"})

    def stored(workspace: Workspace, part: ImageList, part_contents: list[int | None]):
        listing, compute = _run(part, part_contents, dim, dtype)
        keyed = StageSpec(spec.stage, spec.version, params, {**spec.inputs, "images": listing.key})
        return workspace.store.run(keyed, compute)

    runs = tmp_path / "runs"
    for index in range(count):
        shard = shards.Shard(index, count)
        start, stop = shard.bounds(n)
        workspace = Workspace.open(runs / shard.name / "cache")
        shards.run_shard(
            runs, shard, spec, images, lambda p, s=start, e=stop, w=workspace: stored(w, p, contents[s:e])
        )
        workspace.close()
    whole = Workspace.open(tmp_path / "whole-cache")
    artifact = stored(whole, images, contents).artifact
    whole.close()
    return runs, artifact.path


def _merged_folder(cache: Path) -> Path:
    (folder,) = (cache / "artifacts" / EMBED_IMAGES_STAGE).iterdir()
    return folder


# A shard's slice is contents[i*n//K:(i+1)*n//K]; None is an unreadable image.
ODD_RUNS = {
    # every other image a copy of one before it, also across the shard boundaries: runs of one row
    "duplicates across shards, runs of one row": [
        0,
        1,
        0,
        2,
        1,
        3,
        2,
        None,
        4,
        3,
        5,
        4,
        6,
        0,
        7,
        6,
        8,
        9,
        8,
        1,
    ],
    # the middle shard holds only copies of the first shard's images and unreadable ones
    "a shard with no row of its own": [0, 1, 2, 3, 4, 5, 6, 7, 2, None, 0, 7, 1, 1, 9, 10, 11, 9, 12, 3, 13],
}


@pytest.mark.parametrize(
    ("case", "dim", "dtype", "chunk"),
    [
        ("duplicates across shards, runs of one row", 96, "float32", 4096),  # rows across chunk ends
        ("a shard with no row of its own", 96, "float16", 4096 + 100),  # unaligned chunks: refused
        ("duplicates across shards, runs of one row", 1536, "float32", 4096),  # a row over a chunk
    ],
)
def test_the_merged_files_are_one_runs_bytes(tmp_path, monkeypatch, case, dim, dtype, chunk):
    """Three shards of an odd list merged with small write chunks (rows straddling chunk ends,
    rows larger than a chunk, chunks whose size direct I/O refuses): the merged files and key
    are those of the one-process run, and pyarrow allocated from the system pool meanwhile."""
    import pyarrow as pa

    monkeypatch.setattr(shards, "_WRITE_CHUNK", chunk)
    pools: list[str] = []
    merge_tables = shards._merge_tables
    monkeypatch.setattr(
        shards,
        "_merge_tables",
        lambda t: pools.append(pa.default_memory_pool().backend_name) or merge_tables(t),
    )
    before = pa.default_memory_pool().backend_name
    runs, whole = _sharded_and_whole(tmp_path, ODD_RUNS[case], 3, dim, dtype)
    merged = cli("merge", str(runs), "--cache-dir", str(tmp_path / "c"))
    assert merged.exit_code == 0, merged.output
    folder = _merged_folder(tmp_path / "c")
    assert folder.name == whole.name  # the key
    for name in MERGED:
        assert (folder / name).read_bytes() == (whole / name).read_bytes(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / files.IMAGE_EMBEDDINGS).read_bytes()
    assert manifest["outputs"][files.IMAGE_EMBEDDINGS]["sha256"] == hashlib.sha256(data).hexdigest()
    assert pools == ["system"] and pa.default_memory_pool().backend_name == before


# ----------------------------------------------------------------------------- the write path
def _direct_io(folder: Path) -> str | None:
    """Whether ``folder``'s file system takes O_DIRECT, and enforces its alignment: "aligned" (a
    512-byte-unaligned direct write is refused), "any" (taken), or None (no direct I/O)."""
    import mmap

    probe = folder / ".direct-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return None
    buffer = mmap.mmap(-1, 8192)
    try:
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            return None
        try:
            os.write(fd, memoryview(buffer)[:100])
        except OSError as exc:
            return "aligned" if exc.errno == errno.EINVAL else None
        return "any"
    finally:
        os.close(fd)
        buffer.close()
        probe.unlink()


def _spy_writes(monkeypatch) -> list[tuple[int, bool, str]]:
    """Every os.write: its length, whether the file was open for direct I/O, what came of it."""
    seen: list[tuple[int, bool, str]] = []
    write = os.write

    def spy(fd: int, data) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        try:
            done = write(fd, data)
        except OSError as exc:
            seen.append((len(data), direct, errno.errorcode.get(exc.errno or 0, "?")))
            raise
        seen.append((len(data), direct, "ok" if done == len(data) else f"short {done}"))
        return done

    monkeypatch.setattr(os, "write", spy)
    return seen


def _parts(tmp_path: Path, dtype: str, dim: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    parts = []
    for index, rows in enumerate((70, 0, 45)):
        np.save(tmp_path / f"part{index}.npy", rng.standard_normal((rows, dim)).astype(dtype))
        parts.append(np.load(tmp_path / f"part{index}.npy", mmap_mode="r"))
    return parts


def _expected(parts, from_shard, from_row) -> bytes:
    import io

    out = io.BytesIO()
    gathered = [parts[s][r] for s, r in zip(from_shard.tolist(), from_row.tolist(), strict=True)]
    np.save(out, np.array(gathered, dtype=parts[0].dtype).reshape(len(gathered), *parts[0].shape[1:]))
    return out.getvalue()


# both shards, runs of one row and longer ones, a row used twice, a jump back inside a shard
FROM_SHARD = np.array([0] * 30 + [2] * 10 + [0, 2, 0, 2] + [2] * 30 + [0] * 25 + [0], dtype=np.int64)
FROM_ROW = np.array(
    [*range(30), *range(10), 30, 10, 31, 11, *range(12, 42), *range(40, 65), 3], dtype=np.int64
)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_whole_chunks_go_straight_to_disk_and_the_tail_through_the_page_cache(tmp_path, monkeypatch, dtype):
    """Before: one buffered write per run of rows (no direct I/O: each byte copied into fresh
    page-cache pages). After: whole 4 KiB-multiple chunks written with O_DIRECT, only the last,
    shorter one without; np.save's bytes and their sha256."""
    kind = _direct_io(tmp_path)
    if kind is None:
        pytest.skip(f"{tmp_path}'s file system takes no direct I/O")
    monkeypatch.setattr(shards, "_WRITE_CHUNK", 8192)
    parts = _parts(tmp_path, dtype, 160)
    seen = _spy_writes(monkeypatch)
    digest = shards._save_rows(tmp_path / "merged.npy", parts, FROM_SHARD, FROM_ROW)
    expected = _expected(parts, FROM_SHARD, FROM_ROW)
    assert (tmp_path / "merged.npy").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    whole, tail = divmod(len(expected), 8192)
    assert whole >= 2 and tail
    assert seen == [(8192, True, "ok")] * whole + [(tail, False, "ok")]


def test_a_chunk_direct_io_refuses_is_written_through_the_page_cache(tmp_path, monkeypatch):
    """A file system that enforces direct I/O's alignment (ext4, xfs) refuses a chunk whose size
    is no multiple of its block: that write, and every one after it, goes through the page
    cache; the bytes are np.save's."""
    if _direct_io(tmp_path) != "aligned":
        pytest.skip(f"{tmp_path}'s file system does not enforce direct I/O alignment")
    monkeypatch.setattr(shards, "_WRITE_CHUNK", 4096 + 100)
    parts = _parts(tmp_path, "float32", 160)
    seen = _spy_writes(monkeypatch)
    digest = shards._save_rows(tmp_path / "merged.npy", parts, FROM_SHARD, FROM_ROW)
    expected = _expected(parts, FROM_SHARD, FROM_ROW)
    assert (tmp_path / "merged.npy").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert seen[0] == (4196, True, "EINVAL") and seen[1] == (4196, False, "ok")
    assert not any(direct for _, direct, _ in seen[1:])


def test_a_file_system_without_direct_io_is_written_through_the_page_cache(tmp_path, monkeypatch):
    """Where opening with O_DIRECT is refused (EINVAL: a file system without direct I/O; faked
    here, beside the real refusals above), the file is opened and written without it."""
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(shards, "_WRITE_CHUNK", 8192)
    monkeypatch.setattr(os, "open", no_direct)
    parts = _parts(tmp_path, "float16", 160)
    seen = _spy_writes(monkeypatch)
    shards._save_rows(tmp_path / "merged.npy", parts, FROM_SHARD, FROM_ROW)
    assert (tmp_path / "merged.npy").read_bytes() == _expected(parts, FROM_SHARD, FROM_ROW)
    assert seen and not any(direct for _, direct, _ in seen)


def test_rows_a_table_names_past_a_shards_file_are_refused(tmp_path):
    """The gather clips no index: a row past the end of a shard's file is an error, not its last row."""
    from negalign_cli.errors import NegalignError

    parts = _parts(tmp_path, "float32", 8)
    with pytest.raises(NegalignError, match="name rows their merged.npy files lack"):
        shards._save_rows(tmp_path / "merged.npy", parts, np.array([0, 2]), np.array([3, 45]))


def test_arrow_and_numpy_meet_through_their_buffers():
    """The merge's own conversions (pa.array and Array.to_numpy import pandas): sliced arrays,
    nulls (bool: False, int: -1), int32 indices."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = np.array([True, False, True, True, False, False, True, False, True, True])
    assert shards._numpy(shards._arrow(values)).tolist() == values.tolist()
    ints = np.array([5, -2, 7, 0, 9], dtype=np.int64)
    assert shards._numpy(shards._arrow(ints)).tolist() == ints.tolist()
    flags = pc.equal(shards._arrow(ints), shards._arrow(np.array([5, 1, 7, 0, 0]))).slice(1)
    with_null = pc.if_else(shards._arrow(np.array([True, False, True, True])), flags, pa.nulls(4, pa.bool_()))
    assert shards._numpy(with_null).tolist() == [False, False, True, False]
    nulled = pc.if_else(
        shards._arrow(np.array([True, False, True])), shards._arrow(ints[:3]), pa.nulls(3, pa.int64())
    )
    assert shards._numpy(nulled.slice(1)).tolist() == [-1, 7]
    assert shards._numpy(pa.chunked_array([[]], pa.int32()).combine_chunks()).tolist() == []
    empty, ok = shards._arrow_strings("", "ok")
    assert (empty.as_py(), ok.as_py(), ok.type) == ("", "ok", pa.string())


# ----------------------------------------------------------------------------- a full disk
def test_a_disk_full_during_the_merged_rows_is_one_line_and_leaves_no_partial_artifact(tmp_path, monkeypatch):
    """A real tmpfs under --cache-dir with room for the cache's databases but not for the merged
    rows (1.5 MB, written in 64 KiB chunks): one `disk full` line naming the artifact being
    written, nothing left in the cache's tmp/ nor artifacts/, the space given back; once the
    tmpfs is larger, the same merge completes with the one-process run's bytes."""
    monkeypatch.setattr(shards, "_WRITE_CHUNK", 64 << 10)
    contents = [*range(300), *range(0, 300, 7), None, *range(300, 400)]
    runs, whole = _sharded_and_whole(tmp_path, contents, 2, 1024, "float32")
    disk = tmp_path / "disk"
    with tmpfs(disk, "3m"):
        cache = disk / "c"
        fill(disk, 1 << 20)
        used = _used(disk)
        seen = _spy_writes(monkeypatch)
        line = one_line_error(cli("merge", str(runs), "--cache-dir", str(cache)), "disk full while writing ")
        monkeypatch.undo()
        assert f"{cache / 'tmp'}/" in line and f"free space on {disk} and rerun" in line, line
        assert any(result in ("ENOSPC",) or result.startswith("short") for *_, result in seen), seen
        assert list((cache / "tmp").iterdir()) == []
        assert not (cache / "artifacts" / EMBED_IMAGES_STAGE).exists() or not any(
            (cache / "artifacts" / EMBED_IMAGES_STAGE).iterdir()
        )
        assert _used(disk) - used < 256 << 10  # the databases' pages, not the partial rows
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = cli("merge", str(runs), "--cache-dir", str(cache))
        assert again.exit_code == 0, again.output
        folder = _merged_folder(cache)
        assert folder.name == whole.name
        for name in MERGED:
            assert (folder / name).read_bytes() == (whole / name).read_bytes(), name


def _used(mount: Path) -> int:
    stats = os.statvfs(mount)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


# ----------------------------------------------------------------------------- no pandas
_MERGE = (
    IMPORT_SPY
    + """
done = CliRunner().invoke(app, json.loads(sys.argv[1]), env={"COLUMNS": "200"})
print(json.dumps({"code": done.exit_code, "output": done.output, "first": first,
                  "imported": [m for m in HEAVY if m in sys.modules]}))
"""
)


def test_a_computed_merge_imports_no_pandas(tmp_path):
    """In one fresh process (pyarrow imports pandas, ~0.3-0.5 s, the first time it converts any
    Python or numpy value, once per process): a merge computed on a fresh cache imports neither
    pandas nor torch. Before: pandas, first from `pc.fill_null(..., "")` in `_merge_tables`."""
    runs, whole = _sharded_and_whole(
        tmp_path, ODD_RUNS["duplicates across shards, runs of one row"], 2, 16, "float32"
    )
    argv = ["merge", str(runs), "--cache-dir", str(tmp_path / "c")]
    done = subprocess.run(
        [sys.executable, "-c", _MERGE, json.dumps(argv), json.dumps(["pandas", "torch"])],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0 and "merged 2 shard(s)" in " ".join(seen["output"].split()), seen["output"]
    where = {m: seen["first"].get(m) for m in seen["imported"]}
    assert not seen["imported"], f"a computed merge imported {seen['imported']}, first from {where}"
    folder = _merged_folder(tmp_path / "c")
    for name in MERGED:
        assert (folder / name).read_bytes() == (whole / name).read_bytes(), name


# ----------------------------------------------------------------------------- verified beside
def test_the_shards_are_verified_while_their_tables_are_read(tmp_path, monkeypatch):
    """Before: the shards' files were hashed (verified), then the tables read, one after the
    other. After: the verification runs in a second thread while the main one reads and merges
    the tables (the verification here waits until a table has been read: in one thread it would
    wait in vain); the result is the one-process run's."""
    import threading

    runs, whole = _sharded_and_whole(tmp_path, ODD_RUNS["a shard with no row of its own"], 3, 8, "float32")
    table_read = threading.Event()
    overlapped: list[bool] = []
    missing, read_table = shards.missing_shards, shards.read_table
    monkeypatch.setattr(shards, "read_table", lambda path: table_read.set() or read_table(path))

    def verify(*args, **kwargs):
        overlapped.append(table_read.wait(timeout=5))
        return missing(*args, **kwargs)

    monkeypatch.setattr(shards, "missing_shards", verify)
    merged = cli("merge", str(runs), "--cache-dir", str(tmp_path / "c"))
    assert merged.exit_code == 0, merged.output
    assert overlapped == [True]
    for name in MERGED:
        assert (_merged_folder(tmp_path / "c") / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.parametrize("damage", ["rows rewritten", "table deleted"])
def test_a_damaged_shard_is_the_error_and_nothing_is_stored(tmp_path, damage):
    """Whatever the work begun beside the verification met (a table that is gone, rows that
    read fine), the error is the shard that is not done, and nothing is stored."""
    runs, _ = _sharded_and_whole(
        tmp_path, ODD_RUNS["duplicates across shards, runs of one row"], 2, 8, "float32"
    )
    artifact = runs / "shard-00001-of-00002" / "artifact"
    if damage == "table deleted":
        (artifact / files.IMAGE_TABLE).unlink()
    else:
        data = bytearray((artifact / files.IMAGE_EMBEDDINGS).read_bytes())
        data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
        (artifact / files.IMAGE_EMBEDDINGS).write_bytes(bytes(data))
    cache = tmp_path / "c"
    one_line_error(
        cli("merge", str(runs), "--cache-dir", str(cache)), "1 of 2 shard(s) are not done (shard 1)"
    )
    assert not (cache / "artifacts").exists() or not any((cache / "artifacts").rglob("*.npy"))
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
