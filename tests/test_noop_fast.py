"""A no-op rerun on many files does one stat per file and little else (issue 21).

Two shortcuts, each pinned here against the change it must see:

* a folder's listing is remembered in ``<cache>/stat.db`` with the stat of every folder its walk
  read, and reused while none of them changed (``inputs/listing.py``): a file added, removed or
  renamed, a subfolder made or removed, the folder re-created on a fresh tmpfs or mounted over,
  a symlink retargeted: each must give the listing a fresh walk gives;
* the stat cache answers a long list from one packed, checksummed ``batch`` row
  (``cache/statcache.py``) instead of a row per file: a file rewritten with the same size and
  mtime (on a real tmpfs), replaced, or just written must still be hashed again, a damaged row
  must never be trusted.

The walk and the hashing are spied on (``listing._walk``, ``hash_many``); every listing is compared
with a fresh one, every digest with the file's sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from negalign_cli.cache import statcache
from negalign_cli.cache.statcache import StatCache
from negalign_cli.inputs import listing
from negalign_cli.inputs.listing import digest_all, list_images
from tests.faults.helpers import cli
from tests.faults.test_storage_faults import tmpfs
from tests.helpers import TINY

OLD_NS = 1_600_000_000 * 10**9
TICK = 0.05  # past the file system's timestamp tick


@pytest.fixture()
def walks(monkeypatch):
    """How many times a folder was walked (``listing._walk`` at its top), while installed."""
    calls: list[str] = []
    original = listing._walk

    def counted(root, prefix, found, *more):
        if not prefix:
            calls.append(root)
        return original(root, prefix, found, *more)

    monkeypatch.setattr(listing, "_walk", counted)
    monkeypatch.setattr(listing, "RACY_SECONDS", 0.0)  # the racy guard has its own test
    return calls


def _tree(root: Path, per_class: int = 3) -> Path:
    for label in ("birds", "boats"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / label / f"{i}.png").write_bytes(f"{label} {i}".encode())
    time.sleep(TICK)
    return root


def _same_as_a_fresh_walk(root: Path, memory: StatCache):
    got = list_images(root, memory=memory)
    fresh = list_images(root)
    assert (got.paths, got.labels, got.problems) == (fresh.paths, fresh.labels, fresh.problems)
    return got


def _change_then_check(root: Path, memory: StatCache, walks: list[str], change) -> None:
    _same_as_a_fresh_walk(root, memory)
    before = len(walks)
    _same_as_a_fresh_walk(root, memory)
    assert len(walks) == before + 1, "an unchanged folder was walked again"  # +1: the fresh walk
    change()
    time.sleep(TICK)
    before = len(walks)
    _same_as_a_fresh_walk(root, memory)
    assert len(walks) == before + 2, "a changed folder was not walked again"


def test_an_unchanged_folder_is_not_walked_again(tmp_path, walks):
    root = _tree(tmp_path / "data")
    memory = StatCache(tmp_path / "stat.db")
    first = list_images(root, memory=memory)
    assert len(walks) == 1
    again = list_images(root, memory=memory)
    assert len(walks) == 1 and again.paths == first.paths and again.labels == first.labels
    assert again.labels == ["birds"] * 3 + ["boats"] * 3


@pytest.mark.parametrize(
    "change",
    [
        "add a file",
        "remove a file",
        "rename a file",
        "move a file to another folder",
        "add a subfolder with a file",
        "remove a subfolder",
        "replace a file with a FIFO",
        "mtime of the folder set back after adding a file",
    ],
)
def test_each_change_to_the_folder_is_seen(tmp_path, walks, change):
    root = _tree(tmp_path / "data")
    memory = StatCache(tmp_path / "stat.db")
    birds = root / "birds"

    def act():
        if change == "add a file":
            (birds / "new.png").write_bytes(b"new")
        elif change == "remove a file":
            (birds / "1.png").unlink()
        elif change == "rename a file":
            (birds / "1.png").rename(birds / "9.png")
        elif change == "move a file to another folder":
            (birds / "1.png").rename(root / "boats" / "1b.png")
        elif change == "add a subfolder with a file":
            (root / "cars").mkdir()
            (root / "cars" / "0.png").write_bytes(b"car")
        elif change == "remove a subfolder":
            shutil.rmtree(root / "boats")
        elif change == "replace a file with a FIFO":
            (birds / "2.png").unlink()
            os.mkfifo(birds / "2.png")
        else:
            st = os.stat(birds)
            (birds / "new.png").write_bytes(b"new")
            os.utime(birds, ns=(st.st_atime_ns, st.st_mtime_ns))  # the ctime still moves

    _change_then_check(root, memory, walks, act)


def test_a_folder_re_created_on_a_fresh_tmpfs_is_walked_again(tmp_path, walks):
    """A fresh tmpfs at the same path hands out the same inodes and device; folders whose mtimes
    are set to the old ones then match all but their ctime, which tells them apart."""
    data = tmp_path / "data"
    memory = StatCache(tmp_path / "stat.db")

    def fill(names: list[str]) -> None:
        (data / "birds").mkdir()
        for name in names:
            (data / "birds" / name).write_bytes(b"x")
        for folder in (data / "birds", data):
            os.utime(folder, ns=(OLD_NS, OLD_NS))
        time.sleep(TICK)

    with tmpfs(data, "1m"):
        fill(["a.png", "b.png"])
        first = _same_as_a_fresh_walk(data, memory)
        stats = [(s.st_mtime_ns, s.st_ino, s.st_dev) for s in map(os.stat, (data, data / "birds"))]
    with tmpfs(data, "1m", device=stats[0][2]):
        fill(["c.png", "d.png"])
        again = [(s.st_mtime_ns, s.st_ino, s.st_dev) for s in map(os.stat, (data, data / "birds"))]
        assert again == stats  # the scenario: all but the ctime as before
        second = _same_as_a_fresh_walk(data, memory)
    assert [Path(p).name for p in first.paths] == ["a.png", "b.png"]
    assert [Path(p).name for p in second.paths] == ["c.png", "d.png"]


def test_a_tmpfs_mounted_over_a_subfolder_is_walked(tmp_path, walks):
    root = _tree(tmp_path / "data")
    memory = StatCache(tmp_path / "stat.db")
    _same_as_a_fresh_walk(root, memory)
    with tmpfs(root / "boats", "1m"):
        (root / "boats" / "mounted.png").write_bytes(b"on the mount")
        got = _same_as_a_fresh_walk(root, memory)
        assert [Path(p).name for p in got.paths if "/boats/" in p] == ["mounted.png"]
    got = _same_as_a_fresh_walk(root, memory)
    assert [Path(p).name for p in got.paths if "/boats/" in p] == ["0.png", "1.png", "2.png"]


def test_a_folder_with_image_symlinks_is_walked_every_time(tmp_path, walks):
    """A symlink's target can become a folder (or a file again) while no folder of the walk
    changes: such a listing is never remembered."""
    root = _tree(tmp_path / "data")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"linked")
    (root / "birds" / "link.png").symlink_to(target)
    time.sleep(TICK)
    memory = StatCache(tmp_path / "stat.db")
    assert any(p.endswith("link.png") for p in _same_as_a_fresh_walk(root, memory).paths)
    target.unlink()
    target.mkdir()  # now a folder: not an image any more
    assert not any(p.endswith("link.png") for p in _same_as_a_fresh_walk(root, memory).paths)


def test_a_folder_modified_just_now_is_not_remembered(tmp_path, walks, monkeypatch):
    """Racily clean folders: a change in the same timestamp tick after the walk would not move
    the folder's mtime, so a walk of a folder modified less than 2 s before is not remembered."""
    monkeypatch.setattr(listing, "RACY_SECONDS", 2.0)
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(b"a")
    memory = StatCache(tmp_path / "stat.db")
    list_images(root, memory=memory)
    list_images(root, memory=memory)
    assert len(walks) == 2


