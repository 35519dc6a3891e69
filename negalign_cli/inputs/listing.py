"""Image lists: folders, ImageFolder trees, CSV/TXT manifests, OpenOOD lists, Waterbirds metadata,
tar shards; and the digests of the images they name. No torch: planning a stage (its image list, its
digests, its cache key), `merge` and `launch` read this module; decoding is ``inputs/datasets.py``.

Every image is identified by the sha256 of its bytes, so a renamed or moved file is not encoded
again. Unreadable images are recorded with a reason, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from negalign_cli.errors import NegalignError
from negalign_cli.hashing import (
    NotRegularFile,
    file_kind,
    open_regular,
    printable_path,
    sha256_file_sized,
)
from negalign_cli.inputs.tars import Member, is_tar_spec, list_shards, member_digest

OUTSIDE_ROOT = "outside the data root"
PATH_COLUMNS = ("path", "image", "image_path", "filename", "img_filename", "filepath")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "valid": 1, "test": 2}


@dataclass(frozen=True)
class ImageList:
    source: str
    paths: list[str]  # absolute
    labels: list[str]
    extra: dict[str, list[str]]
    problems: dict[int, str] = field(default_factory=dict)  # index -> why it is skipped unread
    members: dict[int, Member] = field(default_factory=dict)  # index -> image inside a tar shard

    def __len__(self) -> int:
        return len(self.paths)

    def location(self, index: int) -> str | Member:
        """Where image ``index``'s bytes are: a file path, or a member of a tar shard."""
        return self.members.get(index, self.paths[index])

    @property
    def refused(self) -> int:
        return sum(reason.startswith(OUTSIDE_ROOT) for reason in self.problems.values())

    @property
    def name(self) -> str:
        """The set's short name, for progress bars and messages (:func:`set_name`)."""
        return set_name(self.source)


# list files whose name says nothing about the set: their folder names it
_GENERIC_LISTS = {"manifest", "metadata", "images", "image_list", "list", "files", "filelist", "index"}
_SPLIT_SUFFIX = re.compile(r" \(split (?P<split>[^)]*)\)$")


