"""Fault suite: the cache. Nothing lost, nothing silently wrong, every failure one clear line."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.cache.items import _key
from negalign_cli.cache.workspace import Workspace
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.words import WordList, load_templates
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages import files
from negalign_cli.stages import images as images_module
from negalign_cli.stages.images import digest_images, embed_images, image_namespace
from negalign_cli.stages.text import text_embeddings
from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_image_folder


def _listing(folder):
    return digest_images(list_images(folder))


# ----------------------------------------------------------------------------- data lost
def test_gc_during_a_run_leaves_the_runs_vectors_alone(tiny_model, workspace, folder, monkeypatch):
    """`cache gc --items-older-than 0s` between two batches of `embed images` used to delete the
    vectors of the first batch; the run then stored "not processed" skips for good."""
    original = images_module._run_missing
    removed = []

    def with_gc_in_the_middle(listing, missing, *args, **kwargs):
        process = args[2]

        def process_then_gc(batch, digests):
            finish = process(batch, digests)  # the batch's vectors are stored when it finishes
            if finish is not None:
                finish()
            removed.append(Workspace.open(workspace.root).gc(items_older_than=0.0).items_removed)

        return original(listing, missing, *args[:2], process_then_gc, *args[3:], **kwargs)

    monkeypatch.setattr(images_module, "_run_missing", with_gc_in_the_middle)
    result = embed_images(tiny_model, _listing(folder), workspace, workers=0, batch_size=3)
    assert len(removed) == 3 and sum(removed) == 0  # gc ran after each batch and kept everything
    counts = result.artifact.manifest["counts"]
    assert counts["embedded"] == 8 and counts["skipped"] == 0
    # once the run is over, the same gc may prune its namespace
    assert workspace.gc(items_older_than=0.0).items_removed == 8


def test_a_run_never_stores_an_artifact_whose_vectors_vanished(tiny_model, workspace, folder, monkeypatch):
    """If vectors vanish under a run anyway (a damaged store, a gc that ignored the lease), the
    run fails in one line and stores nothing, instead of caching "not processed" skips."""
    listing = _listing(folder)
    embed_images(tiny_model, listing, workspace, workers=0, batch_size=4)  # all 8 cached
    namespace = image_namespace(workspace, tiny_model)
    workspace.items.drop(namespace.id)  # behind the lease's back
    original = images_module._run_missing

    def evict_after(*args, **kwargs):
        failures = original(*args, **kwargs)
        workspace.items.drop(namespace.id)
        return failures

    monkeypatch.setattr(images_module, "_run_missing", evict_after)
    more = make_image_folder(folder.parent / "more", per_class=1)
    with pytest.raises(NegalignError, match="vanished from the image cache while it ran"):
        embed_images(tiny_model, _listing(more), workspace, workers=0, store_dtype="float16")
    assert all(
        r["stage"] != "embed-images" or "float16" not in str(r["params"]) for r in workspace.store.records()
    )


def test_gc_reindexes_intact_artifacts_after_the_index_is_lost(tiny_model, workspace, folder):
    result = embed_images(tiny_model, _listing(folder), workspace, workers=0)
    key = result.artifact.key
    workspace.close()
    import shutil

    shutil.rmtree(workspace.root / "index")  # the index is lost; the folders are intact
    fresh = Workspace.open(workspace.root)
    report = fresh.gc()
    assert report.reindexed_artifacts and not report.unreachable_artifacts
    assert fresh.store.get(key) is not None
    again = embed_images(tiny_model, _listing(folder), fresh, workers=0)
    assert again.hit and again.artifact.key == key
    fresh.close()


def test_interrupted_text_encoding_keeps_finished_batches(tiny_model, workspace, monkeypatch):
    """Ctrl-C while encoding 60 words in batches of 10 keeps the finished batches."""
    import negalign_cli.compute.text as text_module  # the stage imports it where it encodes

    calls = {"n": 0}
    original = text_module.encode_texts

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(text_module, "encode_texts", interrupt_on_third)
    words = [f"word{i}" for i in range(60)]
    templates = load_templates("bare")  # one template: 10 prompts = 10 words a batch
    with pytest.raises(KeyboardInterrupt):
        text_embeddings(tiny_model, words, templates, workspace, batch_size=10)
    monkeypatch.setattr(text_module, "encode_texts", original)
    result = text_embeddings(tiny_model, words, templates, workspace, batch_size=10)
    assert result.encoded == 40  # 20 were kept from the interrupted run


def test_a_changed_byte_inside_a_stored_vector_is_caught(tiny_model, workspace, folder):
    """16 bytes overwritten inside one stored vector, in its shard file (the index is intact): the
    record's checksum catches it, the vector is recomputed, and the number is right again."""
    listing = _listing(folder)
    first = embed_images(tiny_model, listing, workspace, workers=0)
    clean = np.load(first.artifact.file(files.IMAGE_EMBEDDINGS))
    namespace = image_namespace(workspace, tiny_model)
    workspace.close()
    (shard,) = (workspace.root / "vectors" / namespace.id).glob("*.rec")
    data = bytearray(shard.read_bytes())
    assert len(data) == 8 * namespace.width  # 8 records, nothing else
    data[40:56] = np.full(4, 1000.0, np.float32).tobytes()  # inside the first record's vector
    shard.write_bytes(bytes(data))
    reopened = Workspace.open(workspace.root)
    reporter = RecordingReporter()
    again = embed_images(tiny_model, listing, reopened, workers=0, store_dtype="float16", reporter=reporter)
    assert "1 cached vector(s) failed their checksum" in reporter.text()
    assert again.artifact.manifest["counts"]["encoded"] == 1
    np.testing.assert_allclose(np.load(again.artifact.file(files.IMAGE_EMBEDDINGS)), clean, atol=1e-3)
    reopened.close()