def test_a_damaged_remembered_listing_is_not_used(tmp_path, walks):
    root = _tree(tmp_path / "data")
    memory = StatCache(tmp_path / "stat.db")
    list_images(root, memory=memory)
    db = sqlite3.connect(tmp_path / "stat.db")
    (data,) = db.execute("SELECT data FROM batch").fetchone()
    db.execute("UPDATE batch SET data = ?", (data.replace(b"birds", b"bords"),))
    db.commit()
    db.close()
    got = _same_as_a_fresh_walk(root, memory)
    assert got.labels[0] == "birds"


# ----------------------------------------------------------------------------- batched stat cache
class Spy:
    """``hash_many`` that records the indices it was asked to read."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.read: list[str] = []

    def __call__(self, todo):
        self.read.extend(self.paths[i] for i in todo)
        return digest_all([self.paths[i] for i in todo], 2)


def _files(folder: Path, count: int = 80) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"f{i:03d}.bin"
        path.write_bytes(f"content {i:03d}".encode())
        os.utime(path, ns=(OLD_NS, OLD_NS))
        paths.append(str(path))
    return paths


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digests(db: Path, paths: list[str]) -> tuple[list[str | None], list[str]]:
    spy = Spy(paths)
    found = StatCache(db).digests(paths, spy)
    return [d for d, _ in found], spy.read


def _forget_rows(db: Path) -> None:
    """Delete every per-file row: what is still known then comes from the batch row."""
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM stat")


def test_a_long_list_is_answered_from_one_batch_row(tmp_path):
    paths = _files(tmp_path / "data")
    assert len(paths) >= statcache.BATCH_MIN
    db = tmp_path / "stat.db"
    first, read = _digests(db, paths)
    assert first == [_sha(p) for p in paths] and len(read) == len(paths)
    _forget_rows(db)
    again, read = _digests(db, paths)
    assert again == first and read == []  # no per-file row left: all from the batch
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM batch").fetchone() == (1,)


@pytest.mark.parametrize("change", ["rewritten, size and mtime kept", "replaced by a rename", "size"])
def test_a_changed_file_in_a_batch_is_hashed_again(tmp_path, change):
    """On a real tmpfs (ns timestamps, inodes reused): the per-file rule holds for batch rows."""
    data = tmp_path / "data"
    with tmpfs(data, "4m"):
        paths = _files(data)
        db = tmp_path / "stat.db"
        _digests(db, paths)
        _forget_rows(db)
        time.sleep(TICK)
        target = paths[7]
        if change == "rewritten, size and mtime kept":
            with open(target, "r+b") as handle:
                handle.write(b"C")
            os.utime(target, ns=(OLD_NS, OLD_NS))
        elif change == "replaced by a rename":
            Path(target + ".new").write_bytes(b"CONTENT 007")
            os.utime(target + ".new", ns=(OLD_NS, OLD_NS))
            os.replace(target + ".new", target)
        else:
            Path(target).write_bytes(b"longer content 007")
            os.utime(target, ns=(OLD_NS, OLD_NS))
        got, read = _digests(db, paths)
        assert read == [target]
        assert got == [_sha(p) for p in paths]
        _forget_rows(db)
        assert _digests(db, paths) == (got, [])  # the batch row was written again


def test_a_file_written_just_now_is_not_served_from_a_batch(tmp_path):
    paths = _files(tmp_path / "data")
    Path(paths[3]).write_bytes(b"fresh content")  # mtime now: racy
    db = tmp_path / "stat.db"
    _digests(db, paths)
    got, read = _digests(db, paths)
    assert read == [paths[3]] and got[3] == _sha(paths[3])


def test_a_damaged_batch_row_is_never_trusted(tmp_path):
    paths = _files(tmp_path / "data")
    db = tmp_path / "stat.db"
    first, _ = _digests(db, paths)
    _forget_rows(db)
    with sqlite3.connect(db) as connection:
        (data,) = connection.execute("SELECT data FROM batch").fetchone()
        damaged = bytearray(data)
        damaged[-5] ^= 0xFF  # a digest byte
        connection.execute("UPDATE batch SET data = ?", (bytes(damaged),))
    got, read = _digests(db, paths)
    assert got == first and len(read) == len(paths)  # nothing trusted: everything hashed


def test_another_list_takes_another_batch_row_and_old_rows_are_evicted(tmp_path, monkeypatch):
    paths = _files(tmp_path / "data", 100)
    db = tmp_path / "stat.db"
    monkeypatch.setattr(statcache, "BATCH_ROWS", 3)
    for stop in (70, 80, 90, 100):  # four lists: the first row is evicted
        _digests(db, paths[:stop])
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM batch").fetchone() == (3,)
    _forget_rows(db)
    assert _digests(db, paths[:100])[1] == []
    assert len(_digests(db, paths[:70])[1]) == 70  # evicted, and no per-file row left


def test_a_stat_db_made_before_batches_gains_the_table(tmp_path):
    """A schema-2 stat.db without the batch table: its per-file rows still serve."""
    paths = _files(tmp_path / "data")
    db = tmp_path / "stat.db"
    _digests(db, paths)
    with sqlite3.connect(db) as connection:
        connection.execute("DROP TABLE batch")
    assert _digests(db, paths)[1] == []
    _forget_rows(db)
    assert _digests(db, paths)[1] == []  # the batch table was made again and filled


# ----------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`embed images` and `cam` run once on a small folder (the tiny model)."""
    from tests.helpers.chain import model_chain

    root = tmp_path_factory.mktemp("noop")
    runs = model_chain(root, *TINY)
    for name in ("embed images", "cam"):
        done = cli(*runs[name])
        assert done.exit_code == 0, f"{name}:\n{done.output}"
    return root, runs


