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
    monkeypatch.setattr(store.cache, "iterkeys", lambda *a, **k: pytest.fail("scanned every key"))
    records = {info.model: info for info in store.namespaces()}
    assert records["old-model"].count == 3 and records["used-model"].count == 1
    assert store.count() == 4
    assert store.evict_older_than(5 * 86400, dry_run=True) == 3
    assert store.evict_older_than(5 * 86400) == 3
    assert [info.model for info in store.namespaces()] == ["used-model"] and store.count() == 1
    assert used.get_many(["a"])[1].all() and not old.get_many(["a"])[1].any()