# ----------------------------------------------------------------------------- cached failures
def test_a_transient_skip_is_retried_by_the_next_run(tiny_model, workspace, folder, monkeypatch):
    """A file that vanished mid-run is skipped with a passing reason; once it is back, the next run
    retries it instead of serving the stored skip."""
    listing = _listing(folder)
    victim = listing.images.paths[2]
    from pathlib import Path

    saved = Path(victim).read_bytes()
    Path(victim).unlink()  # listed and hashed, then gone before decoding
    first = embed_images(tiny_model, listing, workspace, workers=0)
    table = pd.read_parquet(first.artifact.file(files.IMAGE_TABLE))
    assert table.loc[table["path"] == victim, "reason"].item() == "file vanished before it was read"
    Path(victim).write_bytes(saved)
    reporter = RecordingReporter()
    second = embed_images(tiny_model, listing, workspace, workers=0, reporter=reporter)
    assert not second.hit and "skipped for a passing reason; retrying" in reporter.text()
    counts = second.artifact.manifest["counts"]
    assert counts["skipped"] == 0 and counts["encoded"] == 1 and counts["cached"] == 7
    assert embed_images(tiny_model, listing, workspace, workers=0).hit  # final now


def test_a_content_failure_is_final(tiny_model, workspace, folder):
    (folder / "birds" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    listing = _listing(folder)
    embed_images(tiny_model, listing, workspace, workers=0)
    assert embed_images(tiny_model, listing, workspace, workers=0).hit


def test_strict_holds_on_a_cache_hit(tmp_path, folder):
    (folder / "birds" / "broken.jpg").write_bytes(b"not an image")
    args = ["embed", "images", "--images", str(folder), "--workers", "0", "--cache-dir", str(tmp_path / "c")]
    assert cli(*args).exit_code == 0
    strict = cli(*args, "--strict")
    assert "cache hit" in strict.output
    one_line_error(strict, "--strict turns skips into a failure")


# ----------------------------------------------------------------------------- damaged storage
@pytest.mark.parametrize("where", ["vectors", "index"])
def test_a_file_where_a_cache_folder_belongs(tmp_path, folder, where):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / where).write_text("not a folder")
    result = cli("embed", "images", "--images", str(folder), "--workers", "0", "--cache-dir", str(cache))
    one_line_error(result, f"{cache / where} is a file where")


