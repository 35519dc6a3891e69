from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from negalign_cli.cache.store import ArtifactStore, StageSpec
from negalign_cli.hashing import canonical_json
from negalign_cli.reporting import RecordingReporter

WORKER = Path(__file__).parent / "helpers" / "store_worker.py"
BASE = StageSpec("demo", 1, {"n": 3, "names": ["a", "b"], "tau": 0.05}, {"input": "abc"})


def _writer(payload: bytes = b"hello world", calls: list | None = None):
    def compute(folder: Path):
        if calls is not None:
            calls.append(folder)
        (folder / "data.bin").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "rows.txt").write_text("r1\nr2\n")
        return {"counts": {"rows": 2}}

    return compute


def test_key_is_canonical_and_stable_across_processes():
    same = StageSpec("demo", 1, {"tau": 0.05, "names": ("a", "b"), "n": 3}, {"input": "abc"})
    assert same.key == BASE.key
    code = (
        "from negalign_cli.cache.store import StageSpec;"
        "print(StageSpec('demo', 1, {'n': 3, 'names': ['a', 'b'], 'tau': 0.05}, {'input': 'abc'}).key)"
    )
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == BASE.key


@pytest.mark.parametrize(
    "changed",
    [
        StageSpec("demo2", 1, BASE.params, BASE.inputs),
        StageSpec("demo", 2, BASE.params, BASE.inputs),
        StageSpec("demo", 1, {**BASE.params, "n": 4}, BASE.inputs),
        StageSpec("demo", 1, {**BASE.params, "tau": 0.0500001}, BASE.inputs),
        StageSpec("demo", 1, {**BASE.params, "names": ["b", "a"]}, BASE.inputs),
        StageSpec("demo", 1, {**BASE.params, "extra": None}, BASE.inputs),
        StageSpec("demo", 1, BASE.params, {"input": "abd"}),
        StageSpec("demo", 1, BASE.params, {"input": "abc", "other": "x"}),
    ],
)
def test_key_changes_with_every_part(changed):
    assert changed.key != BASE.key


def test_key_changes_with_every_input_byte(tmp_path):
    from negalign_cli.hashing import sha256_file

    data = bytearray(b"0123456789" * 10)
    path = tmp_path / "in.bin"
    path.write_bytes(bytes(data))
    keys = {StageSpec("demo", 1, {}, {"f": sha256_file(path)}).key}
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        path.write_bytes(bytes(flipped))
        keys.add(StageSpec("demo", 1, {}, {"f": sha256_file(path)}).key)
    assert len(keys) == len(data) + 1


def test_canonical_json_rejects_what_it_cannot_key():
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(TypeError):
        canonical_json({"x": object()})
    with pytest.raises(TypeError):
        canonical_json({1: "non-string key"})


