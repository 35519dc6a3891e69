"""The reader pool of ``--decode torch`` (``inputs/reader.py``; ``auto`` on CUDA), on the CPU.

No GPU here: torchvision's CPU ``decode_jpeg`` stands in for nvJPEG (same call, ``device="cpu"``),
:class:`HostStreams` is the CPU's stream, and a deferred stream (``Deferred`` below: started work
runs only when something waits for it, the laziest a CUDA stream may be) checks the overlap logic
and the reuse of the staging buffers. ``CudaStreams`` itself runs only on a GPU
(``benchmarks/gpu_check.sh`` section 4b)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from negalign_cli.cache.workspace import Workspace
from negalign_cli.defaults import DEFAULT_MAX_PIXELS
from negalign_cli.inputs import reader
from negalign_cli.inputs.datasets import jpeg_decoder, load_rgb
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.reader import HostStreams, Preprocess, Staging, decoded_batches, reader_pool
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages.images import WORKER_TIMEOUT, digest_images, embed_images, embed_images_spec
from tests.faults.helpers import cli

CPU = torch.device("cpu")


def _picture(seed: int, width: int, height: int) -> Image.Image:
    """Smooth colour with some texture: compresses like a photo, decodes differently per decoder."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + noise, 0, 255).astype(np.uint8))