@pytest.mark.parametrize("database", ["index/cache.db", "vectors/index.db"])
def test_garbage_over_a_database_is_one_line_and_repair_mends_it(tmp_path, folder, database):
    cache = tmp_path / "c"
    base = ["--cache-dir", str(cache)]
    embed = ["embed", "images", "--images", str(folder), "--workers", "0", *base]
    assert cli(*embed).exit_code == 0
    import gc

    gc.collect()  # the command's database connections close, as they do when a process ends
    assert not (cache / f"{database}-wal").exists()
    (cache / database).write_bytes(b"garbage" * 1000)
    more = make_image_folder(tmp_path / "more", per_class=1)
    new_images = ["embed", "images", "--images", str(more), "--workers", "0", *base]
    # every command that reads the damaged database says so in one line (a cache hit that needs no
    # vector, and a gc that prunes none, run on: they do not touch the vector store)
    for args in (new_images, ["cache", "ls", *base], ["cache", "gc", "--items-older-than", "0s", *base]):
        one_line_error(cli(*args), "cache repair")
    repaired = cli("cache", "repair", *base)
    assert repaired.exit_code == 0, repaired.output
    if database.startswith("index"):
        assert "index rebuilt: 1 artifact(s) indexed" in repaired.output
        assert "cache hit" in cli(*embed).output  # nothing recomputed
    else:
        # the vector index is rebuilt from the shard files: every vector is kept
        assert "per-item vectors: 8 kept, 0 unreadable" in repaired.output
        assert "cache hit" in cli(*embed).output  # the artifact needs no vector
        again = cli(*new_images)  # the same contents as two of the first folder's images
        assert again.exit_code == 0 and "encoded 0, cached 2" in again.output
        changed = cli(*embed, "--store-dtype", "float16")  # a new artifact, all from the vectors
        assert changed.exit_code == 0 and "encoded 0, cached 8" in changed.output
    assert cli("cache", "ls", *base).exit_code == 0


def test_storage_failures_are_one_line(tmp_path):
    """Disk full and read-only caches, as the OS and SQLite report them, become one line each."""
    import errno

    from negalign_cli.cli.console import storage_failure

    assert "disk full while writing /x" in storage_failure(OSError(errno.ENOSPC, "No space left", "/x"))
    assert "give --cache-dir" in storage_failure(OSError(errno.EROFS, "Read-only file system", "/c/index"))
    assert "read-only" in storage_failure(sqlite3.OperationalError("attempt to write a readonly database"))
    assert "free space" in storage_failure(sqlite3.OperationalError("database or disk is full"))
    assert "cache repair" in storage_failure(sqlite3.DatabaseError("file is not a database"))


