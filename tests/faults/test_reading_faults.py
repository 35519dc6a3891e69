"""Fault suite: reading inputs. Truncated tar shards and duplicate members are said, never dropped;
a FIFO or a device is never opened (it would hang or never end); a brace range is counted before
it is expanded; one image given to --images says what --images takes.

The FIFO tests run the command in a thread with a time limit: a regression fails the test (and the
hung reader is released by opening the FIFO for writing) instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pandas as pd
import pytest

from negalign_cli.errors import NegalignError
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.tars import count_braces, expand_braces, locate
from negalign_cli.stages import files
from tests.faults.helpers import cli, one_line_error
from tests.helpers import TINY
from tests.helpers.images import rgb

LIMIT_S = 120  # far above what any of these commands takes


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    rgb(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[int, int]]]:
    """A USTAR tar's bytes and each member's (header offset, data end) in it."""
    buffer = io.BytesIO()
    spans = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            start = buffer.tell()
            archive.addfile(info, io.BytesIO(data))
            spans.append((start, start + 512 + len(data)))
    return buffer.getvalue(), spans


def _embed(images: str, tmp_path: Path, *extra: str):
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    args = ["embed", "images", "--images", images, "--workers", "0", *extra]
    result = cli(*args, "--cache-dir", str(tmp_path / "c"), "--out", str(out))
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / files.IMAGE_TABLE)


# --------------------------------------------------------------------------- truncated tar shards
MEMBERS = [("a.png", 1), ("a.txt", None), ("b.png", 2), ("c.png", 3), ("d.png", 4)]


@pytest.fixture()
def shard_bytes():
    members = [(name, _png(seed) if seed else b"a caption") for name, seed in MEMBERS]
    return _tar(members)


@pytest.mark.parametrize("kept", [1, 3, 4])
def test_a_shard_cut_between_members_says_so(tmp_path, shard_bytes, kept):
    """Cut where a member's header starts (a 512-byte boundary: how a partial copy stops), the
    shard has no end-of-archive marker; tarfile reads it as complete and used to drop the rest
    without a row. The members before the cut stay valid."""
    data, spans = shard_bytes
    cut = spans[kept][0]
    assert cut % 512 == 0
    shard = tmp_path / "s.tar"
    shard.write_bytes(data[:cut])
    images = list_images(str(shard))
    assert images.problems[len(images) - 1].startswith(f"truncated after {kept} members")
    assert images.paths[-1] == str(shard)
    table = _embed(str(shard), tmp_path)
    listed = [Path(p).name for p in table["path"]]
    whole = [name for name, _ in MEMBERS[:kept] if name.endswith(".png")]
    assert listed == [*whole, "s.tar"]
    assert (table["status"][:-1] == "ok").all()
    assert table["status"].iloc[-1] == "skipped"
    assert table["reason"].iloc[-1].startswith(f"truncated after {kept} members")


def test_a_shard_cut_inside_a_header_or_a_member(tmp_path, shard_bytes):
    data, spans = shard_bytes
    shard = tmp_path / "s.tar"
    shard.write_bytes(data[: spans[3][0] + 100])  # inside c.png's header: not a block boundary
    images = list_images(str(shard))
    assert [Path(p).name for p in images.paths] == ["a.png", "b.png", "s.tar"]
    assert images.problems == {2: images.problems[2]}
    assert images.problems[2].startswith("truncated after 3 members")
    shard.write_bytes(data[: spans[3][0] + 1024])  # inside c.png's data
    images = list_images(str(shard))
    assert images.problems == {2: "truncated: the tar shard ends inside this image"}
    assert images.paths[2].endswith("s.tar/c.png")
    shard.write_bytes(data[: spans[1][0] + 512])  # a.txt's header, none of its data
    images = list_images(str(shard))
    assert images.problems == {1: "truncated after 1 members: the tar shard ends inside a.txt"}


def test_an_invalid_header_is_damage_not_an_end(tmp_path, shard_bytes):
    """A block of garbage where a header should be: tarfile stops there as if the archive ended."""
    data, spans = shard_bytes
    start = spans[2][0]
    shard = tmp_path / "s.tar"
    shard.write_bytes(data[:start] + b"\x07" * 512 + data[start + 512 :])
    images = list_images(str(shard))
    assert [Path(p).name for p in images.paths] == ["a.png", "s.tar"]
    assert images.problems[1] == f"tar shard damaged after 2 members (an invalid header at byte {start:,})"


def test_complete_shards_have_no_problem(tmp_path, shard_bytes):
    """No false alarm: a whole shard from tarfile, and one from GNU tar (a 10240-byte record)."""
    data, _ = shard_bytes
    (tmp_path / "whole.tar").write_bytes(data)
    assert list_images(str(tmp_path / "whole.tar")).problems == {}
    if shutil.which("tar") is None:
        pytest.skip("no tar program")
    folder = tmp_path / "files"
    folder.mkdir()
    for name, seed in MEMBERS:
        (folder / name).write_bytes(_png(seed) if seed else b"caption")
    names = [name for name, _ in MEMBERS]
    subprocess.run(["tar", "cf", str(tmp_path / "gnu.tar"), "-C", str(folder), *names], check=True)
    listed = list_images(str(tmp_path / "gnu.tar"))
    assert listed.problems == {} and len(listed) == 4


def test_a_duplicate_member_name_is_skipped_as_a_duplicate(tmp_path):
    """Two members named a.png: two rows with one id; the second is a skipped duplicate, and the
    id leads back to the first (the one read)."""
    data, _ = _tar([("a.png", _png(1)), ("b.png", _png(2)), ("a.png", _png(3))])
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    table = _embed(str(shard), tmp_path)
    assert [Path(p).name for p in table["path"]] == ["a.png", "b.png", "a.png"]
    assert table["status"].tolist() == ["ok", "ok", "skipped"]
    assert table["reason"][2] == "duplicate member name in the tar shard: the first one is read"
    first = locate(str(shard / "a.png"))
    assert not isinstance(first, str) and first.read() == _png(1)


# --------------------------------------------------------------------------- FIFOs and devices
def _release(fifos: list[Path]) -> None:
    """Open each FIFO for writing and close it: a reader blocked on it gets end-of-file."""
    for fifo in fifos:
        with contextlib.suppress(OSError):  # no reader: nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _bounded(fifos: list[Path], call):
    """``call()`` in a thread; a test failure (not a hang) when it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(LIMIT_S)
    if thread.is_alive():
        for _ in range(20):
            _release(fifos)
            thread.join(0.5)
            if not thread.is_alive():
                break
        pytest.fail(f"still reading after {LIMIT_S} s: a FIFO was opened")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _good(path: Path, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb(seed).save(path)
    return path


def test_a_fifo_in_a_folder_is_listed_with_its_reason(tmp_path):
    """It used to be left out without a word; now it has a row, and is never opened."""
    _good(tmp_path / "imgs" / "good.png")
    fifo = _fifo(tmp_path / "imgs" / "pipe.jpg")
    os.symlink(fifo, tmp_path / "imgs" / "link.png")
    table = _bounded([fifo], lambda: _embed(str(tmp_path / "imgs"), tmp_path))
    reasons = dict(zip(table["path"].map(lambda p: Path(p).name), table["reason"], strict=True))
    assert reasons == {
        "good.png": "",
        "link.png": "not a regular file (fifo)",
        "pipe.jpg": "not a regular file (fifo)",
    }


@pytest.mark.parametrize("kind", ["csv", "openood"])
def test_a_fifo_in_a_manifest_is_skipped_not_opened(tmp_path, kind):
    _good(tmp_path / "good.png")
    fifo = _fifo(tmp_path / "pipe.png")
    text = "path,label\ngood.png,a\npipe.png,b\n" if kind == "csv" else "good.png a\npipe.png b\n"
    (tmp_path / "list.csv").write_text(text)
    table = _bounded([fifo], lambda: _embed(str(tmp_path / "list.csv"), tmp_path))
    assert table["status"].tolist() == ["ok", "skipped"]
    assert table["reason"][1] == "not a regular file (fifo)"


def test_a_fifo_or_device_outside_the_root_is_never_read(tmp_path):
    """--allow-outside-root reads what is outside the data root: still never a FIFO, nor a
    character device (/dev/zero's bytes never end; /dev/null, a device of the same kind, keeps a
    regression of this test from spinning or filling the memory)."""
    data = tmp_path / "data"
    _good(data / "good.png")
    fifo = _fifo(tmp_path / "elsewhere" / "pipe.png")
    (data / "list.csv").write_text(f"path\ngood.png\n{fifo}\n/dev/null\n")
    table = _bounded([fifo], lambda: _embed(str(data / "list.csv"), tmp_path, "--allow-outside-root"))
    assert table["reason"].tolist() == [
        "",
        "not a regular file (fifo)",
        "not a regular file (character device)",
    ]
    refused = _bounded([fifo], lambda: _embed(str(data / "list.csv"), tmp_path))
    assert refused["reason"][1].startswith("outside the data root")


@pytest.mark.parametrize("name", ["list.csv", "list.txt", "metadata.csv", "s.tar"])
def test_the_list_itself_a_fifo_is_one_line(tmp_path, name):
    """--images naming a FIFO (a manifest, a Waterbirds metadata.csv, a tar shard): one line that
    says what it is, instead of a read that never returns."""
    fifo = _fifo(tmp_path / name)
    args = ["embed", "images", "--images", str(fifo), "--cache-dir", str(tmp_path / "c")]
    result = _bounded([fifo], lambda: cli(*args))
    one_line_error(result, "is a fifo")


def test_a_device_as_the_list_is_one_line(tmp_path):
    """/dev/null (not /dev/zero, whose endless bytes a regression would read into memory)."""
    result = cli("embed", "images", "--images", "/dev/null", "--cache-dir", str(tmp_path / "c"))
    one_line_error(result, "/dev/null is a character device, not a file or folder")


def test_a_fifo_among_tar_shards_is_a_skipped_shard(tmp_path):
    data, _ = _tar([("a.png", _png(1)), ("b.png", _png(2))])
    (tmp_path / "0.tar").write_bytes(data)
    fifo = _fifo(tmp_path / "1.tar")
    table = _bounded([fifo], lambda: _embed(str(tmp_path / "{0..1}.tar"), tmp_path))
    assert [Path(p).name for p in table["path"]] == ["a.png", "b.png", "1.tar"]
    assert table["reason"].tolist() == ["", "", "not a regular file (fifo)"]


def test_a_fifo_in_a_waterbirds_list(tmp_path):
    root = tmp_path / "wb"
    _good(root / "a" / "1.jpg")
    fifo = _fifo(root / "a" / "2.jpg")
    (root / "metadata.csv").write_text(
        "img_id,img_filename,y,split,place\n1,a/1.jpg,0,2,0\n2,a/2.jpg,1,2,1\n"
    )
    table = _bounded([fifo], lambda: _embed(str(root / "metadata.csv"), tmp_path, "--split", "test"))
    assert table["reason"].tolist() == ["", "not a regular file (fifo)"]


def test_a_file_that_becomes_a_fifo_after_hashing(tmp_path, tiny_model):
    """Decoding reads a path again: a file swapped for a FIFO since it was hashed is skipped
    (a passing reason, retried by the next run), with either decoder."""
    from negalign_cli.inputs.datasets import ImageDataset
    from negalign_cli.inputs.listing import is_transient
    from negalign_cli.inputs.reader import read_batch

    fifo = _fifo(tmp_path / "pipe.jpg")
    transform = tiny_model.image_transform()

    def pil():
        return ImageDataset([str(fifo)], transform)[0]

    def batched():  # the reader pool's job (--decode torch): (index, decoded tensor or None, reason)
        read = read_batch((0, (str(fifo),)), transform)
        assert not read.jpegs and not read.decoded, read
        return (*read.failures[0][:1], None, read.failures[0][1])

    for read in (pil, batched):
        index, tensor, reason = _bounded([fifo], read)[:3]
        assert tensor is None and reason == "not a regular file (fifo)" and is_transient(reason)


def test_a_path_swapped_for_a_fifo_after_its_check_is_not_waited_on(tmp_path, monkeypatch):
    """The second guard of the one opening route: the stat check is made to pass (as if the FIFO
    appeared just after it); the open does not block and the opened file's type refuses it."""
    import negalign_cli.hashing as hashing

    fifo = _fifo(tmp_path / "pipe.png")
    monkeypatch.setattr(hashing, "check_regular", lambda path: None)
    with pytest.raises(hashing.NotRegularFile, match=r"not a regular file \(fifo\)"):
        _bounded([fifo], lambda: hashing.open_regular(fifo))


# --------------------------------------------------------------------------- brace ranges
@pytest.mark.parametrize(
    "spec",
    [
        "x.tar",
        "d/{00008..00011}.tar",
        "{a,b}-{1..2}.tar",
        "{3..1}/{x,y,z}/{0..4}.tar",
        "{a,{b,c}}.tar",  # nested
        "{{1,2}..5}.tar",  # a choice that changes the outer group
        "{x{1..3}}y{a,b}",
        "{..3}{1..2}",
        "}{{1,2}{",
    ],
)
def test_brace_counts_equal_the_expansions(spec):
    assert count_braces(spec) == len(expand_braces(spec))


def test_a_huge_brace_range_is_counted_not_expanded(tmp_path):
    """`{0..999999999999}` names 10^12 shards: refused at once. It used to be expanded first (a
    MemoryError); the command runs in a process whose heap is capped at 3 GiB, so a regression
    fails instead of exhausting the machine."""
    assert count_braces("{0..999999999999}.tar") > 1_000_000
    assert count_braces("{{0..999999999999},a}.tar") > 1_000_000  # nested: counted one by one, capped
    spec = str(tmp_path / "{0..999999999999}.tar")
    negalign = Path(sys.executable).with_name("negalign")

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))

    done = subprocess.run(
        [str(negalign), "embed", "images", "--images", spec, *TINY, "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "more than 1,000,000 tar shards" in lines[0]
    with pytest.raises(NegalignError, match="more than 1,000,000"):
        list_images(str(tmp_path / "{a,b}{0..999999}.tar"))  # 2,000,000: the product is counted


# --------------------------------------------------------------------------- one image as --images
@pytest.mark.parametrize("name", ["photo.jpg", "photo.PNG", "photo.dat"])
def test_one_image_as_images_points_to_sanity(tmp_path, name):
    """A picture given to --images used to say "manifest is not UTF-8 text". Named like an image
    or not (then recognised by its bytes), it says what --images takes and where one image goes."""
    path = tmp_path / name
    rgb(1).save(path, format="PNG")
    result = cli("embed", "images", "--images", str(path), "--cache-dir", str(tmp_path / "c"))
    line = one_line_error(result, "is one image")
    assert "takes a folder, an ImageFolder tree, a CSV/TXT manifest, a Waterbirds metadata.csv" in line
    assert "tar shards" in line
    assert f"for one image, try `negalign sanity --image {path}`" in line
    assert "--image " in cli("sanity", "--help").output  # the command it points to takes one image


def test_a_binary_list_that_is_no_image_says_what_images_takes(tmp_path):
    (tmp_path / "list.csv").write_bytes(b"path\n\xff\xfe\x00garbage\n")
    result = cli(
        "embed", "images", "--images", str(tmp_path / "list.csv"), "--cache-dir", str(tmp_path / "c")
    )
    line = one_line_error(result, "is not UTF-8 text")
    assert "--images takes a folder" in line
