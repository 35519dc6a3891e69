"""`evaluate --ood-group`, `negalign report` (HTML, Markdown, LaTeX, figures) and the browser check."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from negalign_cli.cli.app import app
from negalign_cli.compute.evaluation import average_metrics, final_score, group_sets
from negalign_cli.compute.metrics import CONVENTIONS, ood_metrics
from negalign_cli.errors import NegalignError
from negalign_cli.stages.evaluation import (
    EvaluateRequest,
    evaluate,
    parse_ood_groups,
    roc_curves,
)
from tests.faults.helpers import cli
from tests.helpers import in_process
from tests.helpers.synthetic import write_scores

runner = CliRunner()
METRIC_KEYS = ("auroc", "fpr95", "aupr_in", "aupr_out")


@pytest.fixture()
def score_files(tmp_path):
    return {
        "id": write_scores(tmp_path / "id.parquet", 240, 0, shift=0.3),
        "ssb": write_scores(tmp_path / "ssb.parquet", 150, 1, shift=0.15),
        "ninco": write_scores(tmp_path / "ninco.parquet", 130, 2, shift=0.1),
        "textures": write_scores(tmp_path / "textures.csv", 170, 3, shift=-0.2),
    }


def _frame(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


# --- --ood-group ------------------------------------------------------------------------------


def test_average_metrics_and_group_checks():
    a = {"neglabel": {"auroc": 0.9, "fpr95": 0.2}, "openood": {"auroc": 0.9, "fpr95": 0.4}}
    b = {"neglabel": {"auroc": 0.7, "fpr95": 0.6}, "openood": {"auroc": 0.7, "fpr95": 0.1}}
    mean = average_metrics([a, b])
    assert mean["neglabel"] == pytest.approx({"auroc": 0.8, "fpr95": 0.4})
    assert mean["openood"] == pytest.approx({"auroc": 0.8, "fpr95": 0.25})
    with pytest.raises(ValueError):
        average_metrics([])
    sets = ["ssb", "ninco", "textures"]
    assert group_sets([("near", ["ssb", "ninco"]), ("far", ["textures"])], sets) == {
        "near": ["ssb", "ninco"],
        "far": ["textures"],
    }
    for groups, message in [
        ([("near", ["ssb", "inaturalist"])], "inaturalist"),
        ([("ssb", ["ninco"])], "already an OOD set"),
        ([("mean", ["ninco"])], "reserved"),
        ([("near", ["ssb"]), ("near", ["ninco"])], "twice"),
        ([("near", ["ssb", "ssb"])], "twice"),
        ([("near", [])], "no sets"),
    ]:
        with pytest.raises(ValueError, match=message):
            group_sets(groups, sets)
    assert parse_ood_groups(["near=ssb, ninco", "far=textures"]) == [
        ("near", ["ssb", "ninco"]),
        ("far", ["textures"]),
    ]
    for bad in ("near", "near=", "=ssb", "near=,"):
        with pytest.raises(NegalignError, match="NAME=SET1,SET2"):
            parse_ood_groups([bad])


def test_evaluate_reports_group_means(score_files, workspace):
    oods = [(name, score_files[name]) for name in ("ssb", "ninco", "textures")]
    groups = [("near", ["ssb", "ninco"]), ("far", ["textures"])]
    request = EvaluateRequest(score_files["id"], oods, lambdas=[0.0, 1.0, 5.0], compare=True, groups=groups)
    result = evaluate(request, workspace)
    results = json.loads(result.artifact.file("results.json").read_text())
    assert set(results["groups"]) == {"near", "far"}
    assert results["groups"]["near"]["sets"] == ["ssb", "ninco"]
    id_frame = _frame(score_files["id"])
    for group, members in groups:
        block = results["groups"][group]
        for convention in CONVENTIONS:
            # an independent recomputation: each set's metrics from the raw scores, then the mean
            per_set = [
                ood_metrics(id_frame["s_mcm"], _frame(score_files[m])["s_mcm"], convention).as_dict()
                for m in members
            ]
            expected = {k: np.mean([p[k] for p in per_set]) for k in METRIC_KEYS}
            assert block["methods"]["MCM"]["metrics"][convention] == pytest.approx(expected)
            for lam in (0.0, 1.0, 5.0):
                per_lam = [
                    ood_metrics(
                        id_frame["s_neglabel_star"] + lam * id_frame["p_align"],
                        _frame(score_files[m])["s_neglabel_star"] + lam * _frame(score_files[m])["p_align"],
                        convention,
                    ).auroc
                    for m in members
                ]
                assert block["lambda_sweep"][str(lam)]["metrics"][convention]["auroc"] == pytest.approx(
                    np.mean(per_lam)
                )
        # NegAlign's group row averages each member at its own λ
        chosen = [results["ood"][m]["methods"]["NegAlign"]["metrics"]["neglabel"]["auroc"] for m in members]
        assert block["methods"]["NegAlign"]["metrics"]["neglabel"]["auroc"] == pytest.approx(np.mean(chosen))
    # the overall mean is still over every set, and metrics.csv has the group rows
    all_sets = [results["ood"][n]["methods"]["MCM"]["metrics"]["neglabel"]["auroc"] for n, _ in oods]
    assert results["mean"]["methods"]["MCM"]["metrics"]["neglabel"]["auroc"] == pytest.approx(
        np.mean(all_sets)
    )
    csv = pd.read_csv(result.artifact.file("metrics.csv"))
    near = csv[(csv["ood"] == "near") & (csv["method"] == "MCM")]
    assert len(near) == 1
    assert near["auroc_pct"].iloc[0] == pytest.approx(
        100 * results["groups"]["near"]["methods"]["MCM"]["metrics"]["neglabel"]["auroc"], abs=1e-4
    )
    assert results["config"]["ood_groups"] == {"near": ["ssb", "ninco"], "far": ["textures"]}
    with pytest.raises(NegalignError, match="--ood-group"):
        evaluate(
            EvaluateRequest(score_files["id"], oods, compare=True, groups=[("near", ["ssb", "places"])]),
            workspace,
        )


def test_roc_curves_plot_negalign_at_its_lambda(score_files, workspace):
    """The ROC figure's NegAlign curve is S* + λ·P_align at the λ each set chose, and says so."""
    oods = [("ssb", score_files["ssb"]), ("textures", score_files["textures"])]
    request = EvaluateRequest(score_files["id"], oods, lambdas=[0.0, 2.0, 10.0], compare=True)
    results = json.loads(evaluate(request, workspace).artifact.file("results.json").read_text())
    id_frame = _frame(score_files["id"])
    frames = {name: _frame(path) for name, path in oods}
    curves = roc_curves(results, id_frame, frames)
    for name, frame in frames.items():
        lam = results["ood"][name]["methods"]["NegAlign"]["lambda"]
        label = f"NegAlign (λ={lam:g})"
        assert label in curves[name] and "MCM" in curves[name] and "NegRefine" in curves[name]
        id_scores, ood_scores = curves[name][label]
        np.testing.assert_allclose(
            ood_scores, final_score(frame["s_neglabel_star"].to_numpy(), frame["p_align"].to_numpy(), lam)
        )
        assert ood_metrics(id_scores, ood_scores).auroc == pytest.approx(
            results["ood"][name]["methods"]["NegAlign"]["metrics"]["neglabel"]["auroc"]
        )


