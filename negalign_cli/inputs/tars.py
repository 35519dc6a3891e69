"""webdataset tar shards as an image list (the format img2dataset and clip-retrieval write).

``--images 'data/{00000..00099}.tar'`` names the shards (brace ranges and lists are expanded, as
webdataset and the shell do). In each shard the members ``KEY.jpg`` (or any image suffix) are the
images; ``KEY.txt`` becomes the ``caption`` column, ``KEY.cls`` the label; other members are
ignored. An image's id is ``<shard path>/<member name>``; its cache key is the sha256 of its bytes,
exactly as for a file, so the same picture as a file and inside a shard is encoded once.

The standard ``tarfile`` module indexes each shard once (member name, data offset, size); images
are then read by offset, so only the images the cache lacks are read again, in any order, from
DataLoader workers. (The ``webdataset`` package streams shards in order, which suits training
but not a content-addressed cache that needs random access to a few members and a reason for
each broken one.) Compressed shards (``.tar.gz``) have no offsets to read by and are refused.

A shard that is missing, is not a tar, or ends early is recorded as a skipped entry with its
reason (an image whose bytes run past the end of a truncated shard too); the rest is read.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from negalign_cli.errors import NegalignError

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class Member:
    """An image inside a tar shard: where its bytes are."""

    tar: str
    name: str
    offset: int
    size: int

    @property
    def id(self) -> str:
        return f"{self.tar}/{self.name}"

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1].lower()

    def read(self) -> bytes:
        with open(self.tar, "rb") as handle:
            data = os.pread(handle.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.id}: the shard ends inside this member")
        return data


def is_tar_spec(spec: str) -> bool:
    """``--images`` names tar shards: it ends in ``.tar`` (after brace expansion)."""
    return spec.endswith(".tar") or (spec.endswith("}") and ".tar" in spec)


def expand_braces(spec: str) -> list[str]:
    """``a{1..3}b{x,y}`` -> a1bx a1by a2bx …; a zero-padded start pads every number to its width."""
    match = _BRACES.search(spec)
    if match is None:
        return [spec]
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        first, last = numbers.group(1), numbers.group(2)
        start, stop = int(first), int(last)
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        step = 1 if stop >= start else -1
        choices = [str(n).zfill(width) for n in range(start, stop + step, step)]
    else:
        choices = body.split(",")
    head, tail = spec[: match.start()], spec[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(f"{head}{choice}{tail}")]


@dataclass
class ShardListing:
    members: list[Member]
    labels: list[str]
    captions: list[str]
    problems: list[tuple[str, str]]  # (entry id, reason) of what could not be listed


def list_shards(spec: str, image_suffixes: set[str]) -> ShardListing:
    """Index every shard named by ``spec``; refused when none of them exists."""
    names = expand_braces(str(Path(spec).expanduser()))
    if len(names) > 1_000_000:
        raise NegalignError(f"--images {spec} expands to {len(names):,} shards: too many")
    if not any(os.path.isfile(name) for name in names):
        shown = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
        raise NegalignError(f"--images {spec}: no tar shard exists ({shown})")
    listing = ShardListing([], [], [], [])
    for name in names:
        _index_shard(os.path.abspath(name), image_suffixes, listing)
    return listing


def _index_shard(path: str, image_suffixes: set[str], out: ShardListing) -> None:
    if path.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        out.problems.append((path, "compressed tar shard: only plain .tar can be read by offset"))
        return
    try:
        size = os.path.getsize(path)
        archive = tarfile.open(path, "r:")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        out.problems.append((path, "tar shard not found"))
        return
    except (tarfile.TarError, OSError) as exc:
        out.problems.append((path, f"not a readable tar shard ({_first_line(exc)})"))
        return
    images: list[tarfile.TarInfo] = []
    texts: dict[str, tarfile.TarInfo] = {}
    damage = ""
    with archive:
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                damage = f"tar shard damaged after {len(images)} image(s) ({_first_line(exc)})"
                break
            if info is None:
                break
            if not info.isfile():
                continue
            stem, suffix = _split(info.name)
            if suffix in image_suffixes:
                images.append(info)
            elif suffix in (".txt", ".cls"):
                texts[stem + suffix] = info
    with open(path, "rb") as handle:
        for info in images:
            member = Member(path, info.name, info.offset_data, info.size)
            if info.offset_data + info.size > size:
                out.problems.append((member.id, "truncated: the tar shard ends inside this image"))
                damage = ""  # said by this entry
                continue
            stem, _ = _split(info.name)
            out.members.append(member)
            out.labels.append(_small_text(handle, texts.get(stem + ".cls"), size))
            out.captions.append(_small_text(handle, texts.get(stem + ".txt"), size))
    if damage:
        out.problems.append((path, damage))


def _split(name: str) -> tuple[str, str]:
    """(the member name without its last extension, that extension in lower case): ``KEY.jpg``
    pairs with ``KEY.txt`` and ``KEY.cls``, whatever dots ``KEY`` holds."""
    stem, suffix = os.path.splitext(name)
    return stem, suffix.lower()


def _small_text(handle, info: tarfile.TarInfo | None, size: int, limit: int = 1 << 16) -> str:
    if info is None or info.offset_data + info.size > size:
        return ""
    data = os.pread(handle.fileno(), min(info.size, limit), info.offset_data)
    return data.decode("utf-8", "replace").strip()


def locate(path: str) -> str | Member:
    """A path as written in ``images.parquet``: a file, or ``<shard>.tar/<member>`` (read from the
    shard, for drawing CAM overlays after the fact)."""
    if os.path.exists(path):
        return path
    start = 0
    while (cut := path.find(".tar/", start)) >= 0:
        tar, name = path[: cut + 4], path[cut + 5 :]
        start = cut + 1
        if os.path.isfile(tar):
            try:
                with tarfile.open(tar, "r:") as archive:
                    info = archive.getmember(name)
            except (KeyError, tarfile.TarError, OSError):
                return path
            return Member(tar, name, info.offset_data, info.size)
    return path


def member_digest(member: Member) -> tuple[str | None, str]:
    """(sha256 of the member's bytes, "") or (None, reason), as for a file."""
    try:
        data = member.read()
    except FileNotFoundError:
        return None, "file not found"
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if not data:
        return None, "empty file"
    return hashlib.sha256(data).hexdigest(), ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
