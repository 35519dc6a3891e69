"""Faults found reviewing the day's merges (reader pool, merge writes, pyarrow-only evaluate,
standard results.json, unchanged exports): each test failed on the code before its fix."""

from __future__ import annotations

import os
from pathlib import Path

from negalign_cli.cache.store import ArtifactStore, StageSpec

SPEC = StageSpec("review", 1, {"n": 1}, {"input": "abc"})


def _compute(folder: Path) -> dict:
    (folder / "metrics.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (folder / "results.json").write_text('{"x": 1}', encoding="utf-8")
    return {}


# --- 1. an --out file hard-linked to the cache's own file is replaced by a copy -----------------


def test_an_export_does_not_leave_an_out_file_sharing_the_caches_inode(tmp_path):
    """An --out file that is a hard link to the artifact's file in the cache (``cp -al``, ``rsync
    --link-dest``, ``ln``) holds the artifact's bytes, so the unchanged-export check used to leave
    it: --out and the cache then shared one inode, and a later in-place edit of the --out file
    (``>>`` a note to metrics.csv) rewrote the cached artifact. Now such a file is copied: after the
    export it is its own inode, and editing it leaves the cache as it was."""
    store = ArtifactStore(tmp_path / "cache")
    artifact = store.run(SPEC, _compute).artifact
    out = tmp_path / "out"
    artifact.export(out)
    cached = artifact.path / "metrics.csv"
    for name in ("metrics.csv", "manifest.json"):  # the --out files are the cache's inodes
        (out / name).unlink()
        os.link(artifact.path / name, out / name)
    artifact.export(out)
    for name in ("metrics.csv", "manifest.json"):
        assert not os.path.samefile(out / name, artifact.path / name), name
    assert (out / "metrics.csv").read_bytes() == cached.read_bytes()
    with open(out / "metrics.csv", "a", encoding="utf-8") as handle:
        handle.write("a note\n")
    assert cached.read_text(encoding="utf-8") == "a,b\n1,2\n"
    assert store.get(SPEC) is not None  # the artifact still verifies
