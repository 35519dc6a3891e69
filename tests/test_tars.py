"""webdataset tar shards as `--images`: ids, captions, labels, skips, and one cache with files."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pandas as pd
import pytest

from negalign_cli.errors import NegalignError
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.tars import expand_braces
from negalign_cli.stages import files
from negalign_cli.stages.images import digest_images, embed_images
from tests.helpers.images import make_image_folder


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _shard(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            _add(archive, name, data)
    return path


@pytest.fixture()
def shards(tmp_path):
    """Three shards beside a folder holding the same pictures as files:
    00000: a.jpg + a.txt + a.cls, "odd name.v2.png", b.png, notes.json (ignored);
    00001: the bytes of a.jpg again under another key, c.jpg (text, not an image), a folder entry;
    00002: d.png, then e.png cut in the middle (the shard is truncated)."""
    folder = make_image_folder(tmp_path / "imgs", per_class=3)
    pictures = {p.name + p.parent.name: p.read_bytes() for p in sorted(folder.rglob("*.*"))}
    a, b, d, e, odd = (
        pictures[k] for k in ("0.jpgbirds", "1.pngbirds", "1.pngboats", "2.jpgboats", "0.jpgboats")
    )
    data = tmp_path / "data"
    data.mkdir()
    _shard(
        data / "00000.tar",
        [
            ("a.jpg", a),
            ("a.txt", b"a bird on a lake"),
            ("a.cls", b"3"),
            ("odd name.v2.jpg", odd),
            ("b.png", b),
            ("notes.json", b"{}"),
        ],
    )
    with tarfile.open(data / "00001.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
        _add(archive, "sub/again.jpg", a)
        _add(archive, "c.jpg", b"this is not a picture")
        folder_entry = tarfile.TarInfo("sub")
        folder_entry.type = tarfile.DIRTYPE
        archive.addfile(folder_entry)
    full = _shard(data / "00002.tar", [("d.png", d), ("e.jpg", e)]).read_bytes()
    e_start = full.index(e[:64])
    (data / "00002.tar").write_bytes(full[: e_start + len(e) // 2])
    return {"folder": folder, "data": data, "a": a, "b": b, "d": d}


def test_brace_expansion():
    assert expand_braces("d/{00008..00011}.tar") == [f"d/000{i:02d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("{3..1}") == ["3", "2", "1"] and expand_braces("x.tar") == ["x.tar"]


def test_listing_ids_captions_labels_and_skips(shards):
    data = shards["data"]
    images = list_images(str(data / "{00000..00002}.tar"))
    ids = [p.removeprefix(str(data) + "/") for p in images.paths]
    assert ids == [
        "00000.tar/a.jpg",
        "00000.tar/odd name.v2.jpg",
        "00000.tar/b.png",
        "00001.tar/sub/again.jpg",
        "00001.tar/c.jpg",
        "00002.tar/d.png",
        "00002.tar/e.jpg",
    ]
    assert images.labels[0] == "3" and images.labels[1:3] == ["", ""]
    assert images.extra["caption"] == ["a bird on a lake", *[""] * 6]
    assert images.problems == {6: "truncated: the tar shard ends inside this image"}
    listing = digest_images(images)
    assert listing.digests[0] == listing.digests[3] == hashlib.sha256(shards["a"]).hexdigest()
    assert listing.digests[5] == hashlib.sha256(shards["d"]).hexdigest()


def test_missing_and_broken_shards(shards, tmp_path):
    data = shards["data"]
    (data / "00003.tar").write_bytes(b"not a tar at all" * 100)
    images = list_images(str(data / "{00002..00004}.tar"))
    reasons = {
        p.removeprefix(str(data) + "/"): images.problems.get(i, "") for i, p in enumerate(images.paths)
    }
    assert reasons["00002.tar/d.png"] == ""
    assert reasons["00003.tar"].startswith("not a readable tar shard")
    assert reasons["00004.tar"] == "tar shard not found"
    with pytest.raises(NegalignError, match="no tar shard exists"):
        list_images(str(tmp_path / "nothing-{0..3}.tar"))


def test_embedding_shards_shares_the_cache_with_files(shards, tiny_model, workspace):
    """The pictures of the folder are all cached by an `embed images` of the folder; the shards
    then encode nothing new except what only they hold, and their rows equal the files' rows."""
    folder_run = embed_images(tiny_model, digest_images(list_images(shards["folder"])), workspace, workers=0)
    by_digest = dict(
        zip(
            pd.read_parquet(folder_run.artifact.file(files.IMAGE_TABLE))["digest"],
            np.load(folder_run.artifact.file(files.IMAGE_EMBEDDINGS)),
            strict=True,
        )
    )
    listing = digest_images(list_images(str(shards["data"] / "{00000..00002}.tar")))
    result = embed_images(tiny_model, listing, workspace, workers=0)
    counts = result.artifact.manifest["counts"]
    assert counts["encoded"] == 0 and counts["cached"] == 4  # a, odd, b, d: all known as files
    assert counts["duplicates"] == 1 and counts["skipped"] == 2
    table = pd.read_parquet(result.artifact.file(files.IMAGE_TABLE))
    embeddings = np.load(result.artifact.file(files.IMAGE_EMBEDDINGS))
    assert table["status"].tolist() == ["ok", "ok", "ok", "ok", "skipped", "ok", "skipped"]
    assert table["reason"][4] == "not an image PIL can decode"
    assert table["reason"][6].startswith("truncated")
    for row, digest in zip(table["row"], table["digest"], strict=True):
        if row >= 0:
            np.testing.assert_array_equal(embeddings[row], by_digest[digest])
    assert table["caption"][0] == "a bird on a lake"


