from __future__ import annotations

import numpy as np
import pytest

from negalign_cli.cache.items import ItemStore


def test_round_trip_and_missing_rows(tmp_path):
    store = ItemStore(tmp_path)
    ns = store.namespace("text", "fp-a", {"templates": ["{}"]}, dim=4, dtype="float32")
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    ns.put_many(["cat", "dog", "a b c"], vectors)
    got, found = ns.get_many(["dog", "cow", "cat", "a b c"])
    assert found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(got[[0, 2, 3]], vectors[[1, 0, 2]])
    np.testing.assert_array_equal(got[1], 0)
    # a fresh store object on the same folder sees the same values
    again, found_again = (
        ItemStore(tmp_path).namespace("text", "fp-a", {"templates": ["{}"]}, 4).get_many(["cat"])
    )
    assert found_again.all() and np.array_equal(again[0], vectors[0])


def test_namespaces_are_separate(tmp_path):
    store = ItemStore(tmp_path)
    a = store.namespace("text", "fp-a", {"templates": ["{}"]}, dim=2)
    b = store.namespace("text", "fp-b", {"templates": ["{}"]}, dim=2)
    c = store.namespace("text", "fp-a", {"templates": ["the {}"]}, dim=2)
    a.put_many(["w"], np.ones((1, 2), np.float32))
    assert not b.get_many(["w"])[1].any() and not c.get_many(["w"])[1].any()
    assert len({a.id, b.id, c.id}) == 3


def test_float16_storage_and_shape_check(tmp_path):
    ns = ItemStore(tmp_path).namespace("image", "fp", {}, dim=3, dtype="float16")
    ns.put_many(["x"], np.array([[0.1, 0.2, 0.3]]))
    got, _ = ns.get_many(["x"])
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got[0], np.array([0.1, 0.2, 0.3], dtype=np.float16))
    with pytest.raises(ValueError, match="shape"):
        ns.put_many(["y"], np.zeros((1, 4)))


def test_evict_by_model_and_by_age(tmp_path):
    store = ItemStore(tmp_path)
    a = store.namespace("text", "aaaa1111", {}, dim=2)
    b = store.namespace("text", "bbbb2222", {}, dim=2)
    a.put_many(["1", "2"], np.ones((2, 2), np.float32))
    b.put_many(["1"], np.ones((1, 2), np.float32))
    assert store.count() == 3
    assert store.evict_model("aaaa", dry_run=True) == 2 and store.count() == 3
    assert store.evict_model("aaaa") == 2
    assert store.count() == 1 and not a.get_many(["1"])[1].any() and b.get_many(["1"])[1].all()
    assert [n.model for n in store.namespaces()] == ["bbbb2222"]
    assert store.evict_older_than(3600) == 0
    assert store.evict_older_than(-1, dry_run=True) == 1 and store.count() == 1
    assert store.evict_older_than(-1) == 1 and store.count() == 0


def test_namespace_records_need_no_scan_and_age_is_last_use(tmp_path, monkeypatch):
    """`cache ls` reads the small namespace index, never every key; `--items-older-than` drops the
    namespaces no run has used for that long, whatever their vectors' age."""
    import negalign_cli.cache.items as items_module

    clock = [1_000_000.0]
    monkeypatch.setattr(items_module.time, "time", lambda: clock[0])
    store = ItemStore(tmp_path)
    old = store.namespace("text", "old-model", {}, dim=2)
    used = store.namespace("text", "used-model", {}, dim=2)
    old.put_many(["a", "b", "c"], np.ones((3, 2), np.float32))
    used.put_many(["a"], np.ones((1, 2), np.float32))
    used.put_many(["a"], np.ones((1, 2), np.float32))  # already there: not counted twice
    clock[0] += 10 * 86400
    ItemStore(tmp_path).namespace("text", "used-model", {}, dim=2).get_many(["a"])  # a run looks it up
    monkeypatch.setattr(store, "_locate", lambda *a, **k: pytest.fail("looked vectors up"))
    records = {info.model: info for info in store.namespaces()}
    assert records["old-model"].count == 3 and records["used-model"].count == 1
    assert store.count() == 4
    assert store.evict_older_than(5 * 86400, dry_run=True) == 3
    assert store.evict_older_than(5 * 86400) == 3
    assert [info.model for info in store.namespaces()] == ["used-model"] and store.count() == 1
    monkeypatch.undo()
    assert used.get_many(["a"])[1].all() and not old.get_many(["a"])[1].any()


# ----------------------------------------------------------------------------- shard files (format 3)
def _vectors(n, dim=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_shard_files_hold_raw_bytes_plus_28_per_record(tmp_path):
    """On disk a vector costs its raw bytes, its 20-byte key and its 8-byte checksum: nothing else
    goes into the shard files, and a second put of the same items writes nothing."""
    store = ItemStore(tmp_path)
    ns = store.namespace("image", "fp", {}, dim=512)
    items = [f"img{i}" for i in range(1000)]
    for start in range(0, 1000, 256):
        ns.put_many(items[start : start + 256], _vectors(len(items[start : start + 256]), 512, start))
    shards = list((tmp_path / "vectors" / ns.id).glob("*.rec"))
    assert len(shards) == 1 and shards[0].stat().st_size == 1000 * (512 * 4 + 28)
    ns.put_many(items, _vectors(1000, 512))
    assert shards[0].stat().st_size == 1000 * (512 * 4 + 28) and store.count() == 1000
    assert store.namespaces()[0].count == 1000


def test_a_torn_shard_tail_is_never_served(tmp_path):
    """A shard cut inside its last record (a crash, a full disk): the rows before it are served,
    the torn one is reported missing and forgotten, and a later put stores it again."""
    store = ItemStore(tmp_path)
    ns = store.namespace("text", "fp", {}, dim=8)
    values = _vectors(5)
    ns.put_many(list("abcde"), values)
    store.close()
    (shard,) = (tmp_path / "vectors" / ns.id).glob("*.rec")
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 10)
    again = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8)
    got, found = again.get_many(list("abcde"))
    assert found.tolist() == [True, True, True, True, False] and again.corrupt == 1
    np.testing.assert_array_equal(got[:4], values[:4])
    np.testing.assert_array_equal(got[4], 0)
    again.put_many(["e"], values[4:])
    assert again.get_many(["e"])[1].all() and again.store.count() == 5


