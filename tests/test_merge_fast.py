"""`negalign merge` builds images.parquet from the shards' own Arrow tables with array operations
(no Python loop over images, no DataFrame built from lists), with the bytes the list-built table of
one unsharded run has."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from negalign_cli.inputs.listing import ImageList
from negalign_cli.stages import image_rows
from negalign_cli.stages.image_rows import Listing, image_table, row_order
from negalign_cli.stages.shards import Shard, _merge_tables, subset
from tests.faults.helpers import cli
from tests.helpers.images import make_image_folder


def _parquet(frame) -> bytes:
    out = io.BytesIO()
    frame.to_parquet(out, index=False)
    return out.getvalue()


def _random_run(seed: int, n: int, shards: int, extra: bool):
    """A list with repeated contents (also across shard boundaries), unhashable files (no digest)
    and contents that fail to decode (in every shard, or in one shard only with another reason),
    each shard's images.parquet as `embed images` writes it, and the reference: the table the
    merge built from lists before (its rows, failures and sources, in the same order)."""
    rng = np.random.default_rng(seed)
    paths = [f"/d/c{i % 3}/{i:04d}.png" for i in range(n)]
    labels = [f"c{i % 3}" for i in range(n)]
    contents = rng.integers(0, max(2, n // 3), n)
    digests: list[str | None] = [f"{c:064x}" for c in contents]
    reasons = [""] * n
    for i in rng.choice(n, n // 10, replace=False):
        digests[i], reasons[i] = None, str(rng.choice(["cannot read: x", "empty file"]))
    bad = set(rng.choice(contents, 3).tolist())
    extras = {"size": [int(c) for c in contents]} if extra else {}
    images = ImageList("/d", paths, labels, extras)
    tables, merged_failures, source = [], {}, {}
    for index in range(shards):
        start, stop = Shard(index, shards).bounds(n)
        part = Listing(subset(images, start, stop), digests[start:stop], reasons[start:stop])
        # one content fails only in the first shard, with a reason of its own
        failing = {f"{c:064x}" for c in bad} | ({f"{contents[0]:064x}"} if index == 0 else set())
        failures = {d: f"decode failed in shard {index}" for d in part.digests if d in failing}
        ok = {d for d in part.digests if d is not None and d not in failures}
        found = row_order(part, ok)
        frame = image_table(part, found, failures)
        tables.append(pq.read_table(io.BytesIO(_parquet(frame))))
        for d, s, r in zip(frame["digest"], frame["status"], frame["reason"], strict=True):
            if d and s != "ok":
                merged_failures[d] = r
        ok_rows = frame[frame["status"] == "ok"]
        for d, r in zip(ok_rows["digest"], ok_rows["row"], strict=True):
            source.setdefault(d, (index, int(r)))
    listing = Listing(images, digests, ["" if d else r for d, r in zip(digests, reasons, strict=True)])
    rows = row_order(listing, set(source))
    expected = _parquet(image_table(listing, rows, merged_failures))
    return tables, listing, expected, [source[d] for d in rows]


@pytest.mark.parametrize(
    ("seed", "n", "shards", "extra"),
    [(0, 200, 2, False), (1, 97, 3, False), (2, 60, 4, True), (3, 5, 5, False)],
)
def test_merged_table_equals_the_list_built_one(tmp_path, seed, n, shards, extra):
    tables, listing, expected, located = _random_run(seed, n, shards, extra)
    merged = _merge_tables(tables)
    assert merged.digests == listing.digests and merged.reasons == listing.reasons
    assert list(zip(merged.from_shard.tolist(), merged.from_row.tolist(), strict=True)) == located
    merged.write(tmp_path / "images.parquet", listing)
    assert (tmp_path / "images.parquet").read_bytes() == expected


def test_merge_builds_no_table_from_lists(tmp_path, monkeypatch):
    """Before: the merge read the shards' tables with pandas and built images.parquet from Python
    lists (image_table: a loop over the images, then a DataFrame); now neither, same bytes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEGALIGN_CACHE", raising=False)
    folder = make_image_folder(tmp_path / "data", per_class=3)
    (folder / "boats" / "empty.png").write_bytes(b"")
    (folder / "birds" / "x.png").write_bytes((folder / "boats" / "1.png").read_bytes())  # a copy
    base = ["embed", "images", "--images", str(folder), "--batch-size", "2", "--workers", "0"]
    assert cli(*base, "--cache-dir", "c-whole", "--out", "whole").exit_code == 0
    for i in (0, 1):
        assert cli(*base, "--shard", f"{i}/2", "--shards-dir", "runs").exit_code == 0
    import pandas as pd

    called: list[str] = []
    monkeypatch.setattr(image_rows, "image_table", lambda *a, **k: called.append("image_table"))
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: called.append("read_parquet"))
    import negalign_cli.stages.shards as shards

    monkeypatch.setattr(shards, "image_table", lambda *a, **k: called.append("image_table"))
    merged = cli("merge", "runs", "--cache-dir", "c-merge", "--out", "merged")
    assert merged.exit_code == 0, merged.output
    assert called == []
    for name in ("images.parquet", "image_embeddings.npy"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    whole, got = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "merged"))
    assert whole["key"] == got["key"] and whole["counts"]["skipped"] == got["counts"]["skipped"] == 1


