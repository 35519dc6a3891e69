"""Fault suite: the storage under the cache. A lost vector index, a file system re-created at the
same path, a full disk: each is detected and said in one line, never silently wrong.

The file-system cases run on a real tmpfs (``mount -t tmpfs``; root can, here and in CI), mounted
under the test's temporary folder and unmounted at the end."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from negalign_cli.cache.items import ItemStore
from negalign_cli.cache.statcache import StatCache
from negalign_cli.cache.store import ArtifactStore, StageSpec
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.listing import digest_all
from tests.faults.helpers import cli, one_line_error

OLD_NS = 1_600_000_000 * 10**9  # a modification time long past: never "racy"


def _mount(path: Path, size: str) -> None:
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


def _unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _mount_on_device(path: Path, size: str, device: int, seconds: float = 30.0) -> None:
    """Mount a fresh tmpfs at ``path`` whose ``st_dev`` is ``device``.

    Anonymous device numbers belong to the whole kernel and go to the lowest free one, so a tmpfs
    mounted meanwhile by a parallel test (or another container) can take the number a re-created
    file system would have had. Each lower number handed to us is held by a spare mount until the
    wanted one comes; when someone else holds it, the spares are let go and the wait starts again.
    The wanted mount reaches ``path`` by a bind mount, which keeps its device and inodes."""
    spares = Path(tempfile.mkdtemp(prefix=".spare-tmpfs-", dir=path.parent))
    deadline = time.monotonic() + seconds
    held: list[Path] = []
    try:
        for i in itertools.count():
            spare = spares / str(i)
            spare.mkdir()
            _mount(spare, size)
            held.append(spare)
            got = os.minor(os.stat(spare).st_dev)
            if got == os.minor(device):
                subprocess.run(["mount", "--bind", str(spare), str(path)], check=True)
                return
            if got > os.minor(device) or len(held) > 256:
                for mount in held:
                    _unmount(mount)
                held.clear()
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"device {os.minor(device)} stayed taken by another mount for {seconds:.0f} s"
                    )
                time.sleep(0.05)
    finally:
        for mount in held:
            _unmount(mount)
        shutil.rmtree(spares)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", device: int | None = None) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path`` (skipped where mounting is not allowed); with
    ``device``, a fresh one on that device number, as a file system re-created at the same path
    gets when nothing else mounts in between."""
    path.mkdir(parents=True, exist_ok=True)
    if device is None:
        _mount(path, size)
    else:
        _mount_on_device(path, size, device)
    try:
        yield path
    finally:
        gc.collect()  # in-process commands' database connections close, as at a process's end
        _unmount(path)


def fill(mount: Path, leave: int = 0) -> None:
    """Take the file system's free space, all of it or all but ``leave`` bytes."""
    stats = os.statvfs(mount)
    free = stats.f_bavail * stats.f_frsize
    # unbuffered: nothing is left to flush (and fail) at close; ENOSPC is full, as wanted
    with open(mount / f"filler-{leave}", "wb", buffering=0) as handle, contextlib.suppress(OSError):
        handle.write(b"\0" * max(0, free - leave))


def _digest_files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _put(root: Path, kind: str, words: list[str], vectors: np.ndarray) -> str:
    """Store vectors in a namespace as one writer process does (one new shard file); its id."""
    store = ItemStore(root)
    ns = store.namespace(kind, "model-x", {}, dim=vectors.shape[1])
    ns.put_many(words, vectors)
    store.close()
    return ns.id