def test_a_changed_key_or_vector_byte_fails_the_checksum(tmp_path):
    store = ItemStore(tmp_path)
    ns = store.namespace("text", "fp", {}, dim=8)
    ns.put_many(list("abc"), _vectors(3))
    store.close()
    (shard,) = (tmp_path / "vectors" / ns.id).glob("*.rec")
    data = bytearray(shard.read_bytes())
    width = ns.width
    data[width + 25] ^= 1  # one bit of b's vector
    data[2 * width + 3] ^= 1  # one bit of c's key
    shard.write_bytes(bytes(data))
    again = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8)
    assert again.get_many(list("abc"))[1].tolist() == [True, False, False] and again.corrupt == 2
    assert again.store.count() == 1  # both forgotten


def test_records_written_but_not_indexed_are_invisible_until_a_rebuild(tmp_path, monkeypatch):
    """A run killed between the fsync of its records and the index commit: nothing is served from
    the unindexed bytes; a rebuild of the index (cache repair) finds them, checksums verified."""
    store = ItemStore(tmp_path)
    ns = store.namespace("text", "fp", {}, dim=8)
    values = _vectors(6)
    ns.put_many(list("abc"), values[:3])
    original = ItemStore._transaction

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ItemStore, "_transaction", killed)
    with pytest.raises(KeyboardInterrupt):
        ns.put_many(list("def"), values[3:])
    monkeypatch.setattr(ItemStore, "_transaction", original)
    assert ns.get_many(list("abcdef"))[1].tolist() == [True] * 3 + [False] * 3
    store.close()
    kept, lost = ItemStore(tmp_path).rebuild_index()
    assert (kept, lost) == (6, 0)
    got, found = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8).get_many(list("fedcba"))
    assert found.all()
    np.testing.assert_array_equal(got, values[::-1])


def test_two_writers_on_one_namespace_use_separate_shards(tmp_path):
    one = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8)
    two = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8)
    values = _vectors(40)
    for start in range(0, 40, 10):
        (one if start % 20 == 0 else two).put_many(
            [str(i) for i in range(start, start + 10)], values[start : start + 10]
        )
        one.put_many([str(start)], values[start : start + 1])  # already stored by one of them
    assert len(list((tmp_path / "vectors" / one.id).glob("*.rec"))) == 2
    got, found = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8).get_many([str(i) for i in range(40)])
    assert found.all()
    np.testing.assert_array_equal(got, values)


def test_duplicate_items_in_one_call(tmp_path):
    ns = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8)
    values = _vectors(3)
    ns.put_many(["a", "b", "a"], values)  # the first "a" wins
    got, found = ns.get_many(["b", "a", "zz", "a"])
    assert found.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(got[[0, 1, 3]], values[[1, 0, 0]])
    assert ns.store.count() == 2


def test_gc_removes_the_format_2_store_and_its_records(tmp_path):
    """Vectors of the old diskcache layout are not read; `cache gc` removes them and their
    namespace records (records written before format 3 carry no format field)."""
    from dataclasses import asdict

    from negalign_cli.cache.items import NamespaceInfo
    from negalign_cli.cache.workspace import Workspace

    store = ItemStore(tmp_path)
    current = store.namespace("text", "fp", {}, dim=8)
    current.put_many(["a"], _vectors(1))
    old = asdict(NamespaceInfo("0123456789abcdef01234567", "image", "fp", {}, 8, "float32", 0.0, 5, 0.0))
    del old["format"]
    store.records[old["id"]] = old
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "cache.db").write_bytes(b"x" * 5000)
    store.close()
    report = Workspace.open(tmp_path).gc()
    assert report.freed_bytes >= 5000 and not (tmp_path / "items").exists()
    assert [info.id for info in ItemStore(tmp_path).namespaces()] == [current.id]


def test_repair_rebuilds_a_deleted_index_and_moves_a_stray_file_aside(tmp_path):
    store = ItemStore(tmp_path)
    ns = store.namespace("text", "fp", {}, dim=8)
    values = _vectors(4)
    ns.put_many(list("abcd"), values)
    store.close()
    (tmp_path / "vectors" / "index.db").unlink()
    report = ItemStore(tmp_path).repair()
    assert (report.vectors_kept, report.vectors_lost) == (4, 0)
    got, found = ItemStore(tmp_path).namespace("text", "fp", {}, dim=8).get_many(list("dcba"))
    assert found.all()
    np.testing.assert_array_equal(got, values[::-1])
    import shutil

    shutil.rmtree(tmp_path / "vectors")
    (tmp_path / "vectors").write_text("a stray file")
    assert ItemStore(tmp_path).repair().vectors_kept == 0
    assert (tmp_path / "vectors").is_dir() or not (tmp_path / "vectors").exists()
    assert not ItemStore(tmp_path).namespace("text", "fp", {}, dim=8).get_many(["a"])[1].any()
