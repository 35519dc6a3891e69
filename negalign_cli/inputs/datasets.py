"""Image lists: folders, ImageFolder trees, CSV/TXT manifests, OpenOOD lists, Waterbirds metadata.

Every image is identified by the sha256 of its bytes, so a renamed or moved file is not encoded
again. Unreadable images are recorded with a reason, never fatal.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from negalign_cli.defaults import DEFAULT_MAX_PIXELS
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
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey patch


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


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(
    spec: str | Path,
    data_root: str | Path | None = None,
    split: str | None = None,
    *,
    allow_outside_root: bool = False,
) -> ImageList:
    """Resolve ``--images``: a folder, a manifest (``.csv``/``.txt``/``.lst``) or a Waterbirds
    ``metadata.csv`` (with ``--split``). A path that leads outside the data root (the folder, the
    manifest's folder or ``--data-root``) — through ``..``, an absolute path or a symlink — is
    skipped with a reason unless ``allow_outside_root``."""
    if is_tar_spec(str(spec)):
        return _from_tars(str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise NegalignError(f"--images {path} does not exist")
    links: list[int] | None = None  # paths that may lead elsewhere (None: any of them)
    if path.is_dir():
        (images, links), root = _from_folder(path), path
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


def _walk(root: str, prefix: tuple[str, ...], found: list[tuple[tuple[str, ...], bool, str]]) -> None:
    """Image files under ``root`` as (relative parts, is a symlink, "" or what the entry is when it
    is no regular file: ``fifo``, ``socket``, a device); like ``Path.rglob('*')``, the walk does not
    descend into symlinked folders. A FIFO or a device named like an image is listed (and skipped
    with its reason, never opened); a folder named like one is not."""
    with os.scandir(root) as entries:
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir() and not entry.is_symlink():
                    _walk(entry.path, (*prefix, name), found)
                    continue
                dot = name.rfind(".")
                # os.path.splitext's rule: the leading dots of a name start no extension
                if dot > 0 and name[dot:].lower() in IMAGE_SUFFIXES and name[:dot].strip("."):
                    if entry.is_file():
                        found.append(((*prefix, name), entry.is_symlink(), ""))
                    elif not entry.is_dir():  # a FIFO, socket or device (a broken link raises)
                        kind = file_kind(entry.stat().st_mode)
                        found.append(((*prefix, name), entry.is_symlink(), kind))
            except OSError:
                continue


def _from_folder(root: Path) -> tuple[ImageList, list[int]]:
    """The images under ``root``, sorted as paths (by their parts); and the indices of symlinks."""
    found: list[tuple[tuple[str, ...], bool, str]] = []
    _walk(str(root), (), found)
    found.sort(key=lambda item: item[0])
    image_folder = bool(found) and all(len(parts) >= 2 for parts, _, _ in found)
    labels = [parts[0] if image_folder else "" for parts, _, _ in found]
    base = str(root.resolve()).rstrip(os.sep)  # "" for the file system's root: the join adds it back
    paths = [os.sep.join((base, *parts)) for parts, _, _ in found]
    links = [i for i, (_, link, _) in enumerate(found) if link]
    problems = {i: str(NotRegularFile(paths[i], kind)) for i, (_, _, kind) in enumerate(found) if kind}
    return ImageList(str(root), paths, labels, {}, problems), links


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
    for number, row in enumerate(rows, start=1):
        name = row[path_column].strip() if len(row) > path_column else ""
        if not name:
            problems[len(paths)] = f"manifest entry {number} has no path"
        full = Path(name) if Path(name).is_absolute() else root / name
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


class TooLarge(ValueError):
    """An image whose header declares more pixels than the limit (a decompression bomb)."""


def load_rgb(path: str | Member, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB (:func:`to_rgb`). An image with more than ``max_pixels`` pixels
    raises :class:`TooLarge` before it is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
        source = io.BytesIO(path.read()) if isinstance(path, Member) else open_regular(path)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(source)
        except BaseException:
            source.close()
            raise
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    with source, image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise TooLarge(
                f"image too large: {width}×{height} = {width * height:,} pixels, "
                f"above --max-pixels {max_pixels:,}"
            )
        image.load()
        return to_rgb(image)


PIXEL_ARRAYS = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8 or uint16, or (H, W) of int32"


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """8-bit RGB, the one conversion of every image, whether read from a file, given as a PIL
    image or as a pixel array (:data:`PIXEL_ARRAYS`, as ``np.asarray(pil_image)`` gives): alpha
    dropped, grayscale expanded, 16-bit scaled to 8 bits (not clipped: 65535 is white, 32768 mid
    grey). Raises ValueError for an array of another shape or dtype."""
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(_to_8bit(array, peak)).convert("RGB")
    return image.convert("RGB")


def _to_8bit(array: np.ndarray, peak: float) -> np.ndarray:
    return np.clip(np.asarray(array, dtype=np.float64) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _from_array(array: np.ndarray) -> Image.Image:
    """A PIL image of pixels in PIL's own layout; 16-bit colour (which PIL cannot hold) is scaled to
    8 bits here, by :func:`to_rgb`'s rule."""
    shape = "×".join(map(str, array.shape))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if channels not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(f"a pixel array of shape {shape}: give {PIXEL_ARRAYS}")
    if array.dtype == np.uint16 and channels > 1:
        array = _to_8bit(array, 65535.0)
    elif not (array.dtype in (np.uint8, np.uint16) or (array.dtype == np.int32 and channels == 1)):
        raise ValueError(f"a pixel array of dtype {array.dtype}: give {PIXEL_ARRAYS}")
    return Image.fromarray(np.ascontiguousarray(array))


# Why an image was skipped: a transient reason is retried by the next run; any other depends on the
# file's content (which its digest pins), so it is final for that content.
VANISHED = "file vanished before it was read"
# A file that was hashed and then became a FIFO or a device ("not a regular file") was replaced: retried.
TRANSIENT_PREFIXES = (VANISHED, "file not found", "cannot read", "not processed", "not a regular file")


def is_transient(reason: str) -> bool:
    return reason.startswith(TRANSIENT_PREFIXES)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses the images at the given paths; failures come back as reasons.
    Images above ``max_pixels`` (PIL's decompression-bomb guard) are skipped, never decoded."""

    def __init__(
        self, paths: Sequence[str | Member], transform, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.paths = paths
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            tensor = self.transform(load_rgb(path, self.max_pixels))
        except FileNotFoundError:
            return index, None, VANISHED
        except NotRegularFile as exc:  # it was a file when it was hashed
            return index, None, str(exc)
        except UnidentifiedImageError:
            return index, None, "not an image PIL can decode"
        except TooLarge as exc:
            return index, None, str(exc)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return index, None, f"cannot decode: {str(exc).splitlines()[0][:120]}"
        return index, tensor, ""


def collate(batch):
    indices = [i for i, tensor, _ in batch if tensor is not None]
    tensors = [tensor for _, tensor, _ in batch if tensor is not None]
    failures = [(i, reason) for i, tensor, reason in batch if tensor is None]
    stacked = torch.stack(tensors) if tensors else None
    return indices, stacked, failures


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------- batched JPEG decoding
JPEG_SUFFIXES = {".jpg", ".jpeg"}
DECODERS = ("auto", "pil", "torch")


def resolve_decoder(decoder: str, device: torch.device) -> str:
    """``auto``: torchvision's batched JPEG decoder on CUDA (nvJPEG), PIL otherwise."""
    if decoder not in DECODERS:
        raise NegalignError(f"unknown --decode {decoder!r}: use auto, pil or torch")
    if decoder == "auto":
        return "torch" if device.type == "cuda" else "pil"
    return decoder


class RawDataset(torch.utils.data.Dataset):
    """File bytes for the batched decoder (JPEGs); other files are decoded here with PIL. A JPEG's
    header is read first, so one above ``max_pixels`` is skipped, never decoded."""

    def __init__(
        self, paths: Sequence[str | Member], transform, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.paths = paths
        self.pil = ImageDataset(paths, transform, max_pixels)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        suffix = path.suffix if isinstance(path, Member) else Path(path).suffix.lower()
        if suffix not in JPEG_SUFFIXES:
            return self.pil[index] + ("decoded",)
        try:
            if isinstance(path, Member):
                data = path.read()
            else:
                with open_regular(path) as handle:
                    data = handle.read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as header:
                    width, height = header.size
            if width * height > self.max_pixels:
                return index, None, f"image too large: {width}×{height} pixels, above --max-pixels", "raw"
        except FileNotFoundError:
            return index, None, VANISHED, "raw"
        except NotRegularFile as exc:
            return index, None, str(exc), "raw"
        except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError):
            return self.pil[index] + ("decoded",)  # PIL gives the reason
        except OSError as exc:
            return index, None, f"cannot read: {exc.strerror or exc}", "raw"
        return index, torch.frombuffer(bytearray(data), dtype=torch.uint8), "", "raw"


def collate_raw(batch):
    return batch


def jpeg_decoder():
    """Batched JPEG decoding (nvJPEG on CUDA): TorchCodec's ``decode_jpeg`` where it is installed
    (torchvision's image decoding is deprecated since 0.29; TorchCodec 0.17 works with torch
    2.14.1), else torchvision's. Returns ``decode(list_of_byte_tensors, device) -> list``."""
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode

        def decode(data, device):
            return codec_decode(list(data), mode="RGB", device=device)

    except (ImportError, OSError, RuntimeError):  # absent, or built for another torch
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as vision_decode

        def decode(data, device):
            return vision_decode(list(data), mode=ImageReadMode.RGB, device=device)

    return decode


def decode_batch(
    items, preprocess_cfg: dict, device: torch.device, fallback
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Decode the JPEG bytes of a batch in one call on ``device`` and apply open_clip's evaluation
    preprocessing there (bicubic resize of the shorter side with antialiasing, centre crop,
    normalisation). A JPEG the batched decoder rejects is retried with PIL (``fallback(index)``)."""
    from torchvision.transforms.v2 import functional as TF

    size = preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = torch.tensor(preprocess_cfg["mean"], device=device).view(3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=device).view(3, 1, 1)
    indices, tensors, failures = [], [], []
    raw = [(i, data) for i, data, reason, kind in items if kind == "raw" and data is not None]
    for i, data, reason, kind in items:
        if data is None:
            failures.append((i, reason))
        elif kind == "decoded":
            indices.append(i)
            tensors.append(data.to(device))
    decoded: list = []
    if raw:
        try:
            decoded = jpeg_decoder()([d for _, d in raw], device)
        except RuntimeError:
            decoded = [None] * len(raw)
    for (i, _), image in zip(raw, decoded, strict=True):
        if image is None:
            index, tensor, reason = fallback(i)
            if tensor is None:
                failures.append((i, reason))
                continue
            indices.append(i)
            tensors.append(tensor.to(device))
            continue
        h, w = image.shape[-2:]
        scale = max(size[0] / h, size[1] / w)
        resized = TF.resize(
            image,
            [max(size[0], round(h * scale)), max(size[1], round(w * scale))],
            interpolation=TF.InterpolationMode.BICUBIC,
            antialias=True,
        )
        cropped = TF.center_crop(resized, list(size))
        indices.append(i)
        tensors.append((cropped.float() / 255.0 - mean) / std)
    return indices, (torch.stack(tensors) if tensors else None), failures
