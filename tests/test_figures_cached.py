"""Figures are outputs like any other (issue 21, part 5): an `evaluate`/`report` rerun copies its
cached figures instead of drawing them, a new λ grid redraws only what depends on λ, a cached PNG
holds the bytes a fresh draw gives, and an edited one is caught by the store and drawn again."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.stages import plots
from tests.faults.helpers import cli
from tests.helpers.synthetic import write_scores

FIGURES = ("plot_roc", "plot_histograms", "plot_lambda_curve", "plot_cam_grid")


@pytest.fixture()
def drawn(monkeypatch) -> Counter:
    """Counts the calls of each plotting function of stages/plots.py (each still draws)."""
    calls: Counter = Counter()
    for name in FIGURES:
        original = getattr(plots, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(plots, name, counting)
    return calls


@pytest.fixture()
def scores(tmp_path) -> dict[str, Path]:
    return {
        "id": write_scores(tmp_path / "id.parquet", 200, 0, shift=0.3),
        "ssb": write_scores(tmp_path / "ssb.parquet", 120, 1, shift=0.15),
        "textures": write_scores(tmp_path / "textures.parquet", 140, 3, shift=-0.2),
    }


def evaluate(scores: dict[str, Path], tmp_path: Path, lambdas: str, out: str = "results") -> dict:
    args = ["evaluate", "--id", str(scores["id"]), "--compare", "--lambda", lambdas]
    args += [f"--ood={name}={path}" for name, path in scores.items() if name != "id"]
    result = cli(*args, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out))
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / out / "results.json").read_text())


def report(tmp_path: Path, results: str = "results", out: str = "report", *extra: str) -> Path:
    target = tmp_path / out
    result = cli(
        "report",
        str(tmp_path / results),
        "--out",
        str(target),
        "--cache-dir",
        str(tmp_path / "cache"),
        *extra,
    )
    assert result.exit_code == 0, result.output
    return target


def chosen(results: dict) -> dict[str, float]:
    return {name: block["methods"]["NegAlign"]["lambda"] for name, block in results["ood"].items()}


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_second_evaluate_and_report_draw_nothing(scores, tmp_path, drawn):
    """The second `evaluate` is an artifact hit and draws nothing (its figures are files of the
    artifact, exported with the rest); the second `report` of the same folder copies every figure
    from the cache, and its PNGs are byte for byte the first report's."""
    evaluate(scores, tmp_path, "0,1")
    assert drawn == Counter(plot_roc=1, plot_histograms=1)
    first = pngs(report(tmp_path) / "figures")
    assert set(first) == {"lambda_curve.png", "roc.png", "score_hist.png"}
    # the report's ROC curves and histograms show evaluate's data (--compare: every method): copied
    assert drawn == Counter(plot_roc=1, plot_histograms=1, plot_lambda_curve=1)
    drawn.clear()
    evaluate(scores, tmp_path, "0,1", out="again")
    assert pngs(tmp_path / "again") == pngs(tmp_path / "results")
    again = report(tmp_path, "results", "report2")
    assert not drawn, f"a second evaluate and report drew {dict(drawn)}"
    assert pngs(again / "figures") == first
    html = (again / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # the text is rendered again, figures inlined


def test_evaluate_hit_imports_no_matplotlib(scores, tmp_path):
    """A cache hit of `evaluate` (and of `report`, whose figures are all cached) never imports
    matplotlib: nothing is drawn."""
    evaluate(scores, tmp_path, "0,1")
    report(tmp_path)
    code = (
        "import sys\n"
        "from tests.faults.helpers import cli\n"
        "argv = sys.argv[1:]\n"
        "for args in (argv[: argv.index('--')], argv[argv.index('--') + 1 :]):\n"
        "    result = cli(*args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print('matplotlib' in sys.modules)\n"
    )
    again = ["evaluate", "--id", str(scores["id"]), "--compare", "--lambda", "0,1"]
    again += [f"--ood={name}={path}" for name, path in scores.items() if name != "id"]
    again += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "again")]
    rerun = ["report", str(tmp_path / "again"), "--out", str(tmp_path / "report2")]
    rerun += ["--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(
        [sys.executable, "-c", code, *again, "--", *rerun],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", "matplotlib was imported on a cache hit"


def test_new_lambda_grid_redraws_only_what_depends_on_lambda(scores, tmp_path, drawn):
    """A new λ grid: the histograms (stored columns) are never redrawn; the ROC curves only when
    the λ NegAlign uses changed; the report's λ curve always."""
    first = evaluate(scores, tmp_path, "0,1")
    report(tmp_path)
    drawn.clear()
    # the same chosen λ per set (the precondition is checked), another grid
    wider = evaluate(scores, tmp_path, "-1,0,1", out="wider")
    assert wider["ood"]["ssb"]["lambda_sweep"].keys() != first["ood"]["ssb"]["lambda_sweep"].keys()
    assert chosen(wider) == chosen(first), "precondition: the new λ does not win"
    assert not drawn, f"evaluate with a new λ grid drew {dict(drawn)}"
    assert pngs(tmp_path / "wider") == pngs(tmp_path / "results")
    report(tmp_path, "wider", "report-wider")
    assert drawn == Counter(plot_lambda_curve=1)
    # a grid that changes the λ NegAlign uses: its ROC curve moves, the histograms do not
    drawn.clear()
    other = evaluate(scores, tmp_path, "0,5", out="other")
    assert chosen(other) != chosen(first)
    assert drawn == Counter(plot_roc=1)
    report(tmp_path, "other", "report-other")
    assert drawn == Counter(plot_roc=1, plot_lambda_curve=1)


def test_cached_figure_is_a_fresh_draw_and_an_edited_one_is_redrawn(scores, tmp_path, drawn):
    """The cached PNG holds the bytes drawing it afresh gives; a cached figure edited in the cache
    fails the store's verification (sha256) and is drawn again, never served."""
    evaluate(scores, tmp_path, "0,1")
    first = pngs(report(tmp_path) / "figures")
    cached = {p.name: p for p in (tmp_path / "cache" / "artifacts" / "figure").glob("*/*.png")}
    assert {"roc.png", "lambda_curve.png", "score_hist.png"} <= set(cached)
    # a fresh draw (no cache) gives the cached bytes
    from negalign_cli.stages.report import build_report

    fresh = build_report(tmp_path / "results", tmp_path / "fresh")
    assert pngs(fresh.out / "figures") == first
    for name in first:
        assert any(p.read_bytes() == first[name] for p in cached_values(tmp_path, name))
    # edit one cached figure in place (same size: only its digest tells)
    lam = next(p for p in cached_values(tmp_path, "lambda_curve.png"))
    data = bytearray(lam.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lam.write_bytes(bytes(data))
    drawn.clear()
    result = cli(
        "report",
        str(tmp_path / "results"),
        "--out",
        str(tmp_path / "report2"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert result.exit_code == 0, result.output
    assert "cached figure" in result.output and "lambda_curve.png does not match its digest" in result.output
    again = tmp_path / "report2"
    assert drawn == Counter(plot_lambda_curve=1)
    assert pngs(again / "figures") == first
    assert lam.read_bytes() == first["lambda_curve.png"]  # the cache holds the good figure again


def cached_values(tmp_path: Path, name: str) -> list[Path]:
    return sorted((tmp_path / "cache" / "artifacts" / "figure").glob(f"*/{name}"))


# --- the CAM grid: cached by its cells' images, masks, CAMs and captions ----------------------


def cam_world(tmp_path: Path) -> dict[str, Path]:
    """Score files with a `cam` folder beside each (cams.npy, cam.parquet) and real images."""
    from PIL import Image

    rng = np.random.default_rng(7)
    out = {}
    for seed, (name, shift, n) in enumerate((("id", 0.3, 24), ("ood", -0.2, 20))):
        cam_folder = tmp_path / f"cam-{name}"
        images = cam_folder / "images"
        images.mkdir(parents=True)
        paths = []
        for i in range(n):
            path = images / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        np.save(cam_folder / "cams.npy", rng.random((n, 7, 7)).astype(np.float32))
        pd.DataFrame(
            {"pred_name": ["cat"] * n, "pred_score": rng.random(n), "cam_valid": np.ones(n, dtype=bool)}
        ).to_parquet(cam_folder / "cam.parquet", index=False)
        score_folder = tmp_path / f"score-{name}"
        score_folder.mkdir()
        out[name] = write_scores(score_folder / "scores.parquet", n, seed, shift)
        frame = pd.read_parquet(out[name]).assign(path=paths, row=np.arange(n))
        frame.to_parquet(out[name], index=False)
        listed = {name: _listed(cam_folder / name) for name in ("cams.npy", "cam.parquet")}
        (cam_folder / "manifest.json").write_text(json.dumps({"stage": "cam", "outputs": listed}))
        manifest = {
            "stage": "score",
            "images_dir": str(cam_folder),
            "inputs": {"cam": listed["cam.parquet"]["sha256"]},
            "outputs": {"scores.parquet": _listed(out[name])},
        }
        (score_folder / "manifest.json").write_text(json.dumps(manifest))
    return out


def _listed(path: Path) -> dict:
    """A manifest's entry for the file ``path`` (report uses only CAM files its manifests vouch for)."""
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


def test_cam_grid_is_cached_by_its_images(tmp_path, drawn, monkeypatch):
    """The second report reads no image for the CAM grid (its cells' digests come from the stat
    cache) and draws nothing; an image of a cell that changes redraws the grid."""
    world = cam_world(tmp_path)
    evaluate(world, tmp_path, "0,1")
    first = pngs(report(tmp_path, "results", "report", "--cams", "2") / "figures")
    assert "cam_grid.png" in first and drawn["plot_cam_grid"] == 1
    drawn.clear()
    read: list = []
    original = plots.centre_square
    monkeypatch.setattr(plots, "centre_square", lambda *a, **k: read.append(a) or original(*a, **k))
    again = report(tmp_path, "results", "report2", "--cams", "2")
    assert not drawn and not read, (dict(drawn), len(read))
    assert pngs(again / "figures") == first
    # overwrite one image the grid shows (the top-ranked ID image: first cell of the first row)
    from negalign_cli.stages.report import _cam_picks, load_score_sets

    results = json.loads((tmp_path / "results" / "results.json").read_text())
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    picks, _ = _cam_picks(results, load_score_sets(results, manifest, tmp_path / "results"), 2)
    from PIL import Image

    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(picks[0][1][0].image)
    third = report(tmp_path, "results", "report3", "--cams", "2")
    assert drawn == Counter(plot_cam_grid=1) and read
    assert pngs(third / "figures")["cam_grid.png"] != first["cam_grid.png"]