# --- the report on synthetic score files (no CAM outputs) ---------------------------------------


def parse_markdown_tables(text: str) -> dict[str, dict[tuple[str, str], dict[str, tuple[float, bool]]]]:
    """convention → (block label, method) → metric → (value, marked best), from report.md."""
    tables: dict = {}
    convention = None
    section = text.split("\n## Method table\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        heading = re.match(r"### (\w+) convention", line)
        if heading:
            convention = heading.group(1)
            tables[convention] = {}
            continue
        if convention is None or not line.startswith("| ") or line.startswith(("| OOD set", "| ---")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 6:
            continue
        block, method, *values = (c.replace("\\*", "*").replace("\\_", "_") for c in cells)
        parsed = {}
        for key, value in zip(METRIC_KEYS, values, strict=True):
            best = value.startswith("**")
            parsed[key] = (float(value.strip("*")), best)
        tables[convention][(block, method)] = parsed
    return tables


def _block_of(label: str, results: dict) -> dict:
    if label in results["ood"]:
        return results["ood"][label]
    if label.startswith("mean of the"):
        return results["mean"]
    return results["groups"][label.split(" (mean of")[0]]


def check_markdown_against_results(markdown: str, results: dict) -> int:
    """Every number of report.md's tables equals results.json (percent, 2 decimals), every block
    and method is there, and exactly the best values of each block are bold. Returns the count."""
    tables = parse_markdown_tables(markdown)
    assert set(tables) == set(CONVENTIONS)
    checked = 0
    for convention, rows in tables.items():
        blocks: dict[str, list] = {}
        for (label, method), values in rows.items():
            blocks.setdefault(label, []).append((method, values))
        expected_blocks = len(results["ood"]) + len(results.get("groups", {})) + (len(results["ood"]) > 1)
        assert len(blocks) == expected_blocks
        for label, entries in blocks.items():
            block = _block_of(label, results)
            assert [m.split(" (λ")[0] for m, _ in entries] == list(block["methods"])
            for method, values in entries:
                stored = block["methods"][method.split(" (λ")[0]]["metrics"][convention]
                for key in METRIC_KEYS:
                    assert values[key][0] == pytest.approx(round(100 * stored[key], 2), abs=0.0051)
                    checked += 1
            for key in METRIC_KEYS:
                shown = [values[key][0] for _, values in entries]
                target = min(shown) if key == "fpr95" else max(shown)
                marked = [v == target and len(entries) > 1 for v in shown]  # a lone method: no marks
                assert [values[key][1] for _, values in entries] == marked
    return checked


def check_self_contained(html: str, folder: Path) -> None:
    assert "http://" not in html and "https://" not in html  # ':' is not a base64 character
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert references and all(r.startswith(("data:", "#")) for r in references), references
    assert "url(" not in html and "@import" not in html
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    figures = sorted((folder / "figures").glob("*.png"))
    assert len(images) == len(figures) >= 1
    assert sorted(base64.b64decode(i) for i in images) == sorted(f.read_bytes() for f in figures)


def test_report_from_an_evaluate_folder(score_files, tmp_path):
    args = ["evaluate", "--id", str(score_files["id"])]
    for name in ("ssb", "ninco", "textures"):
        args += ["--ood", f"{name}={score_files[name]}"]
    args += ["--ood-group", "near=ssb,ninco", "--ood-group", "far=textures", "--compare", "--lambda", "sweep"]
    args += ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "results")]
    evaluated = runner.invoke(app, args)
    assert evaluated.exit_code == 0, evaluated.output
    assert "near (mean)" in evaluated.output and "far (mean)" in evaluated.output
    reported = runner.invoke(app, ["report", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "c")])
    assert reported.exit_code == 0, reported.output
    out = tmp_path / "results" / "report"  # the default --out
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    markdown = (out / "report.md").read_text()
    # 2 conventions x (3 sets + 2 groups + mean) x 7 methods x 4 metrics
    assert check_markdown_against_results(markdown, results) == 2 * 6 * 7 * 4
    html = (out / "report.html").read_text()
    check_self_contained(html, out)
    assert {p.name for p in (out / "figures").iterdir()} == {"lambda_curve.png", "roc.png", "score_hist.png"}
    # no CAM outputs beside synthetic score files: the report says what it left out
    assert "no CAM outputs found" in markdown and "no CAM outputs found" in html
    tex = (out / "report.tex").read_text()
    auroc = results["groups"]["near"]["methods"]["NegLabel"]["metrics"]["openood"]["auroc"]
    assert (
        f"{100 * auroc:.2f}" in tex and tex.count(r"\begin{tabular}") == 3
    )  # the results table, then the method table in each convention
    assert r"\textbf{" in tex and "NegLabel*" in tex and r"$\lambda$" in tex
    # provenance: digests of the evaluated files, the settings, both conventions' definitions
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    for digest in manifest["inputs"].values():
        assert digest in markdown and digest in html
    assert "evaluate: ood\\_groups" in markdown and "OpenOOD v1.5" in markdown
    assert "matplotlib" in html and "jinja2" in html
    # a folder that is not an evaluate folder: one line, exit 2 (an explicit --out: the next tests)
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "results.json" in bad.output