@pytest.mark.parametrize("decoder", ["pil", "torch"])
def test_shard_images_decode_like_files(shards, tiny_model, workspace, decoder):
    """Encoded from the shards first (nothing cached, in a DataLoader worker), the rows equal those
    of the same pictures as files."""
    listing = digest_images(list_images(str(shards["data"] / "0000{0,2}.tar")))
    from_tars = embed_images(tiny_model, listing, workspace, workers=1, decoder=decoder)
    assert from_tars.artifact.manifest["counts"]["encoded"] == 4
    folder_listing = digest_images(list_images(shards["folder"]))
    folder_run = embed_images(tiny_model, folder_listing, workspace, workers=0, decoder=decoder)
    assert folder_run.artifact.manifest["counts"]["encoded"] == 2  # the two only the folder has
    tars = pd.read_parquet(from_tars.artifact.file(files.IMAGE_TABLE))
    folder = pd.read_parquet(folder_run.artifact.file(files.IMAGE_TABLE))
    tar_rows = np.load(from_tars.artifact.file(files.IMAGE_EMBEDDINGS))
    folder_rows = np.load(folder_run.artifact.file(files.IMAGE_EMBEDDINGS))
    folder_by_digest = dict(zip(folder["digest"], folder["row"], strict=True))
    for row, digest in zip(tars["row"], tars["digest"], strict=True):
        if row >= 0:
            np.testing.assert_allclose(tar_rows[row], folder_rows[folder_by_digest[digest]], atol=1e-6)


def test_member_digests_come_from_the_stat_cache_until_the_shard_changes(shards, tmp_path, monkeypatch):
    import os

    import negalign_cli.inputs.listing as listing
    from negalign_cli.cache.statcache import StatCache

    shard = shards["data"] / "00000.tar"
    old = 1_600_000_000 * 10**9
    os.utime(shard, ns=(old, old))  # not "racy": remembered
    first = digest_images(list_images(str(shard)), stat_cache=StatCache(tmp_path / "stat.db"))
    read = []
    original = listing.member_digest
    monkeypatch.setattr(listing, "member_digest", lambda m: read.append(m.name) or original(m))
    again = digest_images(list_images(str(shard)), stat_cache=StatCache(tmp_path / "stat.db"))
    assert read == [] and again.digests == first.digests
    _shard(shard, [("a.jpg", shards["d"]), ("b.png", shards["b"])])  # rewritten: a.jpg changed
    changed = digest_images(list_images(str(shard)), stat_cache=StatCache(tmp_path / "stat.db"))
    assert sorted(read) == ["a.jpg", "b.png"]
    assert changed.digests == [
        hashlib.sha256(shards["d"]).hexdigest(),
        hashlib.sha256(shards["b"]).hexdigest(),
    ]


def test_the_cli_reads_shards_and_a_rerun_reads_no_image(shards, tmp_path, monkeypatch):
    """`embed images --images 'data/{00000..00002}.tar'`; the rerun is a cache hit that takes
    every digest from the stat cache (no file is hashed, no member read)."""
    import os

    import negalign_cli.inputs.listing as listing
    from tests.faults.helpers import cli

    old = 1_600_000_000 * 10**9
    for shard in shards["data"].glob("*.tar"):
        os.utime(shard, ns=(old, old))
    args = ["embed", "images", "--images", str(shards["data"] / "{00000..00002}.tar"), "--workers", "0"]
    args += ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out")]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert "4 of 7 images embedded, 2 skipped" in " ".join(first.output.split())
    assert (tmp_path / "c" / "stat.db").is_file()
    monkeypatch.setattr(listing, "file_digest", lambda *a: pytest.fail("hashed again"))
    again = cli(*args)
    assert again.exit_code == 0 and "cache hit" in again.output
    table = pd.read_parquet(tmp_path / "out" / files.IMAGE_TABLE)
    assert table["path"][3].endswith("00001.tar/sub/again.jpg") and table["row"][3] == table["row"][0]


def test_an_image_id_leads_back_to_its_member(shards):
    """CAM overlays are drawn from the paths in images.parquet: a member id opens the member."""
    from negalign_cli.inputs.datasets import load_rgb
    from negalign_cli.inputs.tars import Member, locate

    member = locate(str(shards["data"] / "00001.tar" / "sub" / "again.jpg"))
    assert isinstance(member, Member) and member.read() == shards["a"]
    assert load_rgb(member).size == (47, 40)
    assert locate(str(shards["data"] / "00001.tar" / "missing.jpg")).endswith("missing.jpg")
    assert locate(str(shards["folder"] / "birds" / "0.jpg")) == str(shards["folder"] / "birds" / "0.jpg")


def test_a_shard_plan_keeps_tar_members(shards, tmp_path):
    """A sharded run's frozen image list (and each shard's slice of it) still reads the images
    from inside their tar shards."""
    from negalign_cli.stages.shards import _read_images, _write_images, subset

    images = list_images(str(shards["data"] / "{00000..00002}.tar"))
    _write_images(tmp_path / "images.json.gz", images)
    back = _read_images(tmp_path / "images.json.gz")
    assert back.members == images.members and back.paths == images.paths and back.problems == images.problems
    part = subset(images, 2, 5)
    assert [part.location(i) for i in range(3)] == [images.location(i) for i in range(2, 5)]