def test_a_noop_embed_walks_nothing_and_looks_up_one_batch_row(embedded, walks, monkeypatch):
    """The rerun of `embed images` on an unchanged folder: no walk, no file hashed, and no per-file
    stat-cache row needed (before: a walk and a row per image on every rerun). An added image is
    listed, and it alone is hashed and encoded."""
    from negalign_cli import hashing
    from tests.helpers.images import rgb

    root, runs = embedded
    monkeypatch.setattr(statcache, "BATCH_MIN", 1)  # the folder's few images make a batch too
    monkeypatch.setattr(statcache, "RACY_SECONDS", 0.0)
    opened: list[str] = []
    original = hashing.open_regular
    monkeypatch.setattr(hashing, "open_regular", lambda path: opened.append(str(path)) or original(path))
    assert cli(*runs["embed images"]).exit_code == 0  # remembers the listing and the batch
    time.sleep(TICK)
    added = root / "imgs" / "birds" / "added.png"
    rgb(77).save(added)
    walked, opened[:] = len(walks), []
    done = cli(*runs["embed images"])
    assert done.exit_code == 0 and "encoded 1," in " ".join(done.output.split()), done.output
    assert len(walks) == walked + 1 and [Path(p).name for p in opened if "imgs" in p] == ["added.png"]
    added.unlink()
    time.sleep(TICK)
    assert cli(*runs["embed images"]).exit_code == 0  # the folder as it was: walked, remembered
    _forget_rows(root / "c" / statcache.STAT_CACHE)
    walked, opened[:] = len(walks), []
    done = cli(*runs["embed images"])
    assert done.exit_code == 0 and "cache hit" in " ".join(done.output.split()), done.output
    assert len(walks) == walked and opened == []


