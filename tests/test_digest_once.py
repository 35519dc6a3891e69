"""Every file digest goes through the stat cache, and each file is hashed once per run.

These tests count real reads: every sha256 of a file is taken by ``hashing.sha256_file_sized``,
which opens the file with ``hashing.open_regular``; the counter wraps that open and records the
path. A no-op rerun (nothing changed since the last run verified it) must open no file at all to
hash it: not the store's artifact, not the ``--out`` folders it reads, not the images. A file that
changed is hashed again and compared with its manifest, so an edit is caught as before.

The stat cache does not remember a file modified less than 2 s before it was hashed (racy writes,
``statcache.RACY_SECONDS``); these tests run commands back to back, so most set that guard to 0
(``test_statcache.py`` tests the guard), and one waits out the real 2 s.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from negalign_cli import hashing
from negalign_cli.cache import statcache
from negalign_cli.cache.workspace import STAT_CACHE
from negalign_cli.stages import files
from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_image_folder


class Reads:
    """Paths opened to be hashed, while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        original = hashing.open_regular

        def counted(path):
            self.paths.append(os.path.realpath(path))
            return original(path)

        monkeypatch.setattr(hashing, "open_regular", counted)

    def clear(self) -> None:
        self.paths.clear()

    def under(self, folder: Path) -> list[str]:
        root = os.path.realpath(folder) + os.sep
        return [p for p in self.paths if p.startswith(root)]


@pytest.fixture()
def reads(monkeypatch):
    return Reads(monkeypatch)


@pytest.fixture()
def no_racy_guard(monkeypatch):
    monkeypatch.setattr(statcache, "RACY_SECONDS", 0.0)


