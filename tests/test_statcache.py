"""The stat cache: an unchanged file is not read again; any change to its stat re-hashes it."""

from __future__ import annotations

import hashlib
import os
import sqlite3

import pytest

from negalign_cli.cache.statcache import StatCache
from negalign_cli.inputs.listing import digest_all

OLD_NS = 1_600_000_000 * 10**9  # a modification time long past: never "racy"


class Spy:
    """``hash_many`` that records which files were read."""

    def __init__(self):
        self.read: list[str] = []
        self.paths: list[str] = []

    def __call__(self, todo):
        paths = [self.paths[i] for i in todo]
        self.read.extend(paths)
        return digest_all(paths, 2)

    def bind(self, paths):
        self.paths = list(paths)
        return self


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path, data: bytes, mtime_ns: int = OLD_NS):
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    return [write(tmp_path / f"f{i}.bin", f"content {i}".encode()) for i in range(5)]


def test_unchanged_files_are_not_read_again(tmp_path, files):
    cache = StatCache(tmp_path / "stat.db")
    first, spy = cache.digests(files, Spy().bind(files)), Spy()
    assert first == [(sha(f"content {i}".encode()), "") for i in range(5)]
    assert StatCache(tmp_path / "stat.db").digests(files, spy.bind(files)) == first and spy.read == []


def test_same_size_new_mtime_is_hashed_again(tmp_path, files):
    StatCache(tmp_path / "stat.db").digests(files, Spy().bind(files))
    write(tmp_path / "f2.bin", b"CONTENT 2", OLD_NS + 10**9)  # same length, new bytes, new mtime
    spy = Spy()
    got = StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))
    assert spy.read == [files[2]] and got[2] == (sha(b"CONTENT 2"), "")


def test_a_replaced_file_with_the_same_mtime_is_hashed_again(tmp_path, files):
    """A new inode (the file was replaced by a rename) is enough, even with size and mtime kept."""
    StatCache(tmp_path / "stat.db").digests(files, Spy().bind(files))
    write(tmp_path / "new.bin", b"CONTENT 1")
    os.replace(tmp_path / "new.bin", files[1])
    spy = Spy()
    got = StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))
    assert spy.read == [files[1]] and got[1] == (sha(b"CONTENT 1"), "")


def test_a_size_change_is_hashed_again(tmp_path, files):
    StatCache(tmp_path / "stat.db").digests(files, Spy().bind(files))
    write(tmp_path / "f0.bin", b"longer content 0")  # mtime kept
    spy = Spy()
    assert StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))[0] == (
        sha(b"longer content 0"),
        "",
    )
    assert spy.read == [files[0]]


def test_content_changed_and_mtime_set_back_is_caught_by_the_ctime(tmp_path, files):
    """DVC's documented limit, closed as git's index closes it: bytes rewritten in place, same size,
    the modification time set back to its old value; the change time still moved (the kernel sets
    it on every write and utime), so the file is hashed again."""
    import time

    StatCache(tmp_path / "stat.db").digests(files, Spy().bind(files))
    time.sleep(0.05)  # past the file system's timestamp tick
    with open(files[3], "r+b") as handle:
        handle.write(b"C")
    os.utime(files[3], ns=(OLD_NS, OLD_NS))
    spy = Spy().bind(files)
    assert StatCache(tmp_path / "stat.db").digests(files, spy)[3] == (sha(b"Content 3"), "")
    assert spy.read == [files[3]]


def test_a_file_modified_just_now_is_not_remembered(tmp_path, files):
    """Racily clean: a write in the same timestamp tick after the hash would not change the stat,
    so a file modified less than two seconds before it was hashed is hashed again next time."""
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"just written")
    listed = [*files, str(fresh)]
    StatCache(tmp_path / "stat.db").digests(listed, Spy().bind(listed))
    spy = Spy()
    StatCache(tmp_path / "stat.db").digests(listed, spy.bind(listed))
    assert spy.read == [str(fresh)]


def test_missing_and_empty_files_have_reasons(tmp_path, files):
    empty = write(tmp_path / "empty.bin", b"")
    got = StatCache(tmp_path / "stat.db").digests(
        [files[0], str(tmp_path / "gone.bin"), empty],
        Spy().bind([files[0], str(tmp_path / "gone.bin"), empty]),
    )
    assert got[1] == (None, "file not found") and got[2] == (None, "empty file")
    assert StatCache(tmp_path / "stat.db").digests([empty], Spy().bind([empty])) == [(None, "empty file")]


def test_a_damaged_row_is_never_trusted(tmp_path, files):
    StatCache(tmp_path / "stat.db").digests(files, Spy().bind(files))
    db = sqlite3.connect(tmp_path / "stat.db")
    db.execute("UPDATE stat SET digest = ? WHERE path = ?", ("0" * 64, os.fsencode(files[4])))
    db.commit()
    db.close()
    spy = Spy()
    got = StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))
    assert spy.read == [files[4]] and got[4] == (sha(b"content 4"), "")


def test_garbage_over_the_database_hashes_everything(tmp_path, files):
    (tmp_path / "stat.db").write_bytes(b"garbage" * 1000)
    spy = Spy()
    got = StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))
    assert len(spy.read) == 5 and got[0] == (sha(b"content 0"), "")
    spy = Spy()
    StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))
    assert spy.read == []  # a fresh database took its place


def test_two_threads_opening_a_fresh_database_lose_no_rows(tmp_path, files):
    """Two connections creating stat.db at the same moment: SQLite answers one of them "database
    is locked" at once (switching to WAL takes no busy wait). That is a busy database, not a damaged
    one: it was once set aside, losing the rows the other connection had just written (a merge's
    verification thread beside its main thread lost its shard digests that way)."""
    import threading

    for trial in range(60):
        cache = StatCache(tmp_path / f"c{trial}" / "stat.db")
        barrier = threading.Barrier(2)

        def digest(paths, cache=cache, barrier=barrier):
            barrier.wait()
            cache.digests(paths, Spy().bind(paths))

        threads = [threading.Thread(target=digest, args=(part,)) for part in (files[:2], files[2:])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not list((tmp_path / f"c{trial}").glob("*.damaged-*")), trial
        spy = Spy()
        StatCache(tmp_path / f"c{trial}" / "stat.db").digests(files, spy.bind(files))
        assert spy.read == [], trial


def test_a_locked_database_is_not_set_aside(tmp_path, files, monkeypatch):
    """ "database is locked" on every try: the files are hashed, nothing is remembered, and the
    database (another process's rows) is left where it is."""
    StatCache(tmp_path / "stat.db").digests(files[:1], Spy().bind(files[:1]))
    real = sqlite3.connect

    class Locked:
        def __init__(self, *args, **kwargs):
            self.db = real(*args, **kwargs)

        def execute(self, sql, *args):
            raise sqlite3.OperationalError("database is locked")

        def close(self):
            self.db.close()

    monkeypatch.setattr("negalign_cli.cache.statcache.time.sleep", lambda s: None)
    monkeypatch.setattr(sqlite3, "connect", Locked)
    spy = Spy()
    got = StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))
    assert len(spy.read) == 5 and got[1] == (sha(b"content 1"), "")
    monkeypatch.setattr(sqlite3, "connect", real)
    assert not list(tmp_path.glob("*.damaged-*"))
    spy = Spy()
    StatCache(tmp_path / "stat.db").digests(files, spy.bind(files))
    assert spy.read == files[1:]  # the first file's row survived