_HIT = """
import json, sys
from typer.testing import CliRunner
from negalign_cli.cli.app import app
seen = {}
for name, argv in json.loads(sys.argv[1]):
    done = CliRunner().invoke(app, argv)
    assert done.exit_code == 0 and "cache hit" in " ".join(done.output.split()), done.output
    seen[name] = [m for m in ("torch", "pandas", "pyarrow", "matplotlib") if m in sys.modules]
print(json.dumps(seen))
"""


def test_embed_and_cam_hits_import_no_pandas(embedded):
    """Imports are the rest of a hit's cost: `embed images` and `cam` hits import neither torch nor
    pandas/pyarrow (before: pandas and pyarrow, ~0.5 s, imported by the stage modules)."""
    import json
    import subprocess
    import sys

    root, runs = embedded
    argv = [(name, [*runs[name], "--device", "cpu"]) for name in ("embed images", "cam")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _HIT, json.dumps(argv)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"embed images": [], "cam": []}


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize(
    ("shape", "dtype"), [((6,), "float32"), ((4, 3), "float16"), ((), "bool"), ((5,), "int64")]
)
def test_merged_rows_are_np_save_bytes_written_run_by_run(tmp_path, shape, dtype):
    """`merge` writes each row file run by run from the shards' memory maps (no gathered copy of
    the whole array) and hashes it as it writes: the bytes must be np.save's of the gathered rows."""
    import numpy as np

    from negalign_cli.stages.shards import _save_rows

    rng = np.random.default_rng(0)
    parts = []
    for index, rows in enumerate((40, 0, 25)):
        path = tmp_path / f"part{index}.npy"
        np.save(path, (rng.standard_normal((rows, *shape)) * 10).astype(dtype))
        parts.append(np.load(path, mmap_mode="r"))
    # runs of consecutive rows, a jump inside a shard, shards interleaved, a row used twice
    from_shard = np.array([0] * 10 + [2] * 5 + [0] * 3 + [2] * 20 + [0], dtype=np.int64)
    from_row = np.array([*range(10), *range(5), 12, 11, 30, *range(5, 25), 3], dtype=np.int64)
    for count in (len(from_shard), 1, 0):
        out = tmp_path / f"merged{count}.npy"
        digest = _save_rows(out, parts, from_shard[:count], from_row[:count])
        expected = tmp_path / f"expected{count}.npy"
        gathered = [parts[s][r] for s, r in zip(from_shard[:count], from_row[:count], strict=True)]
        np.save(expected, np.array(gathered, dtype=dtype).reshape(count, *shape))
        assert out.read_bytes() == expected.read_bytes()
        assert digest == hashlib.sha256(expected.read_bytes()).hexdigest()


