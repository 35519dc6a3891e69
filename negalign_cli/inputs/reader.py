"""The ``--decode torch`` path (``auto`` on CUDA): a persistent pool of reader processes, batched
JPEG decoding and resizing on the model's device, two batches in flight.

- **Readers** (:class:`ReaderPool`): one DataLoader whose workers persist for the process and take
  *jobs* (a batch's file locations) from a sampler swapped per image list, so an image set after
  the first starts no processes. A worker reads a whole batch (:func:`read_batch`) and sends ONE
  uint8 tensor holding every JPEG's bytes end to end, ONE tensor of the pixels PIL decoded there
  (files that are not baseline colour JPEGs, :func:`negalign_cli.inputs.datasets.read_jpeg`) and
  the failures as reasons: two shared tensors a batch instead of one per file.
- **Staging** (:class:`Staging`): the bytes are copied into one of three host buffers, pinned on
  CUDA, reused in turn; a buffer is refilled only after the device work that read it finished.
- **Decoding** (:func:`decode_read_batch`): the batch's JPEGs in one call of the batched decoder
  (TorchCodec where installed, else torchvision; nvJPEG on CUDA); a batch the decoder rejects is
  decoded file by file, and a file it rejects alone is decoded by PIL, so a file's pixels never
  depend on its batch-mates. Decoded images of one size are resized together (one bicubic
  interpolate per distinct size, not one per image), centre-cropped and normalised, the same
  operations as the per-image resize before (bit-identical pixels; ``tests/test_reader_pool.py``).
- **Two batches in flight** (:func:`decoded_batches`, :class:`Streams`): batch k + 1's host-to-device
  copy and decoding are queued on a side stream before batch k is handed to the model, and the
  model's stream waits for batch k's event only (never the host). On the CPU
  (:class:`HostStreams`) the work runs at once: the same code, nothing to overlap.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from negalign_cli.defaults import DEFAULT_MAX_PIXELS
from negalign_cli.inputs.datasets import is_jpeg_name, jpeg_decoder, pil_item, read_jpeg

if TYPE_CHECKING:
    import torch

Job = tuple[int, tuple[Any, ...]]  # (the index of the batch's first file, the files' locations)
Batch = tuple[list[int], "torch.Tensor | None", list[tuple[int, str]]]  # indices, pixels, failures


@dataclass
class ReadBatch:
    """What a reader sends for one batch of files."""

    data: torch.Tensor  # uint8: the bytes of every JPEG for the batched decoder, end to end
    ends: list[int]  # where each of those JPEGs ends in ``data``
    jpegs: list[int]  # their indices
    pixels: torch.Tensor | None  # (n, 3, H, W) float32: the files PIL decoded in the reader
    decoded: list[int]  # their indices
    failures: list[tuple[int, str]]
    reader: int = 0  # the process that read it


def read_batch(job: Job, transform, max_pixels: int = DEFAULT_MAX_PIXELS) -> ReadBatch:
    """Read one batch of files (:class:`ReadBatch`); a file that cannot be read is a reason."""
    import torch

    first, locations = job
    chunks: list[bytes] = []
    jpegs: list[int] = []
    tensors: list[torch.Tensor] = []
    decoded: list[int] = []
    failures: list[tuple[int, str]] = []
    for index, location in enumerate(locations, start=first):
        kind, data, reason = read_jpeg(location, max_pixels) if is_jpeg_name(location) else ("pil", None, "")
        if kind == "bytes" and data is not None:
            chunks.append(data)
            jpegs.append(index)
            continue
        if kind == "pil":
            tensor, reason = pil_item(location, transform, max_pixels)
            if tensor is not None:
                tensors.append(tensor)
                decoded.append(index)
                continue
        failures.append((index, reason))
    ends = np.cumsum([len(chunk) for chunk in chunks], dtype=np.int64)
    joined = torch.empty(int(ends[-1]) if len(ends) else 0, dtype=torch.uint8)
    view, start = joined.numpy(), 0
    for chunk, end in zip(chunks, ends.tolist(), strict=True):  # one copy of each file's bytes
        view[start:end] = np.frombuffer(chunk, dtype=np.uint8)
        start = end
    pixels = torch.stack(tensors) if tensors else None
    return ReadBatch(joined, ends.tolist(), jpegs, pixels, decoded, failures, os.getpid())


class _Reader:
    """The workers' dataset: an index is a job, so the same workers serve any list of files."""

    def __init__(self, transform, max_pixels: int) -> None:
        self.transform = transform
        self.max_pixels = max_pixels

    def __getitem__(self, job: Job) -> ReadBatch:
        return read_batch(job, self.transform, self.max_pixels)