def test_a_shard_file_rewritten_in_place_is_hashed_again(tmp_path, monkeypatch):
    """The merge trusts a shard file's digest from the stat cache only while its stat is unchanged
    (size, mtime, ctime, inode, device): on a real tmpfs, a same-size rewrite with the old mtime
    put back keeps all but the ctime, and is still hashed again and refused."""
    import os

    from negalign_cli import hashing
    from tests.faults.helpers import one_line_error
    from tests.faults.test_storage_faults import tmpfs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEGALIGN_CACHE", raising=False)
    folder = make_image_folder(tmp_path / "data", per_class=3)
    base = ["embed", "images", "--images", str(folder), "--batch-size", "2", "--workers", "0"]
    runs = tmp_path / "runs"
    with tmpfs(runs, "8m"):
        for i in (0, 1):
            done = cli(*base, "--shard", f"{i}/2", "--shards-dir", str(runs), "--cache-dir", "c-shards")
            assert done.exit_code == 0, done.output
        old = 1_600_000_000 * 10**9  # past the racy guard: the stat cache may remember these files
        for path in (p for p in runs.rglob("*") if p.is_file()):  # the plan, the shards' files
            os.utime(path, ns=(old, old))
        assert cli("merge", str(runs), "--cache-dir", "c").exit_code == 0
        hashed: list[str] = []
        original = hashing.sha256_file_sized
        monkeypatch.setattr(
            hashing, "sha256_file_sized", lambda p, *a, **k: hashed.append(str(p)) or original(p, *a, **k)
        )
        again = cli("merge", str(runs), "--cache-dir", "c")
        assert again.exit_code == 0 and "(cache hit)" in again.output, again.output
        assert not [p for p in hashed if p.startswith(str(runs))]  # every shard file from the stat cache
        target = runs / "shard-00001-of-00002" / "artifact" / "image_embeddings.npy"
        before = os.stat(target)
        with open(target, "r+b") as handle:  # same size, other bytes, same inode
            handle.seek(-4, os.SEEK_END)
            last = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            handle.write(bytes(b ^ 0xFF for b in last))
        os.utime(target, ns=(old, old))
        after = os.stat(target)
        assert (after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev) == (
            before.st_size,
            before.st_mtime_ns,
            before.st_ino,
            before.st_dev,
        )
        one_line_error(cli("merge", str(runs), "--cache-dir", "c"), "1 of 2 shard(s) are not done (shard 1)")
        assert str(target) in hashed


def test_the_merged_labels_are_the_plans(tmp_path):
    """As before (the table was built from the plan's list), a shard table's labels are not copied:
    the merged table carries the plan's, whatever a shard folder says."""
    import pyarrow as pa

    tables, listing, expected, _ = _random_run(4, 50, 2, False)
    at = tables[0].schema.get_field_index("label")
    wrong = pa.array(["elsewhere"] * len(tables[0]), type=tables[0].schema.field("label").type)
    tables[0] = tables[0].set_column(at, tables[0].schema.field("label"), wrong)
    _merge_tables(tables).write(tmp_path / "images.parquet", listing)
    assert (tmp_path / "images.parquet").read_bytes() == expected