def test_report_without_the_score_files(score_files, tmp_path, workspace):
    """A results folder whose score files are gone still gives the table (and says what is missing)."""
    request = EvaluateRequest(score_files["id"], [("ssb", score_files["ssb"])], lambdas=[0.0, 1.0])
    evaluate(request, workspace).artifact.export(tmp_path / "results")
    first = runner.invoke(app, ["report", str(tmp_path / "results"), "--out", str(tmp_path / "rep")])
    assert first.exit_code == 0 and (tmp_path / "rep" / "figures" / "roc.png").is_file(), first.output
    score_files["ssb"].unlink()  # the same --out again: the earlier report's ROC curves must not stay
    result = runner.invoke(app, ["report", str(tmp_path / "results"), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "rep" / "report.md").read_text()
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert check_markdown_against_results(markdown, results) == 2 * 1 * 1 * 4
    assert "not found" in markdown
    assert {p.name for p in (tmp_path / "rep" / "figures").iterdir()} == {"lambda_curve.png"}


# --- the report of a toy run: CAM grid with masks, and a real browser -------------------------


@pytest.fixture(scope="module")
def toy_run(toy_demo, tmp_path_factory):
    """The shared small `negalign demo` run (tests/conftest.py), then `negalign report` on its
    results folder, as the Makefile pipelines call it, from another working folder."""
    demo, done = toy_demo
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path_factory.mktemp("toy-report")
    (root / "demo").symlink_to(demo)
    with in_process(cwd=root, NEGALIGN_CACHE=str(root / "cache")):  # in-process, from that folder
        report = runner.invoke(app, ["report", str(root / "demo" / "results"), "--out", str(root / "report")])
    assert report.exit_code == 0, report.output[-3000:]
    return root


@pytest.mark.slow
def test_toy_report_content(toy_run):
    out = toy_run / "report"
    results = json.loads((toy_run / "demo" / "results" / "results.json").read_text())
    markdown = (out / "report.md").read_text()
    assert check_markdown_against_results(markdown, results) == 2 * 4 * 7 * 4  # 3 OOD sets and the mean
    html = (out / "report.html").read_text()
    check_self_contained(html, out)
    assert {p.name for p in (out / "figures").iterdir()} == {
        "lambda_curve.png",
        "roc.png",
        "score_hist.png",
        "cam_grid.png",
    }
    assert "Left out" not in markdown  # everything was found
    assert "negalign-toy" in markdown  # the model, and its fingerprint
    fingerprint = json.loads((toy_run / "demo" / "scores" / "id" / "manifest.json").read_text())["inputs"][
        "model"
    ]
    assert fingerprint in html
    # the demo wrote the same tables into its own report
    demo_markdown = (toy_run / "demo" / "report" / "report.md").read_text()
    assert parse_markdown_tables(demo_markdown) == parse_markdown_tables(markdown)


@pytest.mark.slow
def test_toy_cam_grid_rows(toy_run, monkeypatch):
    """The grid's cells: ranked by the score they name, the predicted class and its cosine as the
    cam stage stored them, and the true mask where the toy world has an object."""
    from negalign_cli.inputs.masks import find_mask
    from negalign_cli.stages.report import _cam_rows, load_score_sets

    monkeypatch.chdir(toy_run / "demo")
    results_dir = toy_run / "demo" / "results"
    results = json.loads((results_dir / "results.json").read_text())
    manifest = json.loads((results_dir / "manifest.json").read_text())
    sets = load_score_sets(results, manifest, results_dir)
    assert [s.name for s in sets] == ["ID", "spurious", "spurious_object", "nonspurious"]
    assert all(s.cam_folder is not None and s.problem is None for s in sets)
    rows, notes = _cam_rows(results, sets, cells=3, size=64)
    assert not notes
    assert [title for title, _ in rows] == [
        f"{name}: {kind} ID-like"
        for name in ("ID", "spurious", "spurious_object", "nonspurious")
        for kind in ("most", "least")
    ]
    for (title, cells), entry in zip(rows, [s for s in sets for _ in (0, 1)], strict=True):
        assert len(cells) == 3
        scores = [float(c.caption.split(": ", 1)[1].split("\n")[0]) for c in cells]
        assert scores == sorted(scores, reverse="most" in title)
        meta = pd.read_parquet(entry.cam_folder / "cam.parquet")
        for cell in cells:
            lines = cell.caption.split("\n")
            assert lines[1].startswith("predicted class: ") and lines[2].startswith("cosine to it: ")
            assert lines[1].removeprefix("predicted class: ") in set(meta["pred_name"])
            assert cell.pixels.shape == (64, 64, 3) and cell.cam.ndim == 2
            if entry.name == "spurious":  # background-only images: an empty mask
                assert cell.mask is None or not cell.mask.any()
            else:
                assert cell.mask is not None and 0.02 < cell.mask.mean() < 0.8
    # the mask finder: the toy world's metadata.csv (masks in their own tree beside the splits)
    image = toy_run / "demo" / "toy" / "id" / "images" / "star" / "00000.png"
    found = find_mask(image)
    assert (
        found is not None
        and found.resolve() == (toy_run / "demo" / "toy" / "masks" / "id" / "star" / "00000.png").resolve()
    )
    assert find_mask(toy_run / "demo" / "report" / "figures" / "roc.png") is None


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def open_in_chromium(page: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """Load a page in headless Chromium: (the DOM after scripts ran, console messages)."""
    assert CHROMIUM is not None
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0"]
    base += ["--hide-scrollbars", "--window-size=1280,1400", "--no-first-run", "--disable-extensions"]
    action = ["--dump-dom"] if screenshot is None else [f"--screenshot={screenshot}"]
    done = subprocess.run(
        [*base, *action, page.resolve().as_uri()], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
)
def test_report_in_a_real_browser(toy_run, tmp_path):
    # the check can fail: a page with a script error and a console error is caught
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    _, console = open_in_chromium(broken)
    assert any("boom" in line for line in console) and any("notDefined" in line for line in console)

    page = toy_run / "report" / "report.html"
    dom, console = open_in_chromium(page)
    assert console == []
    assert dom.count('<table class="methods"') == 2 and "NegAlign (λ=" in dom
    shot = tmp_path / "report.png"
    _, console = open_in_chromium(page, shot)
    assert console == []
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1400, 1280)
    assert (pixels < 100).mean() > 0.005 and pixels.std() > 10  # text and table drawn, not a blank page


def test_report_finds_relative_paths_and_refuses_changed_files(score_files, tmp_path, monkeypatch):
    """results.json records paths as given (relative to where evaluate ran): the report finds them
    from elsewhere through the results folder's parents, and leaves out a file whose bytes changed."""
    work = tmp_path / "work"
    (work / "scores").mkdir(parents=True)
    for name in ("id", "ssb"):
        shutil.copy(score_files[name], work / "scores" / score_files[name].name)
    monkeypatch.chdir(work)
    args = ["evaluate", "--id", "scores/id.parquet", "--ood", "ssb=scores/ssb.parquet", "--compare"]
    done = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c"), "--out", "results"])
    assert done.exit_code == 0, done.output
    assert json.loads((work / "results" / "results.json").read_text())["id"]["file"] == "scores/id.parquet"
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(app, ["report", "work/results", "--out", "rep"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "rep" / "figures" / "roc.png").is_file()
    assert "not found" not in (tmp_path / "rep" / "report.md").read_text()
    shutil.copy(score_files["ninco"], work / "scores" / "ssb.parquet")  # other bytes under the same name
    done = runner.invoke(app, ["report", "work/results", "--out", "rep2"])
    assert done.exit_code == 0, done.output
    markdown = (tmp_path / "rep2" / "report.md").read_text()
    assert "is not the file that was evaluated" in markdown
    assert not (tmp_path / "rep2" / "figures" / "roc.png").exists()


def test_find_mask_layouts(tmp_path):
    from PIL import Image

    from negalign_cli.inputs.masks import find_mask

    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    split = tmp_path / "split"
    for relative in ("images/a/0.png", "masks/a/0.png", "elsewhere/0.png"):
        (split / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(split / relative)
    # no metadata.csv: the images/ → masks/ convention
    assert find_mask(split / "images" / "a" / "0.png") == split / "masks" / "a" / "0.png"
    assert find_mask(split / "elsewhere" / "0.png") is None
    # a metadata.csv with a mask column wins (any layout the toy generator chooses)
    other = tmp_path / "other"
    shutil.copytree(split, other)
    pd.DataFrame({"path": ["images/a/0.png"], "mask": ["elsewhere/0.png"]}).to_csv(
        other / "metadata.csv", index=False
    )
    assert find_mask(other / "images" / "a" / "0.png") == other / "elsewhere" / "0.png"


def _cam_folder(folder: Path, seed: int) -> str:
    """A CAM folder whose manifest lists its cams.npy and cam.parquet; returns cam.parquet's sha256."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "cams.npy", np.random.default_rng(seed).random((4, 2, 2)))
    pd.DataFrame({"pred_name": [f"class {seed}"] * 4}).to_parquet(folder / "cam.parquet")
    digests = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("cams.npy", "cam.parquet")}
    outputs = {name: {"sha256": d, "bytes": (folder / name).stat().st_size} for name, d in digests.items()}
    (folder / "manifest.json").write_text(json.dumps({"stage": "cam", "outputs": outputs}))
    return digests["cam.parquet"]


def test_the_cam_grid_uses_only_the_cam_outputs_that_were_scored(tmp_path):
    """A CAM folder is used only when its files are those its manifest lists and its cam.parquet the
    one the scores were computed from. Before: `cam` run again into the folder, or another set's
    folder named by the manifest beside gathered score files, captioned and overlaid other CAMs."""
    from negalign_cli.stages.report import _lists_output, _scored_cams

    scored = _cam_folder(tmp_path / "cam", 1)
    other = _cam_folder(tmp_path / "other", 2)
    manifest = {"images_dir": str(tmp_path / "cam"), "inputs": {"cam": scored}}
    folder, cam_manifest, problem = _scored_cams(manifest, [tmp_path], None)
    assert folder == tmp_path / "cam" and cam_manifest["stage"] == "cam" and problem is None
    # `score --cam-dir`: the CAM folder is recorded apart from the embeddings' folder
    moved = {"images_dir": str(tmp_path / "emb"), "cam_dir": str(tmp_path / "cam"), "inputs": {"cam": scored}}
    assert _scored_cams(moved, [tmp_path], None)[0] == tmp_path / "cam"
    # another set's CAM outputs (the manifest of another score file)
    _, _, problem = _scored_cams({**manifest, "images_dir": str(tmp_path / "other")}, [tmp_path], None)
    assert (
        problem == f"the CAM outputs in {tmp_path / 'other'} are not the ones its scores were computed from"
    )
    assert other != scored
    # the folder's CAMs made again since (its manifest now lists the new files)
    shutil.rmtree(tmp_path / "cam")
    _cam_folder(tmp_path / "cam", 3)
    assert _scored_cams(manifest, [tmp_path], None)[0] is None
    # a file edited under its manifest, and a folder without one
    _cam_folder(tmp_path / "cam", 1)
    np.save(tmp_path / "cam" / "cams.npy", np.zeros((4, 2, 2)))
    assert "are not the ones" in str(_scored_cams(manifest, [tmp_path], None)[2])
    (tmp_path / "cam" / "manifest.json").unlink()
    assert "have no manifest to check them against" in str(_scored_cams(manifest, [tmp_path], None)[2])
    assert _scored_cams({"inputs": {}}, [tmp_path], None) == (None, {}, None)  # none recorded: none found
    assert _lists_output({"outputs": {"scores.parquet": {"sha256": "ab"}}}, "ab")
    assert not _lists_output({"outputs": {"scores.parquet": {"sha256": "ab"}}}, "cd")
    assert not _lists_output({"outputs": ["ab"]}, "ab")


@pytest.mark.slow
def test_gathered_score_files_do_not_borrow_a_neighbours_cams(toy_run, tmp_path):
    """Score files copied into one folder beside one set's manifest.json: the other set's rows get
    no CAM cells (before: the ID set's CAMs and captions over the OOD images) and a note says why."""
    demo = toy_run / "demo"
    folder = tmp_path / "collected"
    folder.mkdir()
    for name in ("scores.parquet", "manifest.json"):
        shutil.copy(demo / "scores" / "id" / name, folder / name)
    shutil.copy(demo / "scores" / "ood_nonspurious" / "scores.parquet", folder / "nons.parquet")
    cache = ["--cache-dir", str(tmp_path / "c")]
    argv = ["evaluate", "--id", str(folder / "scores.parquet"), "--ood", f"nons={folder / 'nons.parquet'}"]
    assert cli(*argv, "--out", str(tmp_path / "res"), *cache).exit_code == 0
    done = cli("report", str(tmp_path / "res"), "--out", str(tmp_path / "rep"), *cache)
    assert done.exit_code == 0, done.output
    markdown = (tmp_path / "rep" / "report.md").read_text().replace("\\_", "_")  # markdown's escapes
    assert f"nons: the manifest.json beside {folder / 'nons.parquet'} is another score file's" in markdown
    assert "ID: " not in markdown.split("## Left out")[1].split("##")[0]  # the ID set's CAMs are its own


def test_a_missing_score_file_leaves_the_others_rows_as_evaluate_kept_them(score_files, tmp_path, workspace):
    """The CAM grid ranks each found set's rows as evaluate kept them even when another set's file
    is gone. Before: with one file missing, every set kept its dropped rows (NaN scores ranked)."""
    from negalign_cli.stages.report import load_score_sets

    frame = pd.read_parquet(score_files["ssb"])
    frame.loc[[3, 50, 77], "s_neglabel_star"] = np.nan
    frame.to_parquet(score_files["ssb"], index=False)
    oods = [("ssb", score_files["ssb"]), ("ninco", score_files["ninco"])]
    request = EvaluateRequest(score_files["id"], oods, lambdas=[0.0, 1.0], drop_nonfinite=True)
    result = evaluate(request, workspace)
    results = json.loads(result.artifact.file("results.json").read_text())
    assert results["ood"]["ssb"]["n"] == len(frame) - 3
    score_files["ninco"].unlink()
    sets = load_score_sets(results, result.artifact.manifest, tmp_path)
    found = {s.name: s for s in sets}
    assert found["ninco"].frame is None and "not found" in str(found["ninco"].problem)
    assert len(found["ssb"].frame) == len(frame) - 3 and found["ssb"].frame["s_neglabel_star"].notna().all()
    assert len(found["ID"].frame) == results["id"]["n"]