def test_merge_reads_no_merged_row_file_back(embedded, tmp_path, monkeypatch):
    """The merged image_embeddings.npy is hashed while it is written: the store does not open it
    again to digest it (before: the whole array gathered in memory, saved, then read back)."""
    from negalign_cli import hashing

    root, runs = embedded
    argv = list(runs["embed images"])
    at = argv.index("--cache-dir")
    base = argv[:at] + argv[at + 2 :]  # without --cache-dir: each shard keeps its own cache
    monkeypatch.delenv("NEGALIGN_CACHE", raising=False)
    for i in (0, 1):
        done = cli(*base, "--shard", f"{i}/2", "--shards-dir", str(tmp_path / "runs"))
        assert done.exit_code == 0, done.output
    opened: list[str] = []
    original = hashing.open_regular
    monkeypatch.setattr(hashing, "open_regular", lambda path: opened.append(str(path)) or original(path))
    merged = cli(
        "merge", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "m")
    )
    assert merged.exit_code == 0, merged.output
    names = [Path(p).name for p in opened if str(tmp_path / "c") in p]
    assert "images.parquet" in names and "image_embeddings.npy" not in names, names
    # the bytes equal an unsharded run's: tests/test_shards.py (the same batches on both sides)
    assert merged.exit_code == 0 and (tmp_path / "m" / "image_embeddings.npy").is_file()


def test_no_room_for_a_batch_row_is_no_error(tmp_path):
    """A batch row only ever saves work: on a disk with no room for it, a request that needs no
    per-file row written still answers (before batches, such a no-op wrote nothing at all)."""
    from tests.faults.test_storage_faults import fill

    paths = _files(tmp_path / "data", 2000)  # a 144 kB batch row
    disk = tmp_path / "disk"
    with tmpfs(disk, "2m"):
        db = disk / "stat.db"
        first, _ = _digests(db, paths)
        with sqlite3.connect(db) as connection:
            connection.execute("DELETE FROM batch")
        fill(disk, leave=48 << 10)
        got, read = _digests(db, paths)  # the per-file rows serve; the new batch row has no room
        assert got == first and read == []
        with sqlite3.connect(db) as connection:
            assert connection.execute("SELECT count(*) FROM batch").fetchone() == (0,)


def _merged_key(output: str) -> str:
    import re

    found = re.search(r"embed-images ([0-9a-f]{12}): merged", " ".join(output.split()))
    assert found, output
    return found.group(1)


def test_a_second_merge_of_the_same_shards_reads_no_table(embedded, tmp_path, monkeypatch):
    """A merge remembers its inputs (the plan, the sha256 of the image list and of each verified
    shard manifest) with the merged key: merging the same shards again is a hit that reads no
    table (before: every table read, every row checked, the key rebuilt, on every merge). A shard
    run again on changed content is another input: merged afresh."""
    import pandas as pd

    from tests.helpers.images import rgb

    root, runs = embedded
    argv = list(runs["embed images"])
    at = argv.index("--cache-dir")
    base = [*argv[:at], *argv[at + 2 :], "--batch-size", "1"]
    monkeypatch.delenv("NEGALIGN_CACHE", raising=False)
    runs_dir, cache = tmp_path / "runs", tmp_path / "c"
    for i in (0, 1):
        assert cli(*base, "--shard", f"{i}/2", "--shards-dir", str(runs_dir)).exit_code == 0
    first = cli("merge", str(runs_dir), "--cache-dir", str(cache))
    assert first.exit_code == 0 and "(cache hit)" not in first.output, first.output
    read: list[str] = []
    original = pd.read_parquet
    monkeypatch.setattr(
        pd, "read_parquet", lambda path, *a, **k: read.append(str(path)) or original(path, *a, **k)
    )
    from negalign_cli.stages import shards  # the merge reads the shards' images.parquet with pyarrow

    read_table = shards.read_table
    monkeypatch.setattr(shards, "read_table", lambda path: read.append(str(path)) or read_table(path))
    again = cli("merge", str(runs_dir), "--cache-dir", str(cache))
    assert again.exit_code == 0 and "(cache hit)" in again.output, again.output
    assert read == [] and _merged_key(again.output) == _merged_key(first.output)
    # shard 1 again, on other bytes for one of its images: its manifest differs, the merge too
    images = sorted((root / "imgs").rglob("*.png"))
    saved = images[-1].read_bytes()
    try:
        rgb(201).save(images[-1])
        shutil.rmtree(runs_dir / "shard-00001-of-00002")
        assert cli(*base, "--shard", "1/2", "--shards-dir", str(runs_dir)).exit_code == 0
        changed = cli("merge", str(runs_dir), "--cache-dir", str(cache))
        assert changed.exit_code == 0 and "(cache hit)" not in changed.output, changed.output
        assert read and _merged_key(changed.output) != _merged_key(first.output)
    finally:
        images[-1].write_bytes(saved)