def test_disk_full_during_item_puts_is_one_line_and_keeps_finished_batches(tmp_path, folder, monkeypatch):
    import errno
    import os

    import negalign_cli.cache.items as items_module

    calls = {"n": 0}
    original = os.pwrite

    def full_after_one_batch(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 1:
            return original(fd, data[: len(data) // 3], offset) and _raise()  # a torn write
        return original(fd, data, offset)

    def _raise():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(items_module.os, "pwrite", full_after_one_batch)
    args = ["embed", "images", "--images", str(folder), "--workers", "0", "--batch-size", "4"]
    one_line_error(cli(*args, "--cache-dir", str(tmp_path / "c")), "disk full")
    monkeypatch.setattr(items_module.os, "pwrite", original)
    resumed = cli(*args, "--cache-dir", str(tmp_path / "c"))
    assert resumed.exit_code == 0 and "encoded 4, cached 4" in resumed.output


def test_disk_full_while_writing_an_artifact_is_one_line_and_leaves_nothing(tmp_path, folder, monkeypatch):
    import errno

    original = np.save

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(np, "save", full)
    args = ["embed", "images", "--images", str(folder), "--workers", "0", "--cache-dir", str(tmp_path / "c")]
    one_line_error(cli(*args), "disk full while writing")
    store = Workspace.open(tmp_path / "c").store
    assert store.records() == [] and list(store.tmp_dir.iterdir()) == []  # no partial artifact
    monkeypatch.setattr(np, "save", original)
    again = cli(*args)
    assert again.exit_code == 0 and "encoded 0, cached 8" in again.output  # the vectors were kept


# ----------------------------------------------------------------------------- found in review
def test_cam_recomputes_an_image_vector_it_lacks(tiny_model, workspace, folder):
    """A `cam` vector without its image vector (a stop between the two writes, a bad checksum)
    is recomputed, not reported as vanished on every rerun."""
    from negalign_cli.compute.vision import CamConfig
    from negalign_cli.stages.images import cam_images

    listing = _listing(folder)
    classes = WordList("t", ("birds", "boats"))
    first = cam_images(tiny_model, listing, classes, workspace, CamConfig(), workers=0)
    expected = np.load(first.artifact.file(files.IMAGE_EMBEDDINGS))
    workspace.store.remove(first.artifact.key)
    namespace = image_namespace(workspace, tiny_model)
    workspace.items._forget(workspace.items._ns_num(namespace.id, create=False), [_key(listing.digests[0])])
    again = cam_images(tiny_model, listing, classes, workspace, CamConfig(), workers=0)
    assert again.artifact.manifest["counts"]["computed"] == 1
    np.testing.assert_allclose(np.load(again.artifact.file(files.IMAGE_EMBEDDINGS)), expected, atol=1e-6)


def test_a_listed_file_that_does_not_exist_is_not_retried_forever(tiny_model, workspace, folder, tmp_path):
    (tmp_path / "list.csv").write_text("path\nimgs/birds/0.jpg\nimgs/birds/missing.png\n")
    listing = digest_images(list_images(tmp_path / "list.csv"))
    first = embed_images(tiny_model, listing, workspace, workers=0)
    assert first.artifact.manifest["counts"]["skipped"] == 1
    assert embed_images(tiny_model, listing, workspace, workers=0).hit


def test_repair_rebuilds_lost_namespace_records_and_waits_for_running_commands(tiny_model, workspace, folder):
    embed_images(tiny_model, _listing(folder), workspace, workers=0)
    namespace = image_namespace(workspace, tiny_model)
    with workspace.items.lease(namespace), pytest.raises(NegalignError, match="a running command is using"):
        workspace.repair()
    workspace.close()
    (workspace.root / "item-namespaces" / "cache.db").write_bytes(b"\0" * 4096)
    reopened = Workspace.open(workspace.root)
    report = reopened.repair()
    assert report.items.records_rebuilt >= 1
    assert any(info.count == 8 for info in reopened.items.namespaces())
    assert reopened.items.evict_model("") >= 8 and reopened.items.count() == 0
    reopened.close()


def test_a_malformed_manifest_is_a_damaged_folder_not_a_crash(tiny_model, workspace, folder):
    import json

    result = embed_images(tiny_model, _listing(folder), workspace, workers=0)
    workspace.store.index.pop(result.artifact.key)
    manifest_path = result.artifact.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["outputs"][files.IMAGE_TABLE]["bytes"]
    manifest_path.write_text(json.dumps(manifest))
    report = workspace.gc()
    assert report.unreachable_artifacts and not report.reindexed_artifacts
    workspace.repair()


def test_gc_removes_only_scratch_folders_nobody_holds(tmp_path):
    import os
    import shutil
    import tempfile as tempfile_module
    import uuid

    from negalign_cli.settings import SCRATCH_OWNER, contain_writes

    cache = Path(tempfile_module.gettempdir()) / f"ng-{uuid.uuid4().hex[:6]}"  # short enough for scratch
    try:
        contain_writes(cache)  # this process's folder, held
        dead = cache / "scratch" / "123-dead"
        dead.mkdir()
        (dead / SCRATCH_OWNER).touch()  # its owner lock is free: the command ended or died
        (dead / "pymp-x").mkdir()
        report = Workspace.open(cache).gc()
        assert report.orphan_temp_folders == ["scratch/123-dead"]
        assert [p.name for p in (cache / "scratch").iterdir()] == [str(os.getpid())]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_scratch_is_used_only_where_a_unix_socket_path_fits(tmp_path):
    """DataLoader workers bind a Unix socket under the temporary folder; a path over 107 bytes
    loses their results (it hung the run). Short cache paths get the scratch folder, long ones
    keep the system's temporary folder."""
    import tempfile as tempfile_module
    import uuid

    from negalign_cli.settings import MAX_SCRATCH_PATH, contain_writes

    short = Path(tempfile_module.gettempdir()) / f"ng-{uuid.uuid4().hex[:6]}"
    long = tmp_path / ("x" * 80)
    before = tempfile_module.gettempdir()
    contain_writes(long)
    assert tempfile_module.gettempdir() == before
    contain_writes(short)
    try:
        assert tempfile_module.gettempdir().startswith(str(short.resolve()))
        assert len(tempfile_module.gettempdir()) <= MAX_SCRATCH_PATH
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)
