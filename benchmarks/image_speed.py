#!/usr/bin/env python3
"""Images/s of embedding, of batched Grad-CAM (+ background embedding) and of the per-image path
(batch 1, what the published scripts do), on decoded tensors, in one run.

usage: python benchmarks/image_speed.py [--model negalign-tiny-test] [--pretrained random] [--images 512]
                                        [--batch-size 256] [--precision fp32|fp16|bf16] [--device auto]
                                        [--bg-pool tokens] [--single 32]

Speed does not depend on weight values, so ViT-B-16 runs with --pretrained random. The design's
H100 targets (ViT-B-16, 224 px): embedding ≥ 9,000 images/s, full CAM path ≥ 8,000 images/s.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from negalign_cli.compute.vision import CamConfig, cam_batch, encode_images
from negalign_cli.models import load_model
from negalign_cli.settings import resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, batches, device, n_images) -> float:
    fn(batches[0])  # warm-up
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        fn(batch)
    sync(device)
    return n_images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="negalign-tiny-test")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bg-pool", default="tokens")
    parser.add_argument("--single", type=int, default=32, help="images for the batch-1 per-image path")
    args = parser.parse_args()

    device = resolve_device(args.device)
    loaded = load_model(args.model, args.pretrained, device, args.precision)
    dtype = next(loaded.model.parameters()).dtype
    size = loaded.preprocess_cfg["size"]
    size = size if isinstance(size, (tuple, list)) else (size, size)
    generator = torch.Generator().manual_seed(0)
    n_batches = max(1, args.images // args.batch_size)
    batches = [
        torch.randn(args.batch_size, 3, *size, generator=generator).to(device, dtype)
        for _ in range(n_batches)
    ]
    classes = F.normalize(torch.randn(1000, loaded.embed_dim, generator=generator), dim=-1).to(device)
    config = CamConfig(bg_pool=args.bg_pool)
    n = n_batches * args.batch_size

    embed = rate(lambda b: encode_images(loaded.model, b), batches, device, n)
    cam = rate(lambda b: cam_batch(loaded.model, b, classes, config), batches, device, n)
    singles = [b[i : i + 1] for b in batches for i in range(b.shape[0])][: args.single]

    def per_image(batch):  # the published flow: one image, full backward through every block
        x = batch.clone().requires_grad_(True)
        with torch.enable_grad():
            emb = F.normalize(loaded.model.encode_image(x).float(), dim=-1)
            (emb @ classes.T).max().backward()

    single = rate(per_image, singles, device, len(singles))
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"{args.model} {size[0]}px {args.precision} batch {args.batch_size} on {name}: "
        f"embed {embed:,.1f} img/s | cam+background ({args.bg_pool}) {cam:,.1f} img/s | "
        f"per-image Grad-CAM (batch 1, full backward) {single:,.1f} img/s | cam speed-up {cam / single:,.1f}x"
    )


if __name__ == "__main__":
    main()
