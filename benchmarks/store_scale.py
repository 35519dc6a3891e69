#!/usr/bin/env python3
"""Put, get, disk size and a rerun's lookup for the per-item vector store (``cache/items.py``).

usage: python benchmarks/store_scale.py [--items 100000] [--dim 512] [--dtype float32]
                                        [--batch 256] [--dir DIR] [--json FILE]

Stores ``--items`` random vectors through the public ``ItemStore`` API, one ``put_many`` per batch of
``--batch`` items (as `embed images` does), then measures:

* put: items stored per second, all batches together;
* get: a fresh store (a new process would see the same) looks every item up again, in chunks of
  65,536 (as a rerun that lists new images does), and every row is compared with what was put;
* random get: 10,000 items in random order (the latency of scattered lookups);
* disk: the bytes of every file the store wrote, against the raw vector bytes (items × dim ×
  itemsize);
* rerun: a fresh store asked to put every item again (nothing new: nothing may be written).

The same script measures whichever store ``cache/items.py`` holds, so before/after figures come from
one command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from negalign_cli.cache.items import ITEM_FORMAT, ItemStore

CHUNK = 65536


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the store goes (default: a temporary folder)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="negalign-store-"))
    rng = np.random.default_rng(0)
    items = [f"{i:064x}" for i in rng.integers(0, 2**62, size=args.items)]
    items = list(dict.fromkeys(items))
    n = len(items)

    def vectors(start: int, stop: int) -> np.ndarray:
        # deterministic per row, so the get check needs no copy of everything that was put
        rows = np.arange(start, stop, dtype=np.float32)[:, None]
        return (rows * 0.001 + np.arange(args.dim, dtype=np.float32)[None, :]).astype(args.dtype)

    store = ItemStore(root)
    ns = store.namespace("image", "bench-model", {"bench": 1}, args.dim, args.dtype)
    put_s = 0.0  # the store's own time: making the vectors and checking them is left out
    for start in range(0, n, args.batch):
        stop = min(n, start + args.batch)
        batch = vectors(start, stop)
        started = time.perf_counter()
        ns.put_many(items[start:stop], batch)
        put_s += time.perf_counter() - started
    store.close()

    fresh = ItemStore(root)
    ns = fresh.namespace("image", "bench-model", {"bench": 1}, args.dim, args.dtype)
    get_s = 0.0
    found_all = 0
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        started = time.perf_counter()
        got, found = ns.get_many(items[start:stop])
        get_s += time.perf_counter() - started
        found_all += int(found.sum())
        if not np.array_equal(got, vectors(start, stop)):
            raise SystemExit(f"rows {start}..{stop} came back different from what was put")
    if found_all != n:
        raise SystemExit(f"only {found_all} of {n} items were found")

    picks = rng.choice(n, size=min(10_000, n), replace=False)
    started = time.perf_counter()
    got, found = ns.get_many([items[i] for i in picks])
    random_s = time.perf_counter() - started
    assert found.all()
    fresh.close()

    raw = n * args.dim * np.dtype(args.dtype).itemsize
    disk = folder_bytes(root)

    again = ItemStore(root)
    ns = again.namespace("image", "bench-model", {"bench": 1}, args.dim, args.dtype)
    rerun_s = 0.0
    for start in range(0, n, args.batch):
        stop = min(n, start + args.batch)
        batch = vectors(start, stop)
        started = time.perf_counter()
        ns.put_many(items[start:stop], batch)
        rerun_s += time.perf_counter() - started
    again.close()
    grown = folder_bytes(root) - disk

    figures = {
        "item_format": ITEM_FORMAT,
        "items": n,
        "dim": args.dim,
        "dtype": args.dtype,
        "batch": args.batch,
        "put_per_s": round(n / put_s),
        "get_per_s": round(n / get_s),
        "random_get_per_s": round(len(picks) / random_s),
        "rerun_put_per_s": round(n / rerun_s),
        "rerun_grew_bytes": grown,
        "disk_bytes": disk,
        "raw_bytes": raw,
        "disk_over_raw": round(disk / raw, 3),
    }
    for name, value in figures.items():
        print(f"{name:>18}: {value:,}" if isinstance(value, int) else f"{name:>18}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
