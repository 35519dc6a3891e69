"""`negalign bench --e2e` (files → method table, cold and warm, per stage) and `--flows decode`
(embed images' decoding path beside a bare PIL loop over the same JPEG files)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from negalign_cli.stages.bench_e2e import MOS_SETS, set_sizes, write_jpegs
from tests.faults.helpers import cli


def test_synthetic_jpegs_are_imagenet_sized(tmp_path):
    spec = write_jpegs(tmp_path / "jpegs", {"a": 6, "b": 3})
    paths = sorted((tmp_path / "jpegs").rglob("*.jpg"))
    assert len(paths) == spec["files"] == 9
    sizes = [p.stat().st_size for p in paths]
    assert spec["mean_bytes"] == np.mean(sizes)
    assert 95_000 <= spec["mean_bytes"] <= 125_000  # ~110 KB, as ImageNet's 500×375 photos
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (500, 375) and image.mode == "RGB"
    first = np.asarray(Image.open(paths[0]))
    assert not np.array_equal(first, np.asarray(Image.open(paths[1])))  # every image its own
    stamp = paths[0].stat().st_mtime_ns
    assert write_jpegs(tmp_path / "jpegs", {"a": 6, "b": 3})["files"] == 9  # written once
    assert paths[0].stat().st_mtime_ns == stamp
    pooled = write_jpegs(tmp_path / "pooled", {"a": 6, "b": 3}, workers=2)  # gpu_check's way
    assert pooled["mean_bytes"] == spec["mean_bytes"]
    for path in paths:  # the same files, whoever writes them
        assert (tmp_path / "pooled" / path.relative_to(tmp_path / "jpegs")).read_bytes() == path.read_bytes()


def test_mos_sized_benchmark_scales():
    assert dict(MOS_SETS) == {
        "id": 50_000,
        "inaturalist": 10_000,
        "sun": 10_000,
        "places": 10_000,
        "textures": 5_640,
    }
    assert sum(set_sizes(1.0).values()) == 85_640
    assert set_sizes(0.001) == {"id": 50, "inaturalist": 10, "sun": 10, "places": 10, "textures": 6}


def test_e2e_and_decode_flows(tmp_path):
    out = tmp_path / "bench.json"
    result = cli(
        "bench",
        "--model",
        "negalign-tiny-test",
        "--device",
        "cpu",
        "--flows",
        "decode",
        "--batch-size",
        "8",
        "--batches",
        "2",
        "--repeats",
        "1",
        "--classes",
        "20",
        "--negatives",
        "300",
        "--decode-workers",
        "0",
        "--e2e",
        "--e2e-scale",
        "0.0004",
        "--e2e-dir",
        str(tmp_path / "e2e"),
        "--json",
        str(out),
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    e2e = record["e2e"]
    assert e2e["total_images"] == 34 and e2e["files"]["files"] == 34  # 20 ID, 4 + 4 + 4 + 2 OOD
    assert e2e["files"]["width"] == 500 and e2e["files"]["height"] == 375
    for phase in ("cold", "warm"):
        run = e2e[phase]
        assert set(run["stages"]) == {"embed texts", "list + digest", "cam", "score", "evaluate"}
        assert 0 < sum(run["stages"].values()) <= run["seconds"]
        assert "NegAlign" in run["methods"] and len(run["methods"]) > 1  # the method table (--compare)
    assert not any(e2e["cold"]["hits"].values())  # a fresh cache: every stage computed
    assert all(e2e["warm"]["hits"].values())  # the same cache: every stage served
    assert e2e["warm"]["seconds"] < e2e["cold"]["seconds"]
    flows = {row["flow"]: row for row in record["results"]}
    assert {"decode: embed images' path", "decode: bare PIL loop"} <= set(flows)
    assert flows["decode: bare PIL loop"]["images"] == 16
    assert len(list((tmp_path / "e2e" / "decode" / "decode").glob("*.jpg"))) == 16  # its own files
    ratio = record["ratios"]["JPEG path / bare PIL loop"]
    expected = (
        flows["decode: embed images' path"]["images_per_s"] / flows["decode: bare PIL loop"]["images_per_s"]
    )
    assert ratio == expected and ratio > 0
    assert "MOS-sized benchmark (e2e), warm" in result.output and "JPEG path / bare PIL loop" in result.output
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_table", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_table.py"
    )
    assert spec is not None and spec.loader is not None
    gpu_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_table)
    printed = gpu_table.table([record])
    line = next(row for row in printed.splitlines() if row.startswith("MOS-sized benchmark"))
    assert f"{e2e['warm']['seconds']:.1f} / {e2e['cold']['seconds']:.1f} s" in line
    assert "scale 0.0004 of the MOS size" in line  # a scaled-down run says so
    assert f"{ratio:.3f}" in next(row for row in printed.splitlines() if row.startswith("JPEG path"))