class _Jobs:
    """The sampler: the jobs of the list being read (swapped by :meth:`ReaderPool.read`)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


def _same(batch: ReadBatch) -> ReadBatch:
    return batch


class ReaderPool:
    """Reader processes that outlive an image list: a DataLoader with persistent workers over
    :class:`_Reader`, given each list's jobs through its sampler. ``workers=0`` reads in this
    process."""

    def __init__(self, transform, max_pixels: int, workers: int, timeout: float) -> None:
        import torch

        self.workers = workers
        self.busy = False
        self._jobs = _Jobs()
        self.loader: torch.utils.data.DataLoader[ReadBatch] = torch.utils.data.DataLoader(
            _Reader(transform, max_pixels),  # type: ignore[arg-type]  # a map-style dataset of jobs
            batch_size=None,
            sampler=self._jobs,
            num_workers=workers,
            collate_fn=_same,  # type: ignore[arg-type]  # batch_size=None: each item is a whole batch
            persistent_workers=workers > 0,
            timeout=timeout if workers else 0,
        )

    def read(self, locations: Sequence[Any], batch_size: int) -> Iterator[ReadBatch]:
        """The batches of ``locations``, in order (indices into ``locations``)."""
        if self.busy:
            raise RuntimeError("this reader pool is reading another list")
        starts = range(0, len(locations), batch_size)
        self._jobs.jobs = [(start, tuple(locations[start : start + batch_size])) for start in starts]
        self.busy = True
        try:
            yield from self.loader
        finally:
            self.busy = False
            self._jobs.jobs = []

    def pids(self) -> list[int]:
        """The worker processes' ids (none before the first read, or with no workers)."""
        running = self.loader._iterator
        return [w.pid for w in running._workers] if running is not None and self.workers else []  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop the workers now (persistent workers otherwise stop with the DataLoader)."""
        running = self.loader._iterator
        if running is not None and self.workers:
            running._shutdown_workers()  # type: ignore[attr-defined]
        self.loader._iterator = None


_POOL: tuple[tuple[Any, ...], ReaderPool] | None = None


def reader_pool(transform, max_pixels: int, workers: int, timeout: float) -> ReaderPool:
    """The process's reader pool, started once and kept for later lists while the transform, limit,
    worker count and temporary folder (where the workers' sockets live: ``settings.loader_sharing``)
    stay the same; a pool already reading (a list read inside another) gets a fresh one."""
    global _POOL
    from negalign_cli.settings import loader_sharing

    loader_sharing(workers)  # before any worker starts: it may move TMPDIR
    key = (repr(transform), max_pixels, workers, timeout, tempfile.gettempdir())
    if _POOL is not None and not _POOL[1].busy:
        if _POOL[0] == key:
            return _POOL[1]
        _POOL[1].close()
        _POOL = None
    pool = ReaderPool(transform, max_pixels, workers, timeout)
    if _POOL is None:
        _POOL = (key, pool)
    return pool


def close_reader_pool() -> None:
    global _POOL
    if _POOL is not None and not _POOL[1].busy:
        _POOL[1].close()
        _POOL = None


# ----------------------------------------------------------------------------- streams
class Streams(Protocol):
    """Where a batch's device work runs. ``start(work)`` queues ``work()``'s device operations on a
    side stream and returns a handle; ``ready(handle)`` makes the model's stream wait for them
    (not the host) and gives ``work``'s result; ``wait_host(handle)`` makes the host wait for them
    (before the host buffer they read is reused)."""

    def start(self, work: Callable[[], Batch]) -> Any: ...

    def ready(self, flight: Any) -> Batch: ...

    def wait_host(self, flight: Any) -> None: ...


class HostStreams:
    """The CPU: work runs when it is started; there is nothing to wait for."""

    def start(self, work: Callable[[], Batch]) -> Any:
        return work()

    def ready(self, flight: Any) -> Batch:
        return flight

    def wait_host(self, flight: Any) -> None:
        return None


class CudaStreams:
    """One side stream for decoding; an event per batch. Tensors made on the side stream are
    recorded as used by the model's stream, so their memory is not reused while it reads them."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self.side = torch.cuda.Stream(device)
        self.side.wait_stream(torch.cuda.current_stream(device))  # constants made before this

    def start(self, work: Callable[[], Batch]) -> Any:
        import torch

        with torch.cuda.stream(self.side):
            result = work()
            event = torch.cuda.Event()
            event.record(self.side)
        return result, event

    def ready(self, flight: Any) -> Batch:
        import torch

        result, event = flight
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)
        if result[1] is not None:
            result[1].record_stream(main)
        return result

    def wait_host(self, flight: Any) -> None:
        flight[1].synchronize()