def _read(root: Path, kind: str, words: list[str], dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    store = ItemStore(root)
    ns = store.namespace(kind, "model-x", {}, dim=dim)
    vectors, found = ns.get_many(words)
    store.close()
    return vectors, found, ns.corrupt


# ----------------------------------------------------------------------------- item 8: lost index
def test_a_lost_vector_index_is_refused_not_recreated_empty_and_repair_rebuilds_it(tmp_path, folder):
    """Before: the next command made a new empty index (every vector orphaned), then failed on
    "File exists" numbering a shard over an old one, and `cache repair` called the store intact."""
    cache = tmp_path / "c"
    base = ["--cache-dir", str(cache)]
    embed = ["embed", "images", "--images", str(folder), "--workers", "0", *base]
    assert cli(*embed).exit_code == 0
    gc.collect()
    for part in (cache / "vectors").glob("index.db*"):
        part.unlink()
    needs_vectors = [*embed, "--store-dtype", "float16"]  # a new artifact, from the stored vectors
    one_line_error(cli(*needs_vectors), "vectors/index.db is missing but 1 shard file(s)")
    one_line_error(cli(*needs_vectors), "run `negalign cache repair`")  # nothing was recreated meanwhile
    assert not (cache / "vectors" / "index.db").exists()
    repaired = cli("cache", "repair", *base)
    assert repaired.exit_code == 0, repaired.output
    assert "per-item vectors: 8 kept, 0 unreadable" in repaired.output
    assert "rebuilt because it was missing" in repaired.output
    again = cli(*needs_vectors)
    assert again.exit_code == 0 and "encoded 0, cached 8" in again.output  # every vector kept
    assert "per-item vectors intact" in cli("cache", "repair", *base).output


@pytest.mark.parametrize("index", ["unaware", "garbage"])
def test_two_namespaces_shard_files_stay_apart_when_the_index_is_rebuilt(tmp_path, index):
    """Two namespaces each holding ``00000001.rec`` (what a store whose index was recreated ends
    with). Before: repair called an index that did not know the second one intact, and a rebuild
    filed both files as one shard ("303 kept", then checksum failures)."""
    words_a = [f"a{i}" for i in range(30)]
    words_b = [f"b{i}" for i in range(20)]
    a, b = _vectors(30, 6, 0), _vectors(20, 4, 1)
    root, other = tmp_path / "c", tmp_path / "other"
    ns_a = _put(root, "text", words_a, a)
    ns_b = _put(other, "image", words_b, b)
    shutil.copytree(other / "vectors" / ns_b, root / "vectors" / ns_b)  # unknown to root's index
    names = sorted(str(p.relative_to(root / "vectors")) for p in (root / "vectors").glob("*/*.rec"))
    assert names == sorted([f"{ns_a}/00000001.rec", f"{ns_b}/00000001.rec"])
    if index == "garbage":
        (root / "vectors" / "index.db").write_bytes(b"garbage" * 1000)
    repaired = cli("cache", "repair", "--cache-dir", str(root))
    assert repaired.exit_code == 0, repaired.output
    assert "per-item vectors: 50 kept, 0 unreadable" in repaired.output
    why = "it did not know 1 shard file(s)" if index == "unaware" else "it was damaged"
    assert why in repaired.output
    for kind, words, expected in (("text", words_a, a), ("image", words_b, b)):
        vectors, found, corrupt = _read(root, kind, words, expected.shape[1])
        assert found.all() and corrupt == 0
        np.testing.assert_array_equal(vectors, expected)
    assert "per-item vectors intact" in cli("cache", "repair", "--cache-dir", str(root)).output


def test_a_new_shard_never_takes_the_number_of_an_existing_file(tmp_path):
    """A namespace folder holding files the index never numbered (its ``00000002.rec``): a new
    writer's shard number 2 must not open that file. Before: "File exists", exit 2, nothing stored."""
    root, other = tmp_path / "c", tmp_path / "other"
    _put(root, "text", ["x"], _vectors(1, 4, 0))  # root's index: shard 1
    first, second = _vectors(3, 4, 1), _vectors(3, 4, 2)
    ns_b = _put(other, "image", ["p", "q", "r"], first)  # other's shard 1
    _put(other, "image", ["s", "t", "u"], second)  # other's shard 2 (a second writer)
    shutil.copytree(other / "vectors" / ns_b, root / "vectors" / ns_b)
    before = _digest_files(root / "vectors" / ns_b)
    assert sorted(before) == ["00000001.rec", "00000002.rec", "meta.json"]
    new = _vectors(2, 4, 3)
    _put(root, "image", ["v", "w"], new)  # root's next shard number is 2
    after = _digest_files(root / "vectors" / ns_b)
    assert {name: after[name] for name in before} == before  # the old files untouched
    assert sorted(after) == ["00000001.rec", "00000002.rec", "00000003.rec", "meta.json"]
    vectors, found, corrupt = _read(root, "image", ["v", "w"], 4)
    assert found.all() and corrupt == 0
    np.testing.assert_array_equal(vectors, new)
    # the old files are adopted by a repair, which finds the index did not know them
    repaired = cli("cache", "repair", "--cache-dir", str(root))
    assert "rebuilt because it did not know 2 shard file(s)" in repaired.output, repaired.output
    vectors, found, corrupt = _read(root, "image", ["p", "q", "r", "s", "t", "u", "v", "w"], 4)
    assert found.all() and corrupt == 0
    np.testing.assert_array_equal(vectors, np.concatenate([first, second, new]))


# ----------------------------------------------------------------------------- item 9: stat cache
def test_the_stat_cache_sees_files_on_a_re_created_tmpfs(tmp_path):
    """A fresh tmpfs at the same path hands out the same inodes and device; files of the same size
    copied with their mtimes kept (``cp -p``, ``shutil.copy2``) then match every (size, mtime,
    inode, device) row. Before: every digest was the old content's. The ctime tells them apart."""
    data = tmp_path / "data"
    sources = tmp_path / "sources"
    sources.mkdir()
    old = [f"old content {i}".encode() for i in range(4)]
    new = [f"NEW CONTENT {i}".encode() for i in range(4)]  # the same sizes
    assert [len(x) for x in old] == [len(x) for x in new]
    stat_db = tmp_path / "stat.db"
    paths = [str(data / f"f{i}.bin") for i in range(4)]

    def copy_in(contents: list[bytes]) -> list[tuple[int, int, int, int]]:
        for i, content in enumerate(contents):
            source = sources / f"f{i}.bin"
            source.write_bytes(content)
            os.utime(source, ns=(OLD_NS, OLD_NS))
            shutil.copy2(source, data / f"f{i}.bin")  # keeps the mtime
        return [(s.st_size, s.st_mtime_ns, s.st_ino, s.st_dev) for s in map(os.stat, paths)]

    def digests() -> list[str | None]:
        return [
            d
            for d, _ in StatCache(stat_db).digests(
                paths, lambda todo: digest_all([paths[i] for i in todo], 1)
            )
        ]

    with tmpfs(data, "16m"):
        first = copy_in(old)
        assert digests() == [hashlib.sha256(x).hexdigest() for x in old]
        assert StatCache(stat_db).digests(paths, lambda todo: pytest.fail("hashed again"))  # remembered
    with tmpfs(data, "16m", device=first[0][3]):
        second = copy_in(new)
        assert second == first  # the scenario: every field of the old key is the same
        assert digests() == [hashlib.sha256(x).hexdigest() for x in new]


def test_embed_images_on_a_re_created_tmpfs_embeds_the_new_pictures(tmp_path):
    """The same through the CLI: a data folder on a tmpfs, embedded; the tmpfs re-created and filled
    with other pictures of the same size (BMP: same dimensions, same bytes count) with the old
    mtimes. Before: "encoded 0, cached 8", the old pictures' embeddings under the new files."""
    from tests.helpers.images import rgb

    data = tmp_path / "data"
    staging = tmp_path / "staging"
    cache = ["--cache-dir", str(tmp_path / "c")]

    def pictures(seed: int) -> None:
        for i in range(8):
            source = staging / f"{i}.bmp"
            source.parent.mkdir(exist_ok=True)
            rgb(seed + i).save(source)
            os.utime(source, ns=(OLD_NS, OLD_NS))
            shutil.copy2(source, data / f"{i}.bmp")

    def embed():
        return cli("embed", "images", "--images", str(data), "--workers", "0", *cache)

    with tmpfs(data, "16m"):
        pictures(100)
        first = embed()
        assert first.exit_code == 0 and "encoded 8, cached 0" in first.output, first.output
        device = os.stat(data).st_dev
    with tmpfs(data, "16m", device=device):
        pictures(200)
        second = embed()
        assert second.exit_code == 0 and "encoded 8, cached 0" in second.output, second.output


def test_a_stat_db_of_the_old_schema_is_not_trusted(tmp_path):
    """Rows written before the ctime was in the key (schema 1) are dropped, not matched."""
    import sqlite3

    from negalign_cli.cache.statcache import _checksum

    path = tmp_path / "f.bin"
    path.write_bytes(b"real content")
    os.utime(path, ns=(OLD_NS, OLD_NS))
    st = os.stat(path)
    db = sqlite3.connect(tmp_path / "stat.db")
    db.execute(
        "CREATE TABLE stat (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, "
        "device INTEGER, digest TEXT, checksum BLOB) WITHOUT ROWID"
    )
    key = str(path).encode()
    db.execute(
        "INSERT INTO stat VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, "0" * 64, _checksum(key, "0" * 64)),
    )
    db.commit()
    db.close()
    found = StatCache(tmp_path / "stat.db").digests([str(path)], lambda todo: digest_all([str(path)], 1))
    assert found == [(hashlib.sha256(b"real content").hexdigest(), "")]


# ----------------------------------------------------------------------------- item 12: disk full
@pytest.mark.parametrize("leave_kib", [0, 48, 160, 300, 330])  # here: stat.db, leases, index, ...
def test_a_full_disk_under_the_cache_is_one_line_naming_the_file_and_the_disk(tmp_path, folder, leave_kib):
    """A real full tmpfs under --cache-dir, full at different points of a run (the databases'
    creation, the vectors, the artifact). Before: "the cache database ... is damaged: run `negalign
    cache repair`" for a database that only lacked room. After: the file, the disk, exit 2; and once
    space is freed the run completes."""
    disk = tmp_path / "disk"
    with tmpfs(disk):
        cache = disk / "c"
        fill(disk, leave_kib * 1024)
        args = ["embed", "images", "--images", str(folder), "--workers", "0", "--cache-dir", str(cache)]
        result = cli(*args)
        if result.exit_code == 0:  # it fitted: nothing to say (the largest room may)
            return
        line = one_line_error(result, "disk full while writing ")
        assert f"{cache}/" in line and f"free space on {disk} and rerun" in line, line
        assert "repair" not in line and "damaged" not in line
        gc.collect()
        assert not list(cache.rglob("*damaged*"))
        for filler in disk.glob("filler-*"):
            filler.unlink()
        again = cli(*args)
        assert again.exit_code == 0, again.output
        assert "8 of 8 images embedded" in again.output


def test_repair_on_a_full_disk_never_moves_a_healthy_index_aside(tmp_path, folder):
    """Before: `cache repair` on a full disk took SQLite's "database or disk is full" for damage and
    moved the healthy indexes aside (the vectors and artifacts with them, until a rebuild)."""
    disk = tmp_path / "disk"
    with tmpfs(disk):
        cache = disk / "c"
        base = ["--cache-dir", str(cache)]
        embed = ["embed", "images", "--images", str(folder), "--workers", "0", *base]
        assert cli(*embed).exit_code == 0
        gc.collect()
        before = set(os.listdir(cache)) | set(os.listdir(cache / "vectors"))
        fill(disk)
        repaired = cli("cache", "repair", *base)
        if repaired.exit_code != 0:
            line = one_line_error(repaired, "disk full while writing ")
            assert f"free space on {disk}" in line
        gc.collect()
        assert not list(cache.rglob("*damaged*")), repaired.output
        after = set(os.listdir(cache)) | set(os.listdir(cache / "vectors"))
        assert after <= before | {"index.db-wal", "index.db-shm"}
        for filler in disk.glob("filler-*"):
            filler.unlink()
        hit = cli(*embed, "--store-dtype", "float16")  # needs every stored vector
        assert hit.exit_code == 0 and "encoded 0, cached 8" in hit.output, hit.output
        assert "cache hit" in cli(*embed).output


def test_a_full_disk_under_a_vector_shard_is_one_line_and_keeps_what_was_stored(tmp_path):
    """The records of a put do not fit: the error names the shard file, what an earlier put stored
    stays readable, and the index never points at the bytes that were not written."""
    disk = tmp_path / "disk"
    with tmpfs(disk):
        store = ItemStore(disk / "c")
        ns = store.namespace("text", "model-x", {}, dim=1024)
        kept = _vectors(8, 1024, 0)
        ns.put_many([f"w{i}" for i in range(8)], kept)
        big = _vectors(400, 1024, 1)  # 1.6 MB on a 1 MiB disk
        with pytest.raises(
            NegalignError, match=r"disk full while writing .*/vectors/\w+/00000001\.rec: free"
        ):
            ns.put_many([f"x{i}" for i in range(400)], big)
        vectors, found = ns.get_many([f"w{i}" for i in range(8)] + ["x0", "x399"])
        assert found.tolist() == [True] * 8 + [False, False] and ns.corrupt == 0
        np.testing.assert_array_equal(vectors[:8], kept)
        store.close()


def test_a_short_numpy_write_on_a_full_disk_is_disk_full_not_unexpected(tmp_path):
    """numpy reports a short write as ``OSError("N requested and M written")``, no errno. Before:
    "unexpected OSError" (exit 1). After: disk full, naming the artifact's folder; nothing kept."""
    disk = tmp_path / "disk"
    with tmpfs(disk):
        store = ArtifactStore(disk / "c")
        _ = store.index  # the index exists; the artifact is what does not fit

        def compute(out: Path) -> None:
            np.save(out / "big.npy", np.zeros(1 << 19, np.float32))  # 2 MiB on a 1 MiB disk

        spec = StageSpec("toy", 1, {"n": 1})
        with pytest.raises(NegalignError, match=r"disk full while writing .*/c/tmp/.*: free space on"):
            store.run(spec, compute)
        assert list(store.tmp_dir.iterdir()) == [] and store.records() == []
        store.close()


def test_a_full_out_disk_names_the_file_being_written_not_its_source(tmp_path, folder):
    """--out on a full tmpfs: shutil's ENOSPC names the source (in the cache) first. Before: "disk
    full while writing <cache>/artifacts/..."; after: the file under --out and that disk."""
    out_disk = tmp_path / "out"
    with tmpfs(out_disk, "64k"):
        fill(out_disk, 4096)
        cache = tmp_path / "c"
        result = cli(
            "embed", "images", "--images", str(folder), "--workers", "0", "--cache-dir", str(cache),
            "--out", str(out_disk / "run"),
        )  # fmt: skip
        line = one_line_error(result, "disk full while writing ")
        assert f"{out_disk}/run/" in line and f"free space on {out_disk}" in line, line
        assert str(cache) not in line
        assert sorted(p.name for p in (out_disk / "run").iterdir()) == []  # nothing half-written


def test_a_full_disk_under_stat_db_is_disk_full_and_keeps_it(tmp_path):
    """Before: the stat cache took "database or disk is full" for damage and set stat.db aside (and
    then silently remembered nothing). After: one error naming stat.db; the database stays."""
    disk = tmp_path / "disk"
    with tmpfs(disk):
        files = []
        for i in range(3):
            path = tmp_path / f"f{i}.bin"
            path.write_bytes(f"content {i}".encode())
            os.utime(path, ns=(OLD_NS, OLD_NS))
            files.append(str(path))
        stat_db = disk / "stat.db"
        StatCache(stat_db).digests(files[:1], lambda todo: digest_all(files[:1], 1))
        fill(disk)
        with pytest.raises(NegalignError, match=rf"disk full while writing {stat_db}: free space on {disk}"):
            StatCache(stat_db).digests(files, lambda todo: digest_all([files[i] for i in todo], 1))
        assert sorted(p.name for p in disk.iterdir() if "filler" not in p.name)[0] == "stat.db"
        assert not list(disk.glob("*damaged*"))


def test_what_counts_as_a_full_disk(tmp_path):
    """ENOSPC/EDQUOT, SQLITE_FULL and numpy's short write always; SQLite's I/O error only where the
    disk it writes has (next to) no room left; nothing else."""
    import errno
    import sqlite3

    from negalign_cli.cache.diskfull import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(OSError("524288 requested and 246752 written"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    assert not is_disk_full(sqlite3.DatabaseError("file is not a database"))
    io_error = sqlite3.OperationalError("disk I/O error")
    disk = tmp_path / "disk"
    with tmpfs(disk, "16m"):
        assert not is_disk_full(io_error, disk / "c" / "index.db")  # 16 MiB free: some other fault
        fill(disk)
        assert is_disk_full(io_error, disk / "c" / "index.db")