def test_second_run_is_a_hit_and_says_so(tmp_path):
    store = ArtifactStore(tmp_path)
    calls: list = []
    first = store.run(BASE, _writer(calls=calls))
    assert not first.hit and len(calls) == 1
    reporter = RecordingReporter()
    second = ArtifactStore(tmp_path).run(BASE, _writer(calls=calls), reporter)
    assert second.hit and len(calls) == 1
    assert "cache hit" in reporter.text() and BASE.key[:12] in reporter.text()
    assert second.artifact.path == first.artifact.path
    manifest = json.loads((second.artifact.path / "manifest.json").read_text())
    assert manifest["key"] == BASE.key
    assert manifest["params"]["n"] == 3 and manifest["inputs"] == {"input": "abc"}
    assert set(manifest["outputs"]) == {"data.bin", "sub/rows.txt"}
    assert manifest["counts"] == {"rows": 2}
    assert "seconds" in manifest["timing"] and "torch" in manifest["versions"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_output_is_detected_and_recomputed(tmp_path, damage):
    store = ArtifactStore(tmp_path)
    artifact = store.run(BASE, _writer()).artifact
    target = artifact.path / "data.bin"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[3] ^= 0x40
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "delete":
        target.unlink()
    else:
        (artifact.path / "manifest.json").write_text("{not json")
    assert store.get(BASE) is None
    reporter = RecordingReporter()
    calls: list = []
    again = store.run(BASE, _writer(calls=calls), reporter)
    assert not again.hit and len(calls) == 1
    assert "corrupt" in reporter.text()
    assert (again.artifact.path / "data.bin").read_bytes() == b"hello world"
    assert store.get(BASE) is not None


def test_failed_compute_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def broken(folder: Path):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.run(BASE, broken)
    assert store.get(BASE) is None
    assert list(store.tmp_dir.iterdir()) == []
    assert store.records() == []


def test_killed_run_leaves_no_visible_artifact_and_next_run_completes(tmp_path):
    root, markers = tmp_path / "cache", tmp_path / "markers"
    markers.mkdir()
    process = subprocess.Popen([sys.executable, str(WORKER), str(root), "slow", str(markers)])
    deadline = time.time() + 60
    while not (markers / "started").exists():
        assert time.time() < deadline and process.poll() is None, "worker did not start"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    store = ArtifactStore(root)
    assert store.get(BASE) is None and store.records() == []
    assert not (store.artifacts_dir / "demo").exists() or not any((store.artifacts_dir / "demo").iterdir())
    assert len(list(store.tmp_dir.iterdir())) == 1  # the dead run's temp folder, invisible to readers

    finished = subprocess.run(
        [sys.executable, str(WORKER), str(root), "count", str(markers)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert finished.stdout.startswith("COMPUTED")
    assert store.get(BASE) is not None
    report = store.gc()
    assert len(report.orphan_temp_folders) == 1
    assert list(store.tmp_dir.iterdir()) == []
    assert store.get(BASE) is not None  # gc never touches a reachable artifact


def test_two_processes_compute_a_key_once(tmp_path):
    root, markers = tmp_path / "cache", tmp_path / "markers"
    markers.mkdir()
    command = [sys.executable, str(WORKER), str(root), "count", str(markers)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].split() for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert (markers / "computed").read_text().count("1") == 1
    assert sorted(o[0] for o in outputs) == ["COMPUTED", "HIT", "HIT"]
    assert len({o[1] for o in outputs}) == 1


def test_artifact_on_disk_but_not_indexed_is_recovered(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = store.run(BASE, _writer()).artifact
    store.index.pop(BASE.key)  # as if the process died between rename and indexing
    calls: list = []
    result = ArtifactStore(tmp_path).run(BASE, _writer(calls=calls))
    assert result.hit and not calls and result.artifact.path == artifact.path
    assert BASE.key in store.index


def test_gc_reindexes_intact_folders_and_removes_only_damaged_ones(tmp_path):
    """An artifact folder missing from the index (index lost, or a run killed between the rename
    and the index update) is indexed again when it verifies; only a damaged one is deleted."""
    store = ArtifactStore(tmp_path)
    keep = store.run(BASE, _writer()).artifact
    other = StageSpec("demo", 1, {"n": 9}, {})
    intact = store.run(other, _writer()).artifact
    store.index.pop(other.key)  # unindexed but intact
    broken = StageSpec("demo", 1, {"n": 11}, {})
    damaged = store.run(broken, _writer()).artifact
    store.index.pop(broken.key)
    (damaged.path / "data.bin").write_bytes(b"HELLO world")  # unindexed and failing verification
    gone = StageSpec("demo", 1, {"n": 10}, {})
    dangling = store.run(gone, _writer()).artifact
    import shutil

    shutil.rmtree(dangling.path)  # index entry without a folder

    dry = store.gc(dry_run=True)
    assert dry.unreachable_artifacts == [f"demo/{broken.key}"] and damaged.path.exists()
    assert dry.reindexed_artifacts == [f"demo/{other.key}"] and other.key not in store.index
    assert dry.dangling_index_entries == [gone.key] and gone.key in store.index

    report = store.gc()
    assert report.unreachable_artifacts == [f"demo/{broken.key}"]
    assert report.reindexed_artifacts == [f"demo/{other.key}"]
    assert report.dangling_index_entries == [gone.key]
    assert report.freed_bytes > 0
    assert not damaged.path.exists() and gone.key not in store.index
    assert intact.path.exists() and other.key in store.index and store.get(other) is not None
    assert store.get(BASE) is not None and keep.path.exists()


def test_export_copies_outputs_and_manifest(tmp_path):
    artifact = ArtifactStore(tmp_path / "c").run(BASE, _writer()).artifact
    written = artifact.export(tmp_path / "out")
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in written)
    assert names == ["data.bin", "manifest.json", "sub/rows.txt"]
    assert (tmp_path / "out" / "data.bin").read_bytes() == b"hello world"


def test_resolve_prefix(tmp_path):
    from negalign_cli.errors import NegalignError

    store = ArtifactStore(tmp_path)
    store.run(BASE, _writer())
    assert store.resolve(BASE.key[:8]) == BASE.key
    with pytest.raises(NegalignError, match="too short"):
        store.resolve("ab")
    with pytest.raises(NegalignError, match="no artifact"):
        store.resolve("ffffffff" if not BASE.key.startswith("ffffffff") else "00000000")