def streams_for(device: torch.device) -> Streams:
    return CudaStreams(device) if device.type == "cuda" else HostStreams()


class Staging:
    """Host buffers the readers' bytes are copied into (pinned for CUDA), used in turn. A buffer is
    refilled (or replaced by a larger one) only after ``Streams.wait_host`` of the batch that last
    read it: with ``slots`` ≥ 2 that batch is long finished, so the wait costs nothing."""

    def __init__(self, pin: bool, slots: int = 3) -> None:
        self.pin = pin
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.readers: list[Any] = [None] * slots
        self.turn = 0

    def fill(self, data: torch.Tensor, streams: Streams) -> tuple[int, torch.Tensor]:
        import torch

        slot = self.turn
        self.turn = (slot + 1) % len(self.buffers)
        if self.readers[slot] is not None:
            streams.wait_host(self.readers[slot])
            self.readers[slot] = None
        buffer, n = self.buffers[slot], data.numel()
        if buffer is None or buffer.numel() < n:
            size = max(1 << 20, (n + n // 4 + (1 << 20) - 1) >> 20 << 20)  # a quarter more, whole MiB
            buffer = self.buffers[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        buffer[:n].copy_(data)
        return slot, buffer[:n]

    def read_by(self, slot: int, flight: Any) -> None:
        self.readers[slot] = flight


# ----------------------------------------------------------------------------- decoding
class Preprocess:
    """open_clip's evaluation preprocessing of decoded uint8 images on their device: bicubic resize
    of the shorter side with antialiasing, centre crop, normalisation."""

    def __init__(self, preprocess_cfg: dict, device: torch.device) -> None:
        import torch

        size = preprocess_cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.device = device
        self.mean = torch.tensor(preprocess_cfg["mean"], device=device).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"], device=device).view(3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: (n, 3, h, w) or (3, h, w) uint8, all of one size."""
        from torchvision.transforms.v2 import functional as TF

        h, w = images.shape[-2:]
        size = self.size
        scale = max(size[0] / h, size[1] / w)
        resized = TF.resize(
            images,
            [max(size[0], round(h * scale)), max(size[1], round(w * scale))],
            interpolation=TF.InterpolationMode.BICUBIC,
            antialias=True,
        )
        cropped = TF.center_crop(resized, list(size))
        return (cropped.float() / 255.0 - self.mean) / self.std


def decode_each(decode: Callable, data: list, device: torch.device) -> list:
    """The batched decoder over ``data``; when it rejects the batch, file by file (``None`` for a
    file it rejects), so one bad file changes no other file's pixels."""
    try:
        return list(decode(data, device))
    except (RuntimeError, ValueError):
        pass
    images: list = []
    for one in data:
        try:
            images.append(decode([one], device)[0])
        except (RuntimeError, ValueError):
            images.append(None)
    return images


def decode_read_batch(
    batch: ReadBatch,
    staged: torch.Tensor,
    decode: Callable,
    preprocess: Preprocess,
    fallback: Callable[[int], tuple[torch.Tensor | None, str]],
) -> Batch:
    """A batch's model input on the device, rows in index order: the JPEGs decoded in one call and
    resized one size at a time, PIL's pixels from the readers (and ``fallback(index)``'s, for a
    JPEG the batched decoder rejects) copied in."""
    import torch

    device = preprocess.device
    failures = list(batch.failures)
    views = list(torch.tensor_split(staged, batch.ends[:-1])) if batch.jpegs else []
    images = decode_each(decode, views, device) if views else []
    rejected = [i for i, image in zip(batch.jpegs, images, strict=True) if image is None]
    extra = [(i, *fallback(i)) for i in rejected]  # PIL, in this process: rare files only
    failures += [(i, reason) for i, tensor, reason in extra if tensor is None]
    extra_ok = [(i, tensor) for i, tensor, _ in extra if tensor is not None]
    good = [(i, image) for i, image in zip(batch.jpegs, images, strict=True) if image is not None]
    ok = [i for i, _ in good] + batch.decoded + [i for i, _ in extra_ok]
    indices = np.sort(np.array(ok, dtype=np.int64))
    failures.sort()
    if not len(indices):
        return [], None, failures
    out = torch.empty((len(indices), 3, *preprocess.size), dtype=torch.float32, device=device)

    def put(at: list[int], rows: torch.Tensor) -> None:
        where = torch.as_tensor(np.searchsorted(indices, at), device=device)
        out.index_copy_(0, where, rows.to(device))

    groups: dict[tuple[int, int], list[int]] = {}
    for j, (_, image) in enumerate(good):  # by size: one batched resize per distinct size
        groups.setdefault(tuple(image.shape[-2:]), []).append(j)
    for members in groups.values():
        stacked = torch.stack([good[j][1] for j in members])
        put([good[j][0] for j in members], preprocess(stacked))
    if batch.pixels is not None:
        put(batch.decoded, batch.pixels)
    if extra_ok:
        put([i for i, _ in extra_ok], torch.stack([t for _, t in extra_ok]))
    return indices.tolist(), out, failures


def decoded_batches(
    locations: Sequence[Any],
    preprocess_cfg: dict,
    transform,
    device: torch.device,
    *,
    batch_size: int,
    workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = 600.0,
    streams: Streams | None = None,
    decode: Callable | None = None,
    in_flight: int = 2,
) -> Iterator[Batch]:
    """``(indices, pixels, failures)`` per batch of ``locations``: the model's input on ``device``,
    ready on the current stream. Batch k + 1 is read, staged and its decoding queued before batch k
    is handed over (``in_flight`` batches at once)."""
    pool = reader_pool(transform, max_pixels, workers, timeout)
    preprocess = Preprocess(preprocess_cfg, device)
    streams = streams_for(device) if streams is None else streams
    staging = Staging(pin=device.type == "cuda")
    decode = jpeg_decoder() if decode is None else decode

    def fallback(index: int) -> tuple[torch.Tensor | None, str]:
        return pil_item(locations[index], transform, max_pixels)

    flights: deque[Any] = deque()
    for batch in pool.read(locations, batch_size):
        slot, staged = staging.fill(batch.data, streams)
        del batch.data  # the reader's shared buffer goes now, not with the batch

        def work(batch: ReadBatch = batch, staged: torch.Tensor = staged) -> Batch:
            return decode_read_batch(batch, staged, decode, preprocess, fallback)

        flight = streams.start(work)
        staging.read_by(slot, flight)
        flights.append(flight)
        if len(flights) >= in_flight:
            yield streams.ready(flights.popleft())
    while flights:
        yield streams.ready(flights.popleft())
