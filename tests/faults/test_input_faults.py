"""Fault suite: inputs. Every bad image is skipped with a reason; every bad list is one line."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from negalign_cli.stages import files
from tests.faults.helpers import cli, one_line_error
from tests.helpers.images import make_awkward_images, make_image_folder, rgb


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares ``width``×``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _every_bad_kind(root: Path) -> dict[str, str]:
    """Files of every awkward kind next to good ones; name -> a word its reason must contain
    (empty: it must be embedded)."""
    root.mkdir(parents=True, exist_ok=True)
    make_awkward_images(root)  # corrupt, empty, alpha, 16-bit, grey, tiny
    expected = {
        "corrupt.jpg": "decode",
        "empty.png": "empty",
        "alpha.png": "",
        "sixteen.png": "",
        "gray.png": "",
        "tiny.png": "",
    }
    good = root / "good.png"
    rgb(5).save(good)
    expected["good.png"] = ""
    truncated = root / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    expected["truncated.png"] = "decode"
    cmyk = root / "cmyk.jpg"
    rgb(6).convert("CMYK").save(cmyk)
    expected["cmyk.jpg"] = ""
    palette = root / "palette.png"
    rgb(7).convert("P").save(palette, transparency=0)  # a palette with a transparent colour
    expected["palette.png"] = ""
    animated = root / "animated.gif"
    frames = [rgb(8 + i).convert("P") for i in range(3)]
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=50, loop=0)
    expected["animated.gif"] = ""
    one = root / "one.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(one)
    expected["one.png"] = ""
    (root / "bomb.png").write_bytes(_png_header(20000, 20000))
    expected["bomb.png"] = "too large"
    (root / "folder.jpg").mkdir()  # a directory named like an image: not listed
    loop = root / "loop.png"
    os.symlink(loop, loop)  # a symlink loop: not a file, not listed
    return expected


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_image_kind_is_skipped_with_a_reason(tmp_path, workers):
    """With DataLoader workers too: a decompression bomb used to kill the run from a worker."""
    expected = _every_bad_kind(tmp_path / "imgs")
    args = ["embed", "images", "--images", str(tmp_path / "imgs"), "--workers", str(workers)]
    result = cli(*args, "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "out" / files.IMAGE_TABLE)
    reasons = dict(zip(table["path"].map(lambda p: Path(p).name), table["reason"], strict=True))
    assert set(reasons) == set(expected)  # the directory and the symlink loop are not images
    for name, word in expected.items():
        if word:
            assert word in reasons[name], (name, reasons[name])
        else:
            assert reasons[name] == "", (name, reasons[name])
    rerun = cli(*args, "--cache-dir", str(tmp_path / "c"))
    assert rerun.exit_code == 0 and "cache hit" in rerun.output  # the bomb does not kill a rerun either


def test_max_pixels_is_an_option(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=1)  # 40×47 images
    args = ["embed", "images", "--images", str(folder), "--workers", "0", "--cache-dir", str(tmp_path / "c")]
    result = cli(*args, "--max-pixels", "1000", "--out", str(tmp_path / "out"))
    one_line_error(result, "none of the 2 listed image(s) could be read")
    assert "above --max-pixels 1,000" in result.output


def test_a_file_name_that_is_not_utf8(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb(1).save(folder / "plain.png")
    name = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    rgb(2).save(name.decode("utf-8", "surrogateescape"), format="PNG")
    result = cli(
        "embed",
        "images",
        "--images",
        str(folder),
        "--workers",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "o" / files.IMAGE_TABLE)
    assert (table["status"] == "ok").all() and any(p.endswith("caf\ufffd.png") for p in table["path"])


def test_waterbirds_row_without_a_file_name(tmp_path):
    root = tmp_path / "wb"
    (root / "a").mkdir(parents=True)
    rgb(1).save(root / "a" / "1.jpg")
    (root / "metadata.csv").write_text("img_id,img_filename,y,split,place\n1,a/1.jpg,0,2,0\n2,,1,2,1\n")
    result = cli(
        "embed",
        "images",
        "--images",
        str(root / "metadata.csv"),
        "--split",
        "test",
        "--workers",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "o" / files.IMAGE_TABLE)
    assert table["reason"].tolist() == ["", "metadata row 3 has an empty img_filename"]


@pytest.mark.parametrize("text", ["label\na\nb\n", "file,label\nx.png,a\ny.png,b\n"])
def test_a_manifest_without_a_path_column(tmp_path, text):
    (tmp_path / "list.csv").write_text(text)
    result = cli(
        "embed", "images", "--images", str(tmp_path / "list.csv"), "--cache-dir", str(tmp_path / "c")
    )
    line = one_line_error(result, "has no path column")
    assert "path, image" in line  # names the accepted columns


def test_a_run_that_embeds_nothing_is_an_error(tmp_path):
    (tmp_path / "list.csv").write_text("path\nmissing1.png\nmissing2.png\n")
    result = cli(
        "embed",
        "images",
        "--images",
        str(tmp_path / "list.csv"),
        "--workers",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
    )
    one_line_error(result, "none of the 2 listed image(s) could be read")
    assert not (tmp_path / "c" / "artifacts" / "embed-images").exists() or not any(
        (tmp_path / "c" / "artifacts" / "embed-images").iterdir()
    )


@pytest.mark.parametrize(
    "manifest",
    [
        "\ufeffpath,label\n{a},x\n{b},y\n",  # a byte-order mark
        "path,label\r\n{a},x\r\n{b},y\r\n",  # CRLF line ends
        "path,label\n{a},x\n{a},x\n{b},y\n",  # a duplicated row
        "path,label,extra\n{a},x\n{b},y,1,2\n",  # ragged rows
        "{a} x\n{b} y\n",  # OpenOOD's list
    ],
)
def test_manifest_oddities(tmp_path, manifest):
    folder = make_image_folder(tmp_path / "imgs", per_class=1)
    a, b = "imgs/birds/0.jpg", "imgs/boats/0.jpg"
    (tmp_path / "list.csv").write_text(manifest.format(a=a, b=b), encoding="utf-8")
    result = cli(
        "embed",
        "images",
        "--images",
        str(tmp_path / "list.csv"),
        "--workers",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "o" / files.IMAGE_TABLE)
    if "{a},x\n{a},x" in manifest:  # a path listed twice: skipped the second time, not scored twice
        assert table["status"].tolist() == ["ok", "skipped", "ok"], table
        assert table["reason"][1] == f"manifest entry 2 lists {a} again (entry 1)"
        assert "1 skipped" in " ".join(result.output.split())
        table = table[table["status"] == "ok"]
    assert (table["status"] == "ok").all() and set(table["label"]) == {"x", "y"}
    assert folder.exists()


def test_paths_outside_the_data_root_are_refused(tmp_path):
    """`../../etc/passwd`, absolute paths and symlinks that lead out are refused and counted;
    --allow-outside-root reads what it can."""
    data = tmp_path / "data"
    make_image_folder(data / "imgs", per_class=1)
    outside = tmp_path / "elsewhere.png"
    rgb(9).save(outside)
    os.symlink(outside, data / "imgs" / "birds" / "link.png")
    (data / "list.csv").write_text(
        f"path\nimgs/birds/0.jpg\n../../../../../../etc/passwd\n{outside}\nimgs/birds/link.png\n"
    )
    base = ["embed", "images", "--workers", "0", "--cache-dir", str(tmp_path / "c")]
    result = cli(*base, "--images", str(data / "list.csv"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "3 listed path(s) lead outside the data root and were refused" in result.output
    table = pd.read_parquet(tmp_path / "o" / files.IMAGE_TABLE)
    assert (table["reason"].str.startswith("outside the data root")).sum() == 3
    assert table.loc[0, "status"] == "ok"
    folder = cli(*base, "--images", str(data / "imgs"), "--out", str(tmp_path / "f"))
    assert "1 listed path(s) lead outside" in folder.output  # the symlink inside the folder
    allowed = cli(
        *base, "--images", str(data / "list.csv"), "--allow-outside-root", "--out", str(tmp_path / "a")
    )
    assert allowed.exit_code == 0, allowed.output
    table = pd.read_parquet(tmp_path / "a" / files.IMAGE_TABLE)
    assert (table["status"] == "ok").sum() == 3  # passwd is read but is no image


def test_symlinked_class_folders_are_followed_or_refused_with_a_reason(tmp_path):
    """A class folder that is a symlink: inside the data root it is read; outside it, its images are
    refused and counted (--allow-outside-root reads them); a link back up the tree is not walked
    again. Before: such a folder vanished from the set, with no skip, reason or count."""
    data = tmp_path / "data"
    make_image_folder(data / "imgs", per_class=2)  # birds/, boats/
    (data / "store" / "cars").mkdir(parents=True)
    for i in range(2):
        rgb(40 + i).save(data / "store" / "cars" / f"{i}.png")
    (tmp_path / "far" / "trains").mkdir(parents=True)
    rgb(50).save(tmp_path / "far" / "trains" / "0.png")
    os.symlink(data / "store" / "cars", data / "imgs" / "cars")  # inside the data root (imgs' parent)
    os.symlink(tmp_path / "far" / "trains", data / "imgs" / "trains")  # outside it
    os.symlink(data / "imgs", data / "imgs" / "birds" / "loop")  # back up the tree
    base = ["embed", "images", "--workers", "0", "--cache-dir", str(tmp_path / "c")]
    done = cli(*base, "--images", str(data), "--out", str(tmp_path / "o"))
    assert done.exit_code == 0, done.output
    assert "1 listed path(s) lead outside the data root" in done.output
    table = pd.read_parquet(tmp_path / "o" / files.IMAGE_TABLE)
    listed = dict(zip(table["path"].map(lambda p: os.path.relpath(p, data)), table["status"], strict=True))
    assert listed == {
        "imgs/birds/0.jpg": "ok", "imgs/birds/1.png": "ok", "imgs/boats/0.jpg": "ok", "imgs/boats/1.png": "ok",
        "imgs/cars/0.png": "ok", "imgs/cars/1.png": "ok", "imgs/trains/0.png": "skipped",
        "store/cars/0.png": "ok", "store/cars/1.png": "ok",
    }  # fmt: skip
    allowed = cli(*base, "--images", str(data), "--allow-outside-root", "--out", str(tmp_path / "a"))
    assert (pd.read_parquet(tmp_path / "a" / files.IMAGE_TABLE)["status"] == "ok").all(), allowed.output


def test_an_image_beside_the_class_folders_keeps_the_others_labels(tmp_path):
    """ImageFolder's labels come from each image's first folder; one stray image at the top has
    none. Before: that image took every label away (and evaluate's ID accuracy with them)."""
    from negalign_cli.inputs.listing import list_images

    folder = make_image_folder(tmp_path / "imgs", per_class=1)
    rgb(30).save(folder / "thumb.png")
    listed = list_images(folder)
    labels = dict(zip((os.path.relpath(p, folder) for p in listed.paths), listed.labels, strict=True))
    assert labels == {"birds/0.jpg": "birds", "boats/0.jpg": "boats", "thumb.png": ""}
    flat = tmp_path / "flat"
    flat.mkdir()
    rgb(31).save(flat / "a.png")
    assert list_images(flat).labels == [""]


def test_waterbirds_blank_rows_keep_labels_as_written(tmp_path):
    root = tmp_path / "wb"
    (root / "a").mkdir(parents=True)
    rgb(1).save(root / "a" / "1.jpg")
    rgb(2).save(root / "a" / "2.jpg")
    (root / "metadata.csv").write_text(
        "img_id,img_filename,y,split,place\n1,a/1.jpg,0,2,0\n2,,,,\n3,a/2.jpg,1,2,1\n"
    )
    for split in ([], ["--split", "test"]):
        out = tmp_path / f"o{len(split)}"
        result = cli(
            "embed",
            "images",
            "--images",
            str(root / "metadata.csv"),
            *split,
            "--workers",
            "0",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(out),
        )
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(out / files.IMAGE_TABLE)
        assert table.loc[table["status"] == "ok", "label"].tolist() == ["0", "1"]
