"""--decode torch's reader pool (negalign_cli/inputs/reader.py) checked on a device.

1. The pool with the device's streams (on CUDA: decoding on a side stream, two batches in flight)
   gives exactly the pixels of the same pool with every step on the current stream (HostStreams).
2. Those pixels equal the per-image path's (each JPEG decoded alone, resized alone), bit for bit.
3. Files of every kind: JPEGs of several sizes, progressive, CMYK, grayscale, truncated, PNG.

`benchmarks/gpu_check.sh` runs it on CUDA; `tests/test_reader_pool.py` runs it on the CPU.

usage: python benchmarks/reader_check.py FOLDER [--write N] [--device cuda] [--workers W] [--batch-size B]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

CFG = {  # ViT-B-16's preprocessing (open_clip's OpenAI configuration): no model is needed
    "size": 224,
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (333, 500))


def write_mixed(folder: Path, n: int) -> None:
    """``n`` photo-like JPEGs in a few ImageNet sizes (one size in three), then one progressive,
    one CMYK, one grayscale, one truncated JPEG and one PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def picture(width: int, height: int) -> Image.Image:
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        noise = rng.normal(0, 15, (height, width, 3))
        return Image.fromarray(np.clip(np.asarray(coarse) + noise, 0, 255).astype(np.uint8))

    for i in range(n):
        picture(*SIZES[0 if i % 3 else (i // 3) % len(SIZES)]).save(folder / f"{i:05d}.jpg", quality=90)
    picture(500, 375).save(folder / "progressive.jpg", quality=90, progressive=True)
    picture(400, 300).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    picture(300, 400).convert("L").save(folder / "gray.jpg", quality=90)
    picture(320, 240).save(folder / "image.png")
    picture(500, 375).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])


def collect(batches) -> tuple[dict[int, object], dict[int, str]]:
    pixels, failures = {}, {}
    for indices, batch, failed in batches:
        for row, index in enumerate(indices):
            pixels[index] = batch[row]
        failures.update(failed)
    return pixels, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--write", type=int, default=0, help="first write this many mixed files there")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import torch

    from negalign_cli.inputs.datasets import is_jpeg_name, jpeg_decoder, pil_item, read_jpeg
    from negalign_cli.inputs.reader import HostStreams, Preprocess, decode_each, decoded_batches
    from negalign_cli.models import preprocess_transform

    if args.write:
        write_mixed(args.folder, args.write)
    device = torch.device(args.device)
    paths = sorted(str(p) for p in args.folder.iterdir() if p.suffix in (".jpg", ".jpeg", ".png"))
    transform = preprocess_transform(CFG)

    def run(streams=None):
        return collect(
            decoded_batches(
                paths,
                CFG,
                transform,
                device,
                batch_size=args.batch_size,
                workers=args.workers,
                streams=streams,
            )
        )

    started = time.perf_counter()
    side, failures = run()  # the device's own streams
    seconds = time.perf_counter() - started
    plain, plain_failures = run(HostStreams())  # every step on the current stream
    assert failures == plain_failures and side.keys() == plain.keys(), "the two runs kept different files"
    streams_diff = max(float((side[i] - plain[i]).abs().max()) for i in side)

    decode, preprocess = jpeg_decoder(), Preprocess(CFG, device)
    per_image_diff, batched = 0.0, 0
    for index, path in enumerate(paths):  # the reference: one file, one decode, one resize at a time
        kind, data, _ = read_jpeg(path) if is_jpeg_name(path) else ("pil", None, "")
        image = (
            decode_each(decode, [torch.frombuffer(bytearray(data), dtype=torch.uint8)], device)[0]
            if data
            else None
        )
        if image is not None:
            reference = preprocess(image)
            batched += 1
        else:
            tensor, _ = pil_item(path, transform)
            if tensor is None:
                assert index in failures, path
                continue
            reference = tensor.to(device)
        per_image_diff = max(per_image_diff, float((side[index] - reference).abs().max()))
    skipped = sorted(Path(paths[i]).name for i in failures)
    print(
        f"reader pool on {device}: {len(side)} of {len(paths)} files decoded ({batched} by the batched "
        f"decoder, {len(failures)} skipped: {skipped}) in {seconds:.2f} s; max |side stream - current "
        f"stream| = {streams_diff:.3g}, max |pool - per-image path| = {per_image_diff:.3g}"
    )
    assert streams_diff == 0.0, "the side stream's pixels differ from the current stream's"
    assert per_image_diff == 0.0, "batched decoding/resizing differs from one image at a time"
    return 0


if __name__ == "__main__":
    sys.exit(main())