def make_odd_folder(root: Path) -> dict[str, Path]:
    """Real files of every kind the reader routes: baseline JPEGs of three sizes (two share one),
    progressive, CMYK and grayscale JPEGs, a truncated JPEG, a PNG and a PNG named .jpg."""
    root.mkdir(parents=True)
    files = {name: root / name for name in (
        "a.jpg", "b.jpg", "c.jpeg", "d.jpg", "progressive.jpg", "cmyk.jpg", "gray.jpg",
        "truncated.jpg", "e.png", "png-named.jpg",
    )}  # fmt: skip
    _picture(1, 48, 40).save(files["a.jpg"], quality=90)
    _picture(2, 48, 40).save(files["b.jpg"], quality=90)  # a's size: resized in one call with it
    _picture(3, 40, 56).save(files["c.jpeg"], quality=85)
    _picture(4, 70, 33).save(files["d.jpg"], quality=95)
    _picture(5, 48, 40).save(files["progressive.jpg"], quality=90, progressive=True)
    _picture(6, 44, 44).convert("CMYK").save(files["cmyk.jpg"], quality=90)
    _picture(7, 50, 36).convert("L").save(files["gray.jpg"], quality=90)
    whole = (root / "whole.bin").parent / "x.jpg"
    _picture(8, 48, 40).save(whole, quality=90)
    data = whole.read_bytes()
    whole.unlink()
    files["truncated.jpg"].write_bytes(data[: len(data) // 2])
    _picture(9, 36, 52).save(files["e.png"])
    _picture(10, 41, 47).save(files["png-named.jpg"], format="PNG")
    return files


BATCHED = {"a.jpg", "b.jpg", "c.jpeg", "d.jpg"}  # what the batched decoder gets
BY_PIL = {"progressive.jpg", "cmyk.jpg", "gray.jpg", "e.png", "png-named.jpg"}  # decoded by PIL in the reader


def former_pixels(path: Path, preprocess_cfg: dict) -> torch.Tensor:
    """The former ``decode_batch``'s operations on one image (torchvision's decoder, then TF.resize,
    centre crop, normalisation image by image), kept here as the reference."""
    from torchvision.transforms.v2 import functional as TF

    size = preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean = torch.tensor(preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(3, 1, 1)
    image = jpeg_decoder()([torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)], CPU)[0]
    h, w = image.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    resized = TF.resize(
        image,
        [max(size[0], round(h * scale)), max(size[1], round(w * scale))],
        interpolation=TF.InterpolationMode.BICUBIC,
        antialias=True,
    )
    cropped = TF.center_crop(resized, list(size))
    return (cropped.float() / 255.0 - mean) / std


def expected_pixels(name: str, path: Path, model) -> torch.Tensor:
    if name in BATCHED:
        return former_pixels(path, model.preprocess_cfg)
    return model.image_transform()(load_rgb(str(path)))  # embed images' PIL path


def collect(batches) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    pixels, failures = {}, {}
    for indices, batch, failed in batches:
        assert indices == sorted(indices)
        for row, index in enumerate(indices):
            pixels[index] = batch[row]
        failures.update(failed)
    return pixels, failures


def test_batched_resize_is_the_per_image_resize_bit_for_bit():
    """One interpolate per distinct size gives exactly the pixels of one interpolate per image."""
    g = torch.Generator().manual_seed(0)
    cfg = {"size": 24, "mean": (0.48, 0.45, 0.40), "std": (0.26, 0.26, 0.27)}
    preprocess = Preprocess(cfg, CPU)
    for h, w, n in [(37, 53, 5), (64, 48, 3), (24, 24, 2), (20, 90, 1), (90, 61, 2)]:
        images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
        batched = preprocess(images)
        for i in range(n):
            assert torch.equal(batched[i], preprocess(images[i])), (h, w, i)


def test_the_pool_gives_each_file_its_own_pixels_whatever_its_batch(tiny_model, tmp_path):
    """Baseline JPEGs: the former per-image path's pixels, bit for bit; every other kind: PIL's,
    bit for bit; a truncated JPEG: a reason. The same pixels in batches of 1, 3 and all files: the
    truncated file no longer sends its batch-mates to PIL (the former path decoded a whole batch
    with PIL when one file failed, so a file's pixels depended on its batch)."""
    files = make_odd_folder(tmp_path / "odd")
    names = sorted(files)
    paths = [str(files[n]) for n in names]
    transform = tiny_model.image_transform()
    runs = [
        collect(decoded_batches(paths, tiny_model.preprocess_cfg, transform, CPU, batch_size=size, workers=0))
        for size in (len(paths), 3, 1)
    ]
    pixels, failures = runs[0]
    assert {names[i] for i in failures} == {"truncated.jpg"}
    assert "cannot decode" in failures[names.index("truncated.jpg")]
    for index, name in enumerate(names):
        if name == "truncated.jpg":
            continue
        assert torch.equal(pixels[index], expected_pixels(name, files[name], tiny_model)), name
        for other, _ in runs[1:]:
            assert torch.equal(other[index], pixels[index]), name
    assert all(run[1] == failures for run in runs[1:])


class Deferred:
    """A stream as lazy as CUDA's may be: started work runs only when the host or the model's
    stream waits for it, in the order it was started. Every call is logged."""

    def __init__(self, log: list, host_waits: bool = True) -> None:
        self.log, self.host_waits = log, host_waits
        self.queue: deque = deque()
        self.ran: set[int] = set()
        self.results: dict[int, object] = {}
        self.started = 0

    def start(self, work):
        self.started += 1
        self.queue.append((self.started, work))
        self.log.append(("start", self.started))
        return self.started

    def _run_until(self, flight: int) -> None:
        while flight not in self.ran:
            number, work = self.queue.popleft()
            self.results[number] = work()
            self.ran.add(number)

    def ready(self, flight: int):
        self._run_until(flight)
        self.log.append(("ready", flight))
        return self.results.pop(flight)

    def wait_host(self, flight: int) -> None:
        if self.host_waits:  # False: the bug the test must catch (a buffer refilled too early)
            self._run_until(flight)
        self.log.append(("host", flight))


@pytest.mark.parametrize("slots", [3, 1])
def test_two_batches_in_flight_and_staging_reuse_on_a_deferred_stream(
    tiny_model, tmp_path, monkeypatch, slots
):
    """Batch k + 1 is started before batch k reaches the model, the model's stream waits for batch
    k before using it, and no staging buffer is refilled before the work that reads it ran (with
    one buffer, the host must wait for every batch): the pixels equal the CPU's, where work runs at
    once. With the host's wait removed, the deferred stream sees the corruption it would cause."""
    files = make_odd_folder(tmp_path / "odd")
    paths = [str(files[n]) for n in sorted(files) if n != "truncated.jpg"] * 2  # 18 files, 9 batches
    cfg, transform = tiny_model.preprocess_cfg, tiny_model.image_transform()
    truth, _ = collect(
        decoded_batches(paths, cfg, transform, CPU, batch_size=2, workers=0, streams=HostStreams())
    )
    monkeypatch.setattr(reader, "Staging", lambda pin: Staging(pin, slots=slots))

    def run(streams: Deferred, log: list):
        got = {}
        for number, (indices, batch, _) in enumerate(
            decoded_batches(paths, cfg, transform, CPU, batch_size=2, workers=0, streams=streams), start=1
        ):
            log.append(("model", number))
            got.update(zip(indices, batch, strict=True))
        return got

    log: list = []
    got = run(Deferred(log), log)
    assert got.keys() == truth.keys() and all(torch.equal(got[i], truth[i]) for i in truth)
    batches = len(paths) // 2
    for k in range(1, batches + 1):
        model = log.index(("model", k))
        assert log.index(("ready", k)) < model
        if k < batches:  # the next batch's copy and decoding are queued before the model runs
            assert log.index(("start", k + 1)) < model
        assert ("start", k + 2) not in log[:model]  # two in flight, not more
    if slots == 1:  # the host waited for each batch before refilling the one buffer
        assert [e for e in log if e[0] == "host"] == [("host", k) for k in range(1, batches)]
    else:  # with three buffers the batch that last read one has long been waited for
        assert all(log.index(("host", k)) > log.index(("ready", k)) for k in range(1, batches - 2))
    if slots == 1:
        log = []
        broken = run(Deferred(log, host_waits=False), log)
        assert broken.keys() != truth.keys() or not all(torch.equal(broken[i], truth[i]) for i in truth)


def test_the_pool_persists_across_image_lists_and_sends_one_buffer_per_batch(tiny_model, tmp_path):
    """`embed images` on two image lists: the second is read by the first one's worker process;
    a worker sends a batch as one bytes tensor and one pixel tensor, not one tensor per file."""
    files = make_odd_folder(tmp_path / "odd")
    second = tmp_path / "second"
    second.mkdir()
    for i in range(3):
        _picture(20 + i, 40, 40).save(second / f"{i}.jpg")
    transform = tiny_model.image_transform()
    report = RecordingReporter()
    reader.close_reader_pool()
    seen = []

    def embed(folder: Path, skipped: int) -> None:
        listing = digest_images(list_images(folder), report)
        ws = Workspace.open(tmp_path / f"cache-{folder.name}")
        try:
            result = embed_images(tiny_model, listing, ws, workers=1, batch_size=4, decoder="torch")
        finally:
            ws.close()
        assert result.artifact.manifest["counts"]["embedded"] == len(listing.images) - skipped
        pool = reader_pool(transform, DEFAULT_MAX_PIXELS, 1, WORKER_TIMEOUT)  # the stage's own
        seen.append((pool, pool.pids()))

    try:
        embed(tmp_path / "odd", skipped=1)
        embed(second, skipped=0)
        (pool, pids), again = seen
        assert len(pids) == 1 and again == (pool, pids)  # the same pool, the same worker process
        paths = [str(files[n]) for n in sorted(files)]
        batches = list(pool.read(paths, 8))
        assert [b.reader for b in batches] == pids * 2  # read in the worker, not here
        for batch in batches:
            assert isinstance(batch.data, torch.Tensor) and batch.data.dtype == torch.uint8
            assert batch.pixels is None or batch.pixels.shape[0] == len(batch.decoded)
        jpegs = {sorted(files)[i] for b in batches for i in b.jpegs}  # the truncated one: its header is fine
        assert jpegs == BATCHED | {"truncated.jpg"} and len(batches[0].ends) == len(batches[0].jpegs)
    finally:
        reader.close_reader_pool()


def test_a_pool_under_a_long_tmpdir_moves_its_sockets(tiny_model, tmp_path, monkeypatch):
    """The workers' sockets live under the temporary folder: with a TMPDIR too long for a socket
    path the pool moves it (settings.loader_sharing) and reads, instead of losing the batches."""
    import tempfile

    long = tmp_path / ("t" * 90)
    long.mkdir()
    monkeypatch.setenv("TMPDIR", str(long))
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    files = make_odd_folder(tmp_path / "odd")
    paths = [str(files[n]) for n in sorted(files)]
    reader.close_reader_pool()
    try:
        pixels, failures = collect(
            decoded_batches(
                paths,
                tiny_model.preprocess_cfg,
                tiny_model.image_transform(),
                CPU,
                batch_size=4,
                workers=1,
                timeout=60,
            )
        )
        assert len(pixels) == len(paths) - 1 and len(failures) == 1
        assert len(tempfile.gettempdir()) < 75
    finally:
        reader.close_reader_pool()


def test_embed_images_decode_torch_through_the_cli(tiny_model, tmp_path):
    """`embed images --decode torch` in-process over every kind of file: the truncated one
    skipped with PIL's reason, every other row the tiny model's embedding of the reference pixels
    (one batch, in list order) bit for bit; its own cache key value (torch/2)."""
    from negalign_cli.compute.vision import encode_images

    files = make_odd_folder(tmp_path / "odd")
    out = tmp_path / "out"
    result = cli(
        "embed", "images", "--images", str(tmp_path / "odd"), "--decode", "torch", "--workers", "0",
        "--store-dtype", "float32", "--batch-size", "64", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
        "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "images.parquet")
    names = [Path(p).name for p in table["path"]]
    status = dict(zip(names, table["status"], strict=True))
    assert [n for n, s in status.items() if s != "ok"] == ["truncated.jpg"]
    assert "cannot decode" in table["reason"][names.index("truncated.jpg")]
    ok = [n for n in names if status[n] == "ok"]
    reference = torch.stack([expected_pixels(n, files[n], tiny_model) for n in ok])
    with torch.no_grad():
        direct = encode_images(tiny_model.model, reference).numpy()
    stored = np.load(out / "image_embeddings.npy")
    rows = table.set_index(pd.Series(names))["row"]
    assert np.array_equal(stored[[rows[n] for n in ok]], direct)
    assert embed_images_spec(tiny_model, "k", decoder="torch").params["decoder"] == "torch/2"


def test_bench_times_the_reader_pool_beside_the_pil_loop(tmp_path):
    """`negalign bench --flows decode` times --decode torch's path over the same files as the bare
    PIL loop and reports its ratio (gpu_check.sh reads it on a GPU)."""
    import json

    out = tmp_path / "bench.json"
    result = cli(
        "bench", "--model", "negalign-tiny-test", "--device", "cpu", "--flows", "decode", "--batch-size", "4",
        "--batches", "1", "--repeats", "1", "--decode-workers", "0", "--e2e-dir", str(tmp_path / "e2e"),
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    flows = {row["flow"]: row for row in record["results"]}
    pool, pil = flows["decode: reader pool, batched decoding"], flows["decode: bare PIL loop"]
    assert pool["images"] == pil["images"] == 4 and pool["images_per_s"] > 0
    assert record["ratios"]["reader pool / bare PIL loop"] == pool["images_per_s"] / pil["images_per_s"]


def test_the_gpu_checks_reader_script_passes_on_the_cpu(tmp_path, capsys):
    """benchmarks/reader_check.py (gpu_check.sh runs it on CUDA, side stream against current
    stream, pool against the per-image path) runs here with the CPU's streams, so it cannot break
    unseen."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reader_check.py"
    spec = importlib.util.spec_from_file_location("reader_check", path)
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main([str(tmp_path / "mixed"), "--write", "4", "--device", "cpu", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "8 of 9 files decoded (4 by the batched decoder, 1 skipped: ['truncated.jpg'])" in printed


def test_benchs_files_flow_reads_through_the_pool_where_auto_means_torch(tiny_model, tmp_path, monkeypatch):
    """On CUDA `auto` means torch: `bench --images` then embeds through the reader pool, as
    `embed images` does (forced here on the CPU, where `auto` means PIL)."""
    import negalign_cli.inputs.datasets as datasets
    from negalign_cli.stages.bench import BenchConfig, _image_file_flow

    monkeypatch.setattr(datasets, "resolve_decoder", lambda decoder, device: "torch")
    make_odd_folder(tmp_path / "odd")
    seen: list[torch.Tensor] = []
    run, count, how = _image_file_flow(
        tiny_model, BenchConfig(images=tmp_path / "odd", batch_size=4, batches=3), seen.append
    )
    run()
    assert count == 10 and "reader pool" in how
    assert [b.shape[0] for b in seen] == [4, 4, 1]  # the truncated file (last by name) skipped