def _commands(root: Path) -> dict[str, list[str]]:
    cache = ["--cache-dir", str(root / "c")]
    common = ["--classes", "waterbird", "--workers", "0"]
    scores = ["--classes", "waterbird", "--nouns", str(root / "nouns.txt"), "--groups", "2"]
    return {
        "embed": ["embed", "images", "--images", str(root / "imgs_id"), "--workers", "0",
                  "--out", str(root / "emb_id"), *cache],
        "cam_id": ["cam", "--images", str(root / "imgs_id"), *common, "--out", str(root / "cam_id"), *cache],
        "cam_ood": ["cam", "--images", str(root / "imgs_ood"), *common, "--out", str(root / "cam_ood"), *cache],
        "score_id": ["score", "--images-dir", str(root / "cam_id"), *scores, "--out", str(root / "s_id"), *cache],
        "score_ood": ["score", "--images-dir", str(root / "cam_ood"), *scores, "--out", str(root / "s_ood"),
                      *cache],
        "evaluate": ["evaluate", "--id", str(root / "s_id" / files.SCORES),
                     "--ood", f"ood={root / 's_ood' / files.SCORES}", "--out", str(root / "results"), *cache],
        "report": ["report", str(root / "results"), "--out", str(root / "report"), *cache],
    }  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """embed images, cam (ID and OOD), score (ID and OOD), evaluate, each with --out: made once;
    a test that edits a file puts it back (by rerunning the command that wrote it)."""
    root = tmp_path_factory.mktemp("chain")
    (root / "nouns.txt").write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\n")
    make_image_folder(root / "imgs_id", per_class=2)
    make_image_folder(root / "imgs_ood", per_class=3)
    commands = _commands(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEGALIGN_CACHE", str(root / "env-cache"))
        for name in ("embed", "cam_id", "cam_ood", "score_id", "score_ood", "evaluate"):
            done = cli(*commands[name])
            assert done.exit_code == 0, f"{name}: {done.output}"
    return root, commands


@pytest.fixture()
def chain(built, no_racy_guard):
    return built


def _run(command: list[str]):
    done = cli(*command)
    assert done.exit_code == 0, done.output
    return done


@pytest.mark.parametrize("name", ["embed", "cam_id", "score_id", "evaluate"])
def test_a_noop_rerun_hashes_no_file(chain, reads, name):
    """The second of two back-to-back runs: its inputs, its images and its artifact are unchanged
    since the first verified them, so nothing is read to be hashed (before: every output of the
    artifact on each hit, and for `score` its four input files twice)."""
    root, commands = chain
    _run(commands[name])  # what the chain's later steps re-exported is verified (and remembered) here
    reads.clear()
    done = _run(commands[name])
    assert "cache hit" in " ".join(done.output.split())
    assert reads.paths == [], f"{name} hashed {reads.paths}"


def test_merge_and_shards_hash_nothing_on_a_noop_rerun(tmp_path, reads, no_racy_guard, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_image_folder(tmp_path / "imgs", per_class=2)
    base = ["embed", "images", "--images", str(folder), "--workers", "0", "--cache-dir", "c"]
    for i in (0, 1):
        _run([*base, "--shard", f"{i}/2", "--shards-dir", "runs"])
    merge = ["merge", "runs", "--cache-dir", "c", "--out", "merged"]
    _run(merge)
    _run(merge)
    reads.clear()
    done = _run(merge)
    assert "cache hit" in " ".join(done.output.split()), done.output
    assert reads.paths == [], reads.paths
    reads.clear()
    done = _run([*base, "--shard", "1/2", "--shards-dir", "runs"])  # done already: its folder verified
    assert "skipped" in done.output, done.output
    assert reads.paths == [], reads.paths


def test_report_checks_score_files_without_reading_them_again(chain, reads):
    root, commands = chain
    _run(commands["report"])  # draws the figures into the cache (`figure` artifacts)
    reads.clear()
    _run(commands["report"])  # a figure artifact's first hit verifies it, as any artifact's
    figures = reads.under(root / "c" / "artifacts" / "figure")
    assert reads.paths == figures, reads.paths  # the score files are not read again
    reads.clear()
    _run(commands["report"])
    assert reads.paths == [], reads.paths


def test_score_hashes_each_input_file_once(chain, reads):
    """One digest per input file feeds both the check against its manifest and the stage key
    (before: `open_image_set` verified the files, then `ImageSet.digests()` hashed them again)."""
    root, commands = chain
    for suffix in ("", "-wal", "-shm"):  # nothing remembered: every file must be read
        (root / "c" / f"{STAT_CACHE}{suffix}").unlink(missing_ok=True)
    reads.clear()
    _run(commands["score_id"])
    inputs = [files.IMAGE_EMBEDDINGS, files.IMAGE_TABLE, files.BACKGROUND_EMBEDDINGS, files.CAM_TABLE]
    counts = Counter(reads.under(root / "cam_id"))
    assert counts == {os.path.realpath(root / "cam_id" / name): 1 for name in inputs}


def test_the_first_hit_after_the_racy_window_is_remembered(tmp_path, reads):
    """The real 2 s guard: an artifact written just now is hashed on each hit until it is older
    than 2 s; the hit after that remembers it, and the next one reads nothing."""
    make_image_folder(tmp_path / "imgs", per_class=2)
    command = ["embed", "images", "--images", str(tmp_path / "imgs"), "--workers", "0",
               "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    _run(command)
    reads.clear()
    _run(command)
    artifacts = tmp_path / "c" / "artifacts"
    assert reads.under(artifacts), "a fresh artifact is re-hashed (the racy guard)"
    time.sleep(statcache.RACY_SECONDS + 0.2)
    reads.clear()
    _run(command)
    assert len(reads.under(artifacts)) == 2  # image_embeddings.npy and images.parquet, once each
    reads.clear()
    _run(command)
    assert reads.paths == [], reads.paths


def _same_size_edit(path: Path, keep_mtime: bool = False) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert path.stat().st_size == before.st_size
    if keep_mtime:  # set back: the ctime still moves
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_edited_artifact_is_still_caught(chain, reads, keep_mtime):
    root, commands = chain
    _run(commands["embed"])
    _run(commands["embed"])  # remembered: the next rerun would read nothing
    artifact = next((root / "c" / "artifacts" / "embed-images").iterdir())
    _same_size_edit(artifact / files.IMAGE_EMBEDDINGS, keep_mtime)
    reads.clear()
    done = _run(commands["embed"])
    assert "is corrupt (image_embeddings.npy does not match its digest); recomputing it" in " ".join(
        done.output.split()
    )
    assert os.path.realpath(artifact / files.IMAGE_EMBEDDINGS) in reads.paths


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_edited_out_folder_is_still_refused(chain, reads, keep_mtime):
    root, commands = chain
    _run(commands["score_id"])
    _run(commands["score_id"])  # cam_id's files remembered
    _same_size_edit(root / "cam_id" / files.BACKGROUND_EMBEDDINGS, keep_mtime)
    reads.clear()
    try:
        one_line_error(cli(*commands["score_id"]), "background_embeddings.npy does not match its digest")
        assert os.path.realpath(root / "cam_id" / files.BACKGROUND_EMBEDDINGS) in reads.paths
    finally:
        _run(commands["cam_id"])  # exported again


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_edited_score_file_is_hashed_again_by_evaluate(chain, reads, keep_mtime):
    """evaluate keys on its score files' digests: a same-size edit is hashed again (a new key, or
    here a file that no longer reads), never the cached result of the old bytes."""
    root, commands = chain
    _run(commands["evaluate"])
    _run(commands["evaluate"])
    path = root / "s_ood" / files.SCORES
    _same_size_edit(path, keep_mtime)
    reads.clear()
    try:
        done = cli(*commands["evaluate"])
        assert os.path.realpath(path) in reads.paths
        assert "cache hit" not in " ".join(done.output.split()), done.output
    finally:
        _run(commands["score_ood"])  # exported again


# ----------------------------------------------------------------------------- sha256_files itself
def _old_file(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    os.utime(path, ns=(1_600_000_000 * 10**9,) * 2)  # long past: never "racy"
    return str(path)


def test_sha256_files_reads_a_file_once_then_only_when_it_changes(tmp_path, reads):
    cache = statcache.StatCache(tmp_path / "stat.db")
    paths = [_old_file(tmp_path / f"f{i}", f"content {i}".encode()) for i in range(3)]
    expected = [hashing.sha256_file(p) for p in paths]
    reads.clear()
    assert statcache.sha256_files(paths, cache) == expected
    assert len(reads.paths) == 3
    reads.clear()
    assert statcache.sha256_files(paths, cache) == expected and reads.paths == []
    Path(paths[1]).write_bytes(b"content X")  # same size, new bytes
    assert statcache.sha256_files(paths, cache)[1] == hashing.sha256_file(paths[1]) != expected[1]
    assert reads.paths == [os.path.realpath(paths[1])] * 2  # the rehash, and the check above


def test_sha256_files_raises_what_sha256_file_raises(tmp_path):
    from negalign_cli.hashing import NotRegularFile

    cache = statcache.StatCache(tmp_path / "stat.db")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # a real FIFO: refused, never opened (that would block)
    with pytest.raises(NotRegularFile):
        statcache.sha256_files([fifo], cache)
    with pytest.raises(FileNotFoundError):
        statcache.sha256_files([tmp_path / "gone"], cache)


def test_an_empty_file_is_not_remembered_for_the_images_that_share_the_keys(tmp_path):
    """An empty output has the empty digest; the same path listed as an image is still "empty
    file" (the stat cache's image rows and file rows share one key space)."""
    from negalign_cli.inputs.listing import digest_all

    cache = statcache.StatCache(tmp_path / "stat.db")
    empty = _old_file(tmp_path / "empty", b"")
    assert statcache.sha256_files([empty], cache) == [hashing.sha256_file(empty)]
    assert cache.digests([empty], lambda todo: digest_all([empty], 1)) == [(None, "empty file")]


def test_a_full_disk_under_stat_db_does_not_stop_a_check(tmp_path):
    """Verifying reads: a stat.db with no room to remember is passed over (the files are hashed),
    where an image listing says disk full (tests/faults/test_storage_faults.py)."""
    from tests.faults.test_storage_faults import fill, tmpfs

    disk = tmp_path / "disk"
    with tmpfs(disk):
        paths = [_old_file(tmp_path / f"f{i}", f"content {i}".encode() * 100) for i in range(3)]
        fill(disk)
        cache = statcache.StatCache(disk / "stat.db")
        assert statcache.sha256_files(paths, cache) == [hashing.sha256_file(p) for p in paths]
        assert not list(disk.glob("*damaged*"))
