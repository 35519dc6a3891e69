"""Decoding images: PIL's 8-bit RGB, the datasets that feed the encoders' DataLoaders and the
batched JPEG decoder. Listing images and their digests is ``inputs/listing.py``. torch is imported
where a tensor is made, not with the module: `report` reads images (``load_rgb``) without it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from negalign_cli.defaults import DEFAULT_MAX_PIXELS
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import NotRegularFile, open_regular
from negalign_cli.inputs.listing import VANISHED
from negalign_cli.inputs.tars import Member

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset
else:  # what DataLoader needs of a map-style dataset is __len__ and __getitem__, defined below
    Dataset = object

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey patch


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


class ImageDataset(Dataset):
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
        tensor, reason = pil_item(self.paths[index], self.transform, self.max_pixels)
        return index, tensor, reason


def pil_item(path: str | Member, transform, max_pixels: int = DEFAULT_MAX_PIXELS):
    """``(tensor, "")`` of one image decoded by PIL and preprocessed, or ``(None, reason)``."""
    try:
        return transform(load_rgb(path, max_pixels)), ""
    except FileNotFoundError:
        return None, VANISHED
    except NotRegularFile as exc:  # it was a file when it was hashed
        return None, str(exc)
    except UnidentifiedImageError:
        return None, "not an image PIL can decode"
    except TooLarge as exc:
        return None, str(exc)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, f"cannot decode: {str(exc).splitlines()[0][:120]}"


def collate(batch):
    indices = [i for i, tensor, _ in batch if tensor is not None]
    tensors = [tensor for _, tensor, _ in batch if tensor is not None]
    failures = [(i, reason) for i, tensor, reason in batch if tensor is None]
    import torch

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


# The value a resolved decoder gives the cache keys (PIL's path adds none). "torch/2": the reader
# pool's path (inputs/reader.py), whose files reach the batched decoder by their own header; the
# former "torch" path sent every file named .jpg to it and decoded a whole batch with PIL when one
# file failed, so its pixels differed for progressive, CMYK and grayscale JPEGs and their batch-mates.
DECODER_KEYS = {"torch": "torch/2"}


def decoder_key(decoder: str) -> str:
    return DECODER_KEYS.get(decoder, decoder)


# What the batched decoder is given: baseline JPEGs in YCbCr colour (PIL's mode "RGB"). Progressive,
# CMYK/YCCK, grayscale and other JPEGs are decoded by PIL in the reader, decided from the file's own
# header, so a file's pixels never depend on the device's decoder or on the other files of its batch.
BATCHED_MODES = frozenset({"RGB"})


def read_jpeg(path: str | Member, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, bytes | None, str]:
    """Read a file named as a JPEG for the batched decoder: ``("bytes", data, "")`` for a baseline
    colour JPEG, ``("pil", None, "")`` for a file PIL must decode (another kind of JPEG, another
    format under a JPEG name, a header PIL rejects: PIL then gives the reason), or
    ``("failed", None, reason)``. A header above ``max_pixels`` is refused before decoding."""
    try:
        if isinstance(path, Member):
            data = path.read()
        else:
            with open_regular(path) as handle:
                data = handle.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                (width, height), mode, kind = header.size, header.mode, header.format
                progressive = bool(header.info.get("progressive") or header.info.get("progression"))
        if width * height > max_pixels:
            return "failed", None, f"image too large: {width}×{height} pixels, above --max-pixels"
    except FileNotFoundError:
        return "failed", None, VANISHED
    except NotRegularFile as exc:
        return "failed", None, str(exc)
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError):
        return "pil", None, ""  # PIL gives the reason
    except OSError as exc:
        return "failed", None, f"cannot read: {exc.strerror or exc}"
    if kind != "JPEG" or mode not in BATCHED_MODES or progressive:
        return "pil", None, ""
    return "bytes", data, ""


def is_jpeg_name(path: str | Member) -> bool:
    suffix = path.suffix if isinstance(path, Member) else Path(path).suffix.lower()
    return suffix in JPEG_SUFFIXES


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