def set_name(source: str) -> str:
    """A short name of an image set from its ``--images`` source: a folder's name
    (``/data/iNaturalist`` -> ``iNaturalist``), a list's stem or, for a generic list name
    (``manifest.csv``, ``metadata.csv``), its folder's (``toy/ood_spurious/manifest.csv`` ->
    ``ood_spurious``); a Waterbirds split keeps its split (``waterbirds test``); tar shards are named
    by their folder (``/data/inat/{000..009}.tar`` -> ``inat``)."""
    text = str(source)
    split = _SPLIT_SUFFIX.search(text)
    if split is not None:
        text = text[: split.start()]
    if is_tar_spec(text):
        head = text.split("{", 1)[0]
        folder, stem = os.path.split(head)
        stem = stem.removesuffix(".tar").rstrip("-_.")
        name = Path(folder).name if folder and (not stem or "{" in text) else stem or text
    else:
        path = Path(text.rstrip("/\\") or text)
        name = path.name or str(path)
        if path.suffix and path.stem.lower() in _GENERIC_LISTS and path.parent.name:
            name = path.parent.name
        elif path.suffix.lower() in {".csv", ".txt", ".lst", ".tsv"}:
            name = path.stem
    return f"{name} {split.group('split')}" if split is not None else name


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(
    spec: str | Path,
    data_root: str | Path | None = None,
    split: str | None = None,
    *,
    allow_outside_root: bool = False,
    memory: Memory | None = None,
) -> ImageList:
    """Resolve ``--images``: a folder, a manifest (``.csv``/``.txt``/``.lst``) or a Waterbirds
    ``metadata.csv`` (with ``--split``). A path that leads outside the data root (the folder, the
    manifest's folder or ``--data-root``) — through ``..``, an absolute path or a symlink — is
    skipped with a reason unless ``allow_outside_root``. With ``memory`` (the stat cache), a
    folder's walk is remembered and reused while none of its folders changed."""
    if is_tar_spec(str(spec)):
        return _from_tars(str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise NegalignError(f"--images {path} does not exist")
    links: list[int] | None = None  # paths that may lead elsewhere (None: any of them)
    if path.is_dir():
        (images, links), root = _from_folder(path, memory), path
    elif not path.is_file():  # a FIFO would block the read forever, a device may never end
        kind = file_kind(path.stat().st_mode)
        raise NegalignError(f"--images {path} is a {kind}, not a file or folder: {IMAGES_TAKES}")
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raise NegalignError(_one_image(path))
    elif path.name == "metadata.csv" or split is not None:
        images, root = _from_waterbirds(path, data_root, split), _root(path, data_root)
    else:
        images, root = _from_manifest(path, data_root), _root(path, data_root)
    if not images.paths:
        raise NegalignError(f"--images {path} lists no images")
    if not allow_outside_root:
        _refuse_outside(images, root, links)
    return images


IMAGES_TAKES = (
    "--images takes a folder, an ImageFolder tree, a CSV/TXT manifest, a Waterbirds metadata.csv "
    "or tar shards ('data/{00000..00099}.tar')"
)


def _one_image(path: Path) -> str:
    return (
        f"--images {path} is one image: {IMAGES_TAKES}; for one image, try `negalign sanity --image {path}`"
    )


def _root(manifest: Path, data_root: str | Path | None) -> Path:
    return Path(data_root).expanduser() if data_root is not None else manifest.parent


def _refuse_outside(images: ImageList, root: Path, only: Iterable[int] | None = None) -> None:
    """Mark every path whose real location (symlinks resolved) is not under ``root`` (``only``:
    the indices that can lead elsewhere; by default all)."""
    base = os.path.realpath(root)
    folders: dict[str, str] = {}  # folder -> its real path: one resolution per folder, not per file
    for index in range(len(images.paths)) if only is None else only:
        if index in images.problems:
            continue
        path = images.paths[index]
        folder, name = os.path.split(path)
        real_folder = folders.get(folder)
        if real_folder is None:
            real_folder = folders[folder] = os.path.realpath(folder)
        real = os.path.join(real_folder, name)
        if name in ("", ".", "..") or os.path.islink(real):
            real = os.path.realpath(path)
        if os.path.commonpath([base, real]) != base:
            images.problems[index] = f"{OUTSIDE_ROOT} {printable_path(base)} (--allow-outside-root reads it)"


# A walk's result: (relative parts, is a symlink, "" or what the entry is when it is no regular file)
Found = list[tuple[tuple[str, ...], bool, str]]
# Each folder a walk read, before it read it: (relative parts, mtime_ns, ctime_ns, inode, device)
Folders = list[tuple[tuple[str, ...], int, int, int, int]]


def _walk(
    root: str,
    prefix: tuple[str, ...],
    found: Found,
    folders: Folders | None = None,
    real: str | None = None,
    linked: bool = False,
) -> None:
    """Image files under ``root`` as (relative parts, reached through a symlink, "" or what the
    entry is when it is no regular file: ``fifo``, ``socket``, a device). A symlinked folder is
    followed (once: a link back to a folder it is in is not), and what it holds is marked as
    reached through a symlink, so a target outside the root is skipped with its reason unless
    ``--allow-outside-root``, and the listing is not remembered (a target can change while its
    link does not). A FIFO or a device named like an image is listed (and skipped with its
    reason, never opened); a folder named like one is not. With ``folders``, each folder's stat is
    taken before it is read. ``real``: ``root``'s real path (resolved once, at the top)."""
    real = os.path.realpath(root) if real is None else real
    if folders is not None:
        st = os.stat(root)
        folders.append((prefix, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
    with os.scandir(root) as entries:
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir():
                    if not entry.is_symlink():
                        _walk(entry.path, (*prefix, name), found, folders, os.path.join(real, name), linked)
                        continue
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([target, real]) != target:  # not a folder the walk is in
                        _walk(entry.path, (*prefix, name), found, folders, target, True)
                    continue
                dot = name.rfind(".")
                # os.path.splitext's rule: the leading dots of a name start no extension
                if dot > 0 and name[dot:].lower() in IMAGE_SUFFIXES and name[:dot].strip("."):
                    link = linked or entry.is_symlink()
                    if entry.is_file():
                        found.append(((*prefix, name), link, ""))
                    elif not entry.is_dir():  # a FIFO, socket or device (a broken link raises)
                        found.append(((*prefix, name), link, file_kind(entry.stat().st_mode)))
            except (OSError, ValueError):  # ValueError: commonpath of paths on other drives
                continue


# The listing of a folder is remembered (``<cache>/stat.db``) with the stat of every folder its walk
# read, and reused while each of those folders still has the same mtime, ctime, inode and device: a
# file added, removed or renamed (in or out), a subfolder made or removed, changes its folder's
# mtime and ctime; a folder replaced, re-created or mounted over has another inode, device or ctime.
# What a file holds is not the listing's business: every file's own stat is checked by the stat
# cache. Guards: a walk during which a folder was modified less than RACY_SECONDS before it was read
# is not remembered (a change in the same timestamp tick would not move its mtime); nor is a folder
# holding a symlink named like an image, or a symlinked folder (a target can change while its
# folder does not).
_WALK_FORMAT = 2  # what a remembered walk holds; bump it when the walk's rules change (2: links
# followed, each image in a folder labelled by it)


def _walk_name(base: str) -> str:
    """The name a folder's listing is remembered by: the folder and what the walk looks for."""
    return f"walk {_WALK_FORMAT} {','.join(sorted(IMAGE_SUFFIXES))} {base}"


RACY_SECONDS = 2.0


class Memory(Protocol):
    """Where listings are remembered (:class:`negalign_cli.cache.statcache.StatCache`)."""

    def recall(self, name: str) -> bytes | None: ...

    def remember(self, name: str, data: bytes) -> None: ...


@dataclass
class _Listed:
    """A folder's listing: image paths relative to it (sorted by their parts), labels, and the
    entries that are no regular file (index -> what they are)."""

    names: list[str]
    labels: list[str]
    kinds: dict[int, str]
    links: list[int]


def _listed(found: Found) -> _Listed:
    found.sort(key=lambda item: item[0])
    return _Listed(
        [os.sep.join(parts) for parts, _, _ in found],
        # ImageFolder's rule: the first folder is the label (an image beside the class folders has
        # none; before, one such image took every image's label away)
        [parts[0] if len(parts) >= 2 else "" for parts, _, _ in found],
        {i: kind for i, (_, _, kind) in enumerate(found) if kind},
        [i for i, (_, link, _) in enumerate(found) if link],
    )


def _remembered(base: str, memory: Memory) -> _Listed | None:
    """The remembered listing of ``base`` if none of its folders changed since, else None."""
    data = memory.recall(_walk_name(base))
    if data is None:
        return None
    try:
        record = json.loads(data)
        for parts, *stat in record["folders"]:
            st = os.stat(os.path.join(base, *parts))
            if [st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev] != stat:
                return None
        count = int(record["count"])
        names = record["names"].split("\0") if count else []
        labels = record["labels"].split("\0") if count else []
        kinds = {int(i): str(kind) for i, kind in record["kinds"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(names) != count or len(labels) != count:
        return None
    return _Listed(names, labels, kinds, [])


def _remember(base: str, memory: Memory, listed: _Listed, folders: Folders, started: int) -> None:
    racy = started - int(RACY_SECONDS * 1e9)
    if listed.links or any(mtime >= racy or ctime >= racy for _, mtime, ctime, _, _ in folders):
        return
    record = {
        "count": len(listed.names),
        "names": "\0".join(listed.names),
        "labels": "\0".join(listed.labels),
        "kinds": sorted(listed.kinds.items()),
        "folders": [[list(parts), *stat] for parts, *stat in folders],
    }
    memory.remember(_walk_name(base), json.dumps(record).encode())


def _from_folder(root: Path, memory: Memory | None = None) -> tuple[ImageList, list[int]]:
    """The images under ``root``, sorted as paths (by their parts); and the indices of symlinks.
    With ``memory``, the listing is remembered there and reused while no folder in it changed."""
    base = str(root.resolve()).rstrip(os.sep)  # "" for the file system's root: the join adds it back
    top = base or os.sep
    listed = _remembered(top, memory) if memory is not None else None
    if listed is None:
        found: Found = []
        if memory is None:
            _walk(str(root), (), found)
            listed = _listed(found)
        else:
            started = time.time_ns()
            folders: Folders = []
            _walk(top, (), found, folders)
            listed = _listed(found)
            _remember(top, memory, listed, folders, started)
    prefix = base + os.sep
    # one join and one split rather than a string per path in Python
    paths = (prefix + ("\0" + prefix).join(listed.names)).split("\0") if listed.names else []
    problems = {i: str(NotRegularFile(paths[i], kind)) for i, kind in listed.kinds.items()}
    return ImageList(str(root), paths, listed.labels, {}, problems), listed.links


def _from_tars(spec: str) -> ImageList:
    """webdataset shards: one entry per image member, and one per shard or member that could not
    be read (with its reason, as for a broken file)."""
    shards = list_shards(spec, IMAGE_SUFFIXES)
    paths = [m.id for m in shards.members]
    members = dict(enumerate(shards.members))
    labels = list(shards.labels)
    captions = list(shards.captions)
    problems: dict[int, str] = {}
    for entry, reason in shards.problems:
        problems[len(paths)] = reason
        paths.append(entry)
        labels.append("")
        captions.append("")
    if not paths:
        raise NegalignError(f"--images {spec}: the tar shards hold no images")
    extra = {"caption": captions} if any(captions) else {}
    return ImageList(spec, paths, labels, extra, problems, members)


def _open_list(path: Path) -> io.BufferedReader:
    """A list file (a manifest, a metadata.csv), opened only if it is a regular file."""
    try:
        return open_regular(path)
    except NotRegularFile as exc:
        raise NegalignError(f"--images {path} is a {exc.kind}, not a file or folder: {IMAGES_TAKES}") from exc
    except OSError as exc:
        raise NegalignError(f"cannot read --images {path}: {exc.strerror or exc}") from exc


def _read_text(path: Path) -> str:
    with _open_list(path) as handle:
        data = handle.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if _is_picture(data):
            raise NegalignError(_one_image(path)) from exc
        raise NegalignError(f"manifest {path} is not UTF-8 text: {IMAGES_TAKES}") from exc


def _is_picture(data: bytes) -> bool:
    """Bytes PIL recognises as an image (by their header; nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _from_manifest(path: Path, data_root: str | Path | None) -> ImageList:
    """``path[,label]`` CSV (a header row naming ``path`` is skipped) or OpenOOD's
    ``relative/path label`` lines. Paths are relative to the manifest unless ``--data-root``."""
    root = Path(data_root).expanduser() if data_root is not None else path.parent
    paths: list[str] = []
    labels: list[str] = []
    lines = [
        line for line in _read_text(path).splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise NegalignError(f"manifest {path} is empty")
    comma = "," in lines[0]
    rows = (
        list(csv.reader(lines))
        if comma
        else [line.rsplit(None, 1) if " " in line.strip() else [line] for line in lines]
    )
    path_column, label_column = 0, 1
    if _is_header(rows[0]):
        header = [cell.strip().lower() for cell in rows[0]]
        named = [c for c in header if c in PATH_COLUMNS]
        if not named:
            raise NegalignError(
                f"manifest {path}: its header ({', '.join(header)}) has no path column; name it one of "
                f"{', '.join(PATH_COLUMNS)} (a label column is optional: label, class, y)"
            )
        path_column = header.index(named[0])
        label_column = next((header.index(c) for c in ("label", "class", "y") if c in header), -1)
        rows = rows[1:]
    problems: dict[int, str] = {}
    first: dict[str, int] = {}  # each path's first entry: a path listed again is skipped, not scored twice
    for number, row in enumerate(rows, start=1):
        name = row[path_column].strip() if len(row) > path_column else ""
        full = Path(name) if Path(name).is_absolute() else root / name
        if not name:
            problems[len(paths)] = f"manifest entry {number} has no path"
        elif (seen := first.setdefault(os.path.normpath(full), number)) != number:
            problems[len(paths)] = f"manifest entry {number} lists {name} again (entry {seen})"
        paths.append(str(full))
        labels.append(row[label_column].strip() if 0 <= label_column < len(row) else "")
    return ImageList(str(path), paths, labels, {}, problems)


_HEADER_CELL = re.compile(r"[A-Za-z_][A-Za-z0-9_ ]*")


def _is_header(row: list[str]) -> bool:
    """A first row of bare names (no extension, no folder) is a header, not a path."""
    return bool(row) and all(_HEADER_CELL.fullmatch(cell.strip()) for cell in row if cell.strip())


def _from_waterbirds(path: Path, data_root: str | Path | None, split: str | None) -> ImageList:
    import pandas as pd

    root = Path(data_root).expanduser() if data_root is not None else path.parent
    with _open_list(path) as handle:  # labels stay as written; blanks stay ""
        frame = pd.read_csv(handle, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = {"img_filename", "y"} - set(frame.columns)
    if missing:
        raise NegalignError(f"{path} lacks Waterbirds column(s) {', '.join(sorted(missing))}")
    if split is not None:
        if "split" not in frame.columns:
            raise NegalignError(f"{path} has no 'split' column for --split")
        wanted = WATERBIRDS_SPLITS.get(split.lower())
        if wanted is None:
            try:
                wanted = int(split)
            except ValueError as exc:
                raise NegalignError(f"--split {split!r}: use train, val, test or 0, 1, 2") from exc
        frame = frame[pd.to_numeric(frame["split"], errors="coerce") == wanted]
    extra = {"place": frame["place"].astype(str).tolist()} if "place" in frame.columns else {}
    names = [str(name).strip() for name in frame["img_filename"]]
    problems = {
        i: f"metadata row {row + 2} has an empty img_filename"
        for i, (row, name) in enumerate(zip(frame.index, names, strict=True))
        if not name
    }
    return ImageList(
        f"{path} (split {split})" if split is not None else str(path),
        [str(root / name) for name in names],
        frame["y"].str.strip().tolist(),
        extra,
        problems,
    )


def file_digest(path: str | Member) -> tuple[str | None, str]:
    """(sha256 of the file's bytes, "") or (None, reason)."""
    if isinstance(path, Member):
        return member_digest(path)
    try:
        digest, size = sha256_file_sized(path)
    except FileNotFoundError:
        return None, "file not found"
    except NotRegularFile as exc:  # a FIFO or a device: never opened
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if size == 0:
        return None, "empty file"
    return digest, ""


def digest_all(paths: Sequence[str | Member], workers: int = 8) -> list[tuple[str | None, str]]:
    """Digests of many files in parallel threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(file_digest, paths, chunksize=64))


# Why an image was skipped: a transient reason is retried by the next run; any other depends on the
# file's content (which its digest pins), so it is final for that content.
VANISHED = "file vanished before it was read"
# A file that was hashed and then became a FIFO or a device ("not a regular file") was replaced: retried.
TRANSIENT_PREFIXES = (VANISHED, "file not found", "cannot read", "not processed", "not a regular file")


def is_transient(reason: str) -> bool:
    return reason.startswith(TRANSIENT_PREFIXES)
