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

A shard that is missing, is not a tar, is not a regular file (a FIFO, a device: never opened) or
ends early is recorded as a skipped entry with its reason (an image whose bytes run past the end
of a truncated shard too); the rest is read. ``tarfile`` takes a shard cut at a 512-byte block
boundary (where a partial copy stops) for a complete one, so the end-of-archive marker (a zero
block) is checked: without it the shard's entry says "truncated after N members". A member name
that comes twice in one shard would give two rows with one id: the second is skipped as a
duplicate.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from negalign_cli.errors import NegalignError
from negalign_cli.hashing import NotRegularFile, file_kind, open_regular

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_SHARDS = 1_000_000
_BLOCK = tarfile.BLOCKSIZE


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
        with open_regular(self.tar) as handle:
            data = os.pread(handle.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.id}: the shard ends inside this member")
        return data


def is_tar_spec(spec: str) -> bool:
    """``--images`` names tar shards: it ends in ``.tar`` (after brace expansion)."""
    return spec.endswith(".tar") or (spec.endswith("}") and ".tar" in spec)


def _choices(body: str) -> tuple[int, Iterator[str]]:
    """How many choices a brace group's body gives, and the choices (made lazily)."""
    numbers = _RANGE.match(body)
    if numbers is None:
        choices = body.split(",")
        return len(choices), iter(choices)
    first, last = numbers.group(1), numbers.group(2)
    start, stop = int(first), int(last)
    width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
    step = 1 if stop >= start else -1
    return abs(stop - start) + 1, (str(n).zfill(width) for n in range(start, stop + step, step))


def expand_braces(spec: str) -> list[str]:
    """``a{1..3}b{x,y}`` -> a1bx a1by a2bx …; a zero-padded start pads every number to its width.
    Count the names first (:func:`count_braces`): a range may name millions."""
    match = _BRACES.search(spec)
    if match is None:
        return [spec]
    _, choices = _choices(match.group(1))
    head, tail = spec[: match.start()], spec[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(f"{head}{choice}{tail}")]


def count_braces(spec: str, cap: int = MAX_SHARDS) -> int:
    """How many names :func:`expand_braces` makes of ``spec``, without making them: exact up to
    ``cap``; above it, some number above ``cap``. A group inside no other multiplies the count
    (its choices hold no braces, so each leaves the same groups to expand); a group nested in
    another may change that one (``{{1,2}..5}``), so its choices are counted one by one."""
    match = _BRACES.search(spec)
    if match is None:
        return 1
    count, choices = _choices(match.group(1))
    head, tail = spec[: match.start()], spec[match.end() :]
    if "{" in head and "}" in tail:  # perhaps nested
        total = 0
        for choice in choices:
            total += count_braces(f"{head}{choice}{tail}", cap)
            if total > cap:
                break
        return total
    if count > cap:
        return count
    return count * count_braces(f"{head}{next(choices)}{tail}", cap)


@dataclass
class ShardListing:
    members: list[Member]
    labels: list[str]
    captions: list[str]
    problems: list[tuple[str, str]]  # (entry id, reason) of what could not be listed


def list_shards(spec: str, image_suffixes: set[str]) -> ShardListing:
    """Index every shard named by ``spec``; refused when none of them exists."""
    expanded = str(Path(spec).expanduser())
    count = count_braces(expanded, MAX_SHARDS)  # before expanding: a range may name billions
    if count > MAX_SHARDS:
        raise NegalignError(
            f"--images {spec} names more than {MAX_SHARDS:,} tar shards: too many; "
            "name fewer (a smaller brace range) or list the images in a manifest"
        )
    names = expand_braces(expanded)
    if not any(os.path.isfile(name) for name in names):
        shown = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
        special = next((name for name in names if os.path.exists(name)), None)
        if special is not None:  # a FIFO, a device, a folder named like a shard: never opened
            kind = file_kind(os.stat(special).st_mode)
            raise NegalignError(f"--images {spec}: no tar shard is a regular file ({special} is a {kind})")
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
        handle = open_regular(path)  # a FIFO or a device is never opened
    except FileNotFoundError:
        out.problems.append((path, "tar shard not found"))
        return
    except NotRegularFile as exc:
        out.problems.append((path, str(exc)))
        return
    except OSError as exc:
        out.problems.append((path, f"not a readable tar shard ({_first_line(exc)})"))
        return
    with handle:
        _index_open_shard(path, handle, image_suffixes, out)


def _index_open_shard(path: str, handle, image_suffixes: set[str], out: ShardListing) -> None:
    size = os.fstat(handle.fileno()).st_size
    try:
        archive = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as exc:
        out.problems.append((path, f"not a readable tar shard ({_first_line(exc)})"))
        return
    images: list[tarfile.TarInfo] = []
    duplicates: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    texts: dict[str, tarfile.TarInfo] = {}
    damage = ""
    count, last = 0, ""  # members read (of every type), the last one's name
    with archive:
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                if str(exc) == "unexpected end of data" and last:  # the bytes end inside ``last``
                    damage = f"truncated after {count - 1} members: the tar shard ends inside {last}"
                else:
                    damage = f"tar shard damaged after {count} members ({_first_line(exc)})"
                break
            if info is None:  # the end-of-archive marker, or the end of the bytes, or a bad header
                damage = _no_end_marker(handle, archive.offset, size, count)
                break
            count, last = count + 1, info.name
            if not info.isfile():
                continue
            stem, suffix = _split(info.name)
            if suffix in image_suffixes:
                if info.name in seen:  # the first of that name is read (its id is taken)
                    duplicates.append(info)
                    continue
                seen.add(info.name)
                images.append(info)
            elif suffix in (".txt", ".cls"):
                texts.setdefault(stem + suffix, info)
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
    for info in duplicates:
        out.problems.append(
            (f"{path}/{info.name}", "duplicate member name in the tar shard: the first one is read")
        )
    if damage:
        out.problems.append((path, damage))


def _no_end_marker(handle, offset: int, size: int, count: int) -> str:
    """ "" when the shard ends with its end-of-archive marker (a zero block where ``tarfile``
    stopped), else why it stopped there. ``tarfile`` reads a shard cut at a block boundary, a cut
    header and an invalid header alike as the end of the archive, dropping what follows unsaid."""
    block = os.pread(handle.fileno(), _BLOCK, offset) if offset < size else b""
    if block == bytes(_BLOCK):
        return ""
    if len(block) < _BLOCK:
        return (
            f"truncated after {count} members: the tar shard has no end-of-archive marker "
            "(a partial copy?); any members after them are lost"
        )
    return f"tar shard damaged after {count} members (an invalid header at byte {offset:,})"


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
                with open_regular(tar) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
                    info = next((m for m in archive if m.name == name), None)  # the first: the one listed
            except (tarfile.TarError, OSError):
                return path
            return path if info is None else Member(tar, name, info.offset_data, info.size)
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
