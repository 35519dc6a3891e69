"""Fault suite: `evaluate`, `report` and the Python API refuse inputs that do not belong together
(reserved or clashing set names, an edited results folder, scores too large to combine, images
the API cannot read as the CLI does) with one clear error, never a silent or crashing result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.errors import NegalignError
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages.evaluation import EvaluateRequest, evaluate
from tests.faults.helpers import cli, one_line_error
from tests.helpers.synthetic import write_scores

# numbers, tables and errors: evaluate writes blank figures here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("placeholder_figures")


@pytest.fixture()
def scores(tmp_path):
    return {
        "id": write_scores(tmp_path / "id.parquet", 120, 0, shift=0.3),
        "near": write_scores(tmp_path / "near.parquet", 90, 1, shift=0.1),
        "far": write_scores(tmp_path / "far.csv", 80, 2, shift=-0.2),
    }


def _evaluate(tmp_path: Path, *args: str):
    return cli("evaluate", *args, "--cache-dir", str(tmp_path / "c"), "-q")


# --- item 3: reserved and clashing OOD set names, an OOD file that is the ID file ----------------


@pytest.mark.parametrize("name", ["ID", "id", "Id", "mean", "MEAN", "Mean"])
def test_reserved_ood_names_are_refused(scores, tmp_path, name):
    """`--ood ID=FILE` used to replace the ID set (every method 50% AUROC, FPR 100%) and `--ood
    mean=FILE` to make a second "mean" column; both are refused, in any case."""
    done = _evaluate(tmp_path, "--id", str(scores["id"]), "--ood", f"{name}={scores['near']}")
    one_line_error(done, f"OOD set name {name!r} is reserved")
    done = _evaluate(
        tmp_path,
        "--id",
        str(scores["id"]),
        "--ood",
        f"near={scores['near']}",
        "--ood",
        f"{name}={scores['far']}",
    )
    one_line_error(done, "is reserved")
    assert not (tmp_path / "c" / "artifacts" / "evaluate").exists()


def test_reserved_names_through_the_stage_and_for_groups(scores, workspace):
    """The stage checks the names itself (library callers build EvaluateRequest directly), and
    an --ood-group may take neither a reserved name nor a set's, in any case."""
    with pytest.raises(NegalignError, match="reserved"):
        evaluate(EvaluateRequest(scores["id"], [("ID", scores["near"])]), workspace)
    pair = [("near", scores["near"]), ("far", scores["far"])]
    for group, match in (("Mean", "reserved"), ("id", "reserved"), ("NEAR", "already an OOD set name")):
        with pytest.raises(NegalignError, match=match):
            evaluate(EvaluateRequest(scores["id"], pair, groups=[(group, ["near", "far"])]), workspace)
    with pytest.raises(NegalignError, match="defined twice"):
        evaluate(EvaluateRequest(scores["id"], pair, groups=[("g", ["near"]), ("G", ["far"])]), workspace)


def test_duplicate_ood_names_are_refused(scores, tmp_path, workspace):
    done = _evaluate(
        tmp_path,
        "--id",
        str(scores["id"]),
        "--ood",
        f"near={scores['near']}",
        "--ood",
        f"Near={scores['far']}",
    )
    one_line_error(done, "differ only in case")
    with pytest.raises(NegalignError, match="given twice"):
        evaluate(EvaluateRequest(scores["id"], [("a", scores["near"]), ("a", scores["far"])]), workspace)


def test_an_ood_file_with_the_id_files_content_is_warned_about(scores, tmp_path, workspace):
    copy = tmp_path / "copy-of-id.parquet"
    shutil.copy(scores["id"], copy)  # another path, the same bytes
    reporter = RecordingReporter()
    request = EvaluateRequest(
        scores["id"], [("near", scores["near"]), ("oops", copy), ("again", scores["near"])]
    )
    evaluate(request, workspace, reporter)
    warnings = [m for kind, m in reporter.messages if kind == "warn"]
    assert any("--ood oops" in m and "same content as the ID file" in m for m in warnings), warnings
    assert any("--ood again" in m and "same content as --ood near" in m for m in warnings), warnings
    assert len(warnings) == 2
    done = _evaluate(tmp_path, "--id", str(scores["id"]), "--ood", f"oops={copy}")
    assert done.exit_code == 0, done.output
    assert "warning:" in done.output and "same content as the ID file" in done.output


# --- item 7: report verifies the evaluate folder before rendering ----------------------------------


def _results_folder(scores, tmp_path) -> Path:
    done = cli(
        "evaluate",
        "--id",
        str(scores["id"]),
        "--ood",
        f"near={scores['near']}",
        "--compare",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "results"),
    )
    assert done.exit_code == 0, done.output
    return tmp_path / "results"


def test_report_refuses_an_edited_results_json(scores, tmp_path):
    results = _results_folder(scores, tmp_path)
    assert cli("report", str(results), "--out", str(tmp_path / "ok"), "-q").exit_code == 0
    data = json.loads((results / "results.json").read_text())
    data["ood"]["near"]["methods"]["MCM"]["metrics"]["neglabel"]["auroc"] = 0.999  # a better number
    (results / "results.json").write_text(json.dumps(data, indent=2))
    done = cli("report", str(results), "--out", str(tmp_path / "edited"), "-q")
    line = one_line_error(done, "does not match its manifest.json")
    assert "results.json" in line and "rerun `negalign evaluate" in line
    assert not (tmp_path / "edited" / "report.html").exists()


def test_report_refuses_edits_of_the_same_size_and_a_missing_or_foreign_manifest(scores, tmp_path):
    results = _results_folder(scores, tmp_path)
    text = (results / "results.json").read_text()
    index = text.index('"auroc": 0.') + len('"auroc": 0.')
    digit = text[index]
    (results / "results.json").write_text(text[:index] + ("1" if digit != "1" else "2") + text[index + 1 :])
    one_line_error(cli("report", str(results), "-q"), "results.json does not match its digest")
    (results / "results.json").write_text(text)
    manifest = json.loads((results / "manifest.json").read_text())
    (results / "metrics.csv").write_text("ood,method\n")  # another output of the folder, edited
    one_line_error(cli("report", str(results), "-q"), "metrics.csv has")
    (results / "manifest.json").unlink()
    one_line_error(cli("report", str(results), "-q"), "has no manifest.json")
    # a manifest that vouches for the files but is another stage's
    from negalign_cli.hashing import sha256_file

    manifest["stage"] = "score"
    manifest["outputs"] = {
        n: {"sha256": sha256_file(results / n), "bytes": (results / n).stat().st_size}
        for n in ("results.json", "metrics.csv")
    }
    (results / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(cli("report", str(results), "-q"), "not of `evaluate`")


# --- item 13: finite scores too large to combine --------------------------------------------------


def _with(path: Path, out: Path, **cells) -> Path:
    """A copy of a score file with some cells set: ``column=[(row, value), ...]``."""
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    for column, edits in cells.items():
        for row, value in edits:
            frame.loc[row, column] = value
    frame.to_parquet(out, index=False)
    return out


def test_an_overflowing_final_score_is_one_clear_error(scores, tmp_path):
    """1e308 + λ·1e308 is inf: `evaluate` used to crash ("unexpected ValueError: Input contains
    infinity"); it names the file, the columns and the λ, and --drop-nonfinite leaves the row out."""
    huge = _with(
        scores["near"], tmp_path / "huge.parquet", s_neglabel_star=[(3, 1e308)], p_align=[(3, 1e308)]
    )
    done = _evaluate(tmp_path, "--id", str(scores["id"]), "--ood", f"huge={huge}")
    line = one_line_error(done, f"huge ({huge}): S_final = s_neglabel_star + λ·p_align overflows to inf")
    assert "1 row(s)" in line and "row 3" in line and "--drop-nonfinite" in line
    assert "at λ = 1, 2, 5, 10 (" in line  # not at 0 or 0.5: 1e308 + 0.5·1e308 is finite
    # at λ = 0 alone nothing overflows: nothing is refused
    done = _evaluate(tmp_path, "--id", str(scores["id"]), "--ood", f"huge={huge}", "--lambda", "0")
    assert done.exit_code == 0, done.output
    # the row-policy: left out with a warning, counted, and the report draws from the same rows
    out = tmp_path / "results"
    done = _evaluate(
        tmp_path, "--id", str(scores["id"]), "--ood", f"huge={huge}", "--drop-nonfinite", "--out", str(out)
    )
    assert done.exit_code == 0, done.output
    assert "left out 1 row(s) whose S_final" in done.output
    results = json.loads((out / "results.json").read_text())
    assert results["ood"]["huge"]["n"] == 89 and results["ood"]["huge"]["dropped_nonfinite"] == 1
    reported = cli("report", str(out), "-q")
    assert reported.exit_code == 0, reported.output
    assert (out / "report" / "figures" / "roc.png").is_file()


def test_an_overflow_in_the_id_file_and_under_m3(scores, tmp_path):
    huge_id = _with(
        scores["id"], tmp_path / "huge-id.parquet", s_neglabel_star=[(0, -1e308)], p_align=[(0, -1e308)]
    )
    done = _evaluate(tmp_path, "--id", str(huge_id), "--ood", f"near={scores['near']}", "--compare")
    one_line_error(done, f"ID ({huge_id}): S_final")
    # M3's z-scores combine safely, but its statistics must not overflow: an infinite std made
    # every z-score 0 (every λ scored 50% AUROC, silently)
    out = tmp_path / "m3"
    args = ("--id", str(huge_id), "--ood", f"near={scores['near']}", "--scale-stabilize", "--lambda", "0,1")
    done = _evaluate(tmp_path, *args, "--out", str(out))
    assert done.exit_code == 0, done.output
    results = json.loads((out / "results.json").read_text())
    calibration = results["calibration"]
    id_frame = pd.read_parquet(huge_id)
    for column in ("s_neglabel_star", "p_align"):
        expected = id_frame[column].to_numpy() / 1e308
        assert calibration[column]["mean"] == pytest.approx(expected.mean() * 1e308)
        assert calibration[column]["std"] == pytest.approx(expected.std() * 1e308)
    assert "Infinity" not in (out / "results.json").read_text()
    auroc = results["ood"]["near"]["lambda_sweep"]["1.0"]["metrics"]["neglabel"]["auroc"]
    from negalign_cli.compute.evaluation import final_score
    from negalign_cli.compute.metrics import ood_metrics

    near = pd.read_parquet(scores["near"])
    recomputed = ood_metrics(
        final_score(id_frame["s_neglabel_star"].to_numpy(), id_frame["p_align"].to_numpy(), 1.0, calibration),
        final_score(near["s_neglabel_star"].to_numpy(), near["p_align"].to_numpy(), 1.0, calibration),
    )
    assert auroc == pytest.approx(recomputed.auroc) and auroc != 0.5


@pytest.mark.parametrize(
    ("std", "message"),
    [("inf", "not finite"), ("nan", "not finite"), ("-1", "negative standard deviation")],
)
def test_calibration_files_that_cannot_standardise(scores, tmp_path, std, message):
    calibration = tmp_path / "calibration.json"
    star = {"mean": 0.5, "std": float(std)}
    calibration.write_text(
        json.dumps({"calibration": {"s_neglabel_star": star, "p_align": {"mean": 0, "std": 1}}})
    )
    done = _evaluate(
        tmp_path,
        "--id",
        str(scores["id"]),
        "--ood",
        f"near={scores['near']}",
        "--calibration",
        str(calibration),
    )
    line = one_line_error(done, f"M3 statistics ({calibration})")
    assert message in line and "s_neglabel_star std" in line


@pytest.mark.real_figures
def test_huge_but_finite_scores_of_other_methods_are_evaluated_and_drawn(scores, tmp_path):
    """±1e308 in a method's column (not combined): metrics, statistics and histograms stay finite
    (the histogram's range overflowed: "unexpected ValueError: `bins` must increase")."""
    huge = _with(
        scores["near"],
        tmp_path / "huge.parquet",
        s_mcm=[(0, 1e308), (1, -1e308)],
        s_neglabel_star=[(2, 1.5e308), (3, -1.5e308)],
    )
    out = tmp_path / "results"
    done = _evaluate(
        tmp_path, "--id", str(scores["id"]), "--ood", f"huge={huge}", "--compare", "--out", str(out)
    )
    assert done.exit_code == 0, done.output
    assert "Warning" not in done.output
    text = (out / "results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    results = json.loads(text)
    assert np.isfinite(results["statistics"]["ood:huge"]["s_mcm_std"])
    assert (out / "score_hist.png").stat().st_size > 0


# --- item 6: the API reads images as the CLI does, and names the argument it cannot use ------------

API_NEGATIVES = ["ocean", "forest", "sand", "teapot", "lamp", "cup"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from negalign_cli import CLIPNegAlign

    model = CLIPNegAlign(
        train_dataset=["cat", "dog"],
        arch="negalign-tiny-test",
        device="cpu",
        neg_nouns=API_NEGATIVES,
        use_role_aware_negatives=False,
        groups=1,
        batch_size=3,
        cache_dir=tmp_path_factory.mktemp("api") / "c",
    )
    yield model
    model.close()


def test_a_16_bit_image_is_scaled_on_every_route(api, tmp_path):
    """A 16-bit PIL image was clipped by ``convert("RGB")`` (nearly white) while the same file was
    scaled by ``load_rgb``; a file, its PIL image and its pixel array now give the same pixels as
    the CLI's reader, and the same scores."""
    from PIL import Image

    from negalign_cli.inputs.datasets import load_rgb

    rng = np.random.default_rng(0)
    path = tmp_path / "gray16.png"
    Image.fromarray(rng.integers(0, 65536, size=(40, 48), dtype=np.uint16)).save(path)
    image = Image.open(path)
    assert image.mode.startswith("I;16")
    cli_pixels = api.clip_preprocess.transform(load_rgb(str(path)))  # what `embed images` feeds the model
    clipped = api.clip_preprocess.transform(Image.open(path).convert("RGB"))
    assert not torch_equal(cli_pixels, clipped)  # the two conversions really differ on this image
    for route in (image, str(path), path, np.asarray(image)):
        assert torch_equal(api.clip_preprocess(route), cli_pixels), type(route)
    scores = api.detection_scores([image, str(path), np.asarray(image), np.asarray(Image.open(path))])
    np.testing.assert_allclose(scores, scores[0], rtol=1e-6)  # batches of 3: float rounding only
    assert api.detection_score(None, orig_image=image) == pytest.approx(scores[0], rel=1e-6)
    assert api.detection_score(np.asarray(image)) == pytest.approx(scores[0], rel=1e-6)
    # 16-bit colour (PIL holds none) is scaled by the same rule as 16-bit gray
    gray = np.asarray(image)
    assert torch_equal(api.clip_preprocess(np.stack([gray] * 3, axis=-1)), cli_pixels)


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def _bad_inputs():
    import torch

    return [
        ("uint8 tensor", torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "torch.uint8 tensor"),
        ("wrong size", torch.zeros(1, 3, 16, 16), "shape (1, 3, 16, 16)"),
        ("wrong channels", torch.zeros(2, 1, 32, 32), "shape (2, 1, 32, 32)"),
        ("5-D", torch.zeros(1, 1, 3, 32, 32), "shape (1, 1, 3, 32, 32)"),
        ("NaN pixels", torch.full((1, 3, 32, 32), float("nan")), "NaN or infinite"),
        ("float array", np.zeros((32, 32, 3), np.float32), "dtype float32"),
        ("channels first array", np.zeros((3, 32, 32), np.uint8), "shape 3×32×32"),
        ("two channels", np.zeros((32, 32, 2), np.uint8), "shape 32×32×2"),
        ("a number", 5, "type int"),
        ("a list of numbers", [1, 2], "type int"),
        ("a missing file", "no-such-image.png", "not found"),
        ("mixed sizes", [torch.zeros(3, 32, 32), torch.zeros(3, 16, 16)], "different shapes"),
        ("a loader of arrays", iter([np.zeros((2, 3, 32, 32), np.float32)]), "type ndarray"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_api_inputs_it_cannot_use_raise_one_error_naming_the_argument(api, case, tmp_path):
    name, value, text = _bad_inputs()[case]
    calls = [("batch=", lambda v: api.detection_scores(v)), ("id_images=", lambda v: api.fit_calibration(v))]
    if name not in ("a list of numbers", "mixed sizes", "a loader of arrays"):
        calls += [
            ("img_tensor=", lambda v: api.detection_score(v)),
            ("orig_image=", lambda v: api.detection_score(None, orig_image=v)),
        ]
    for argument, call in calls:
        if name == "a loader of arrays":
            value = iter([np.zeros((2, 3, 32, 32), np.float32)])
        with pytest.raises(NegalignError) as raised:
            call(value)
        message = str(raised.value)
        assert message.startswith(argument) and text in message, (name, argument, message)
        assert "--" not in message, message  # the API's words, not the CLI's flags
    (tmp_path / "not-an-image.png").write_bytes(b"not a PNG")
    with pytest.raises(NegalignError, match=r"^batch=: cannot read image"):
        api.detection_scores([str(tmp_path / "not-an-image.png")])


@pytest.mark.parametrize(
    ("calibration", "text"),
    [
        ({"s_neglabel_star": {"mean": 0.0}}, "calibration= holds no mean/std"),
        ({"s_neglabel_star": {"mean": 0, "std": 1}, "p_align": {"mean": "x", "std": 1}}, "no mean/std"),
        ([1, 2], "calibration= holds no mean/std"),
        (
            {"s_neglabel_star": {"mean": 0, "std": float("inf")}, "p_align": {"mean": 0, "std": 1}},
            "(calibration=) hold values that are not finite",
        ),
        (
            {"calibration": {"s_neglabel_star": {"mean": 0, "std": -1}, "p_align": {"mean": 0, "std": 1}}},
            "(calibration=) hold a negative standard deviation",
        ),
        ("no-such-calibration.json", "calibration='no-such-calibration.json'"),
    ],
)
def test_malformed_calibration_is_refused_naming_the_argument(calibration, text):
    """calibration= is read before any weight is loaded; a malformed one used to raise KeyError,
    TypeError or ValueError, or (inf, a negative std) to z-score silently wrong."""
    from negalign_cli import CLIPNegAlign

    with pytest.raises(NegalignError) as raised:
        CLIPNegAlign(train_dataset=["cat"], arch="negalign-tiny-test", device="cpu", calibration=calibration)
    assert text in str(raised.value)


def test_a_good_calibration_and_a_results_json_are_taken(api, tmp_path, scores):
    from negalign_cli import CLIPNegAlign

    stats = {"s_neglabel_star": {"mean": 0.5, "std": 0.1}, "p_align": {"mean": 0.0, "std": 0.2}}
    assert CLIPNegAlign._read_calibration(stats) == (stats, None)
    assert CLIPNegAlign._read_calibration({"calibration": {**stats, "source": "x"}}) == (stats, None)
    (tmp_path / "results.json").write_text(json.dumps({"calibration": stats, "ood": {}}))
    assert CLIPNegAlign._read_calibration(tmp_path / "results.json") == (stats, None)
    # one calibration serves every group seed; a results.json's per-seed statistics go seed by seed
    assert CLIPNegAlign._read_calibration(stats, [0, 1]) == (stats, {0: stats, 1: stats})
    other = {"s_neglabel_star": {"mean": 0.7, "std": 0.3}, "p_align": stats["p_align"]}
    seeded = {"calibration": stats, "calibration_by_seed": {"0": stats, "1": other}}
    (tmp_path / "seeded.json").write_text(json.dumps(seeded))
    assert CLIPNegAlign._read_calibration(tmp_path / "seeded.json", [0, 1]) == (stats, {0: stats, 1: other})


def test_the_apis_final_score_never_overflows_silently(api):
    """The API combines S* + λ·P_align too: M3 statistics that carry finite scores past float64
    raise an error naming the argument, as `evaluate` does, never an inf score; λ must be finite."""
    import torch

    from negalign_cli import CLIPNegAlign

    with pytest.raises(NegalignError, match="lambda_bg= must be a finite number"):
        CLIPNegAlign(train_dataset=["cat"], arch="negalign-tiny-test", device="cpu", lambda_bg=float("nan"))
    pixels = torch.zeros(2, 3, 32, 32)
    previous = (api.lambda_bg, api.calibration, api.use_scale_stabilization)
    try:
        assert np.isfinite(api.detection_scores(pixels)).all()
        api.use_scale_stabilization = True
        api.calibration = {
            "s_neglabel_star": {"mean": 0.0, "std": 1e-320},
            "p_align": {"mean": 0.0, "std": 1e-320},
        }
        with pytest.raises(NegalignError, match="calibration="):
            api.detection_scores(pixels)
    finally:
        api.lambda_bg, api.calibration, api.use_scale_stabilization = previous


def test_a_missing_calibration_file_is_one_line(scores, tmp_path):
    done = _evaluate(
        tmp_path,
        "--id",
        str(scores["id"]),
        "--ood",
        f"near={scores['near']}",
        "--calibration",
        str(tmp_path / "nope.json"),
    )
    one_line_error(done, "--calibration file not found")


def test_the_same_bytes_under_another_format_are_read_again(scores, tmp_path):
    """The cache key names how each score file is read: tab-separated bytes evaluated as
    ``.tsv`` and then given again under ``.csv`` names are read as CSV (one column, no scores:
    refused), not served the TSV evaluation's results. Before: exit 0 from the cache."""
    tsv = {}
    for name in ("id", "near"):
        frame = pd.read_parquet(scores[name])
        tsv[name] = tmp_path / f"{name}.tsv"
        frame.to_csv(tsv[name], sep="\t", index=False)
    first = _evaluate(
        tmp_path, "--id", str(tsv["id"]), "--ood", f"near={tsv['near']}", "--out", str(tmp_path / "a")
    )
    assert first.exit_code == 0, first.output
    csv = {name: shutil.copy(path, tmp_path / f"{name}-copy.csv") for name, path in tsv.items()}
    again = _evaluate(
        tmp_path, "--id", str(csv["id"]), "--ood", f"near={csv['near']}", "--out", str(tmp_path / "b")
    )
    one_line_error(again, "no negalign score columns")
    assert not (tmp_path / "b" / "results.json").exists()


def test_a_copy_of_the_score_files_is_evaluated_under_its_own_paths(scores, tmp_path):
    """The same bytes at other paths: results.json names the files this run was given, and the
    report finds them after the first files are gone. Before: a cache hit whose results.json named
    the first run's files; its report left out the ROC curves and histograms ("not found")."""
    copies = tmp_path / "copies"
    copies.mkdir()
    moved = {name: shutil.copy(path, copies / Path(path).name) for name, path in scores.items()}

    def args(files):
        return ["--id", str(files["id"]), "--ood", f"near={files['near']}", "--ood", f"far={files['far']}"]

    assert _evaluate(tmp_path, *args(scores), "--out", str(tmp_path / "first")).exit_code == 0
    second = _evaluate(tmp_path, *args(moved), "--out", str(tmp_path / "second"))
    assert second.exit_code == 0, second.output
    results = json.loads((tmp_path / "second" / "results.json").read_text())
    assert results["id"]["file"] == str(moved["id"]) and results["ood"]["far"]["file"] == str(moved["far"])
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    assert results["ood"]["near"]["methods"] == first["ood"]["near"]["methods"]  # the same numbers
    for path in scores.values():
        Path(path).unlink()
    report = cli(
        "report",
        str(tmp_path / "second"),
        "--out",
        str(tmp_path / "report"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert report.exit_code == 0 and "not found" not in report.output, report.output
    assert (tmp_path / "report" / "figures" / "roc.png").is_file()


def test_evaluate_out_into_the_folder_of_its_score_files_keeps_them(scores, tmp_path):
    """`evaluate --out` the folder holding its ID file `scores.parquet` (a name stages write) used
    to delete it after reading it ("left by an earlier run"); it is refused in one line."""
    folder = tmp_path / "collected"
    folder.mkdir()
    id_file = shutil.copy(scores["id"], folder / "scores.parquet")
    near = shutil.copy(scores["near"], folder / "near.parquet")
    done = _evaluate(tmp_path, "--id", str(id_file), "--ood", f"near={near}", "--out", str(folder))
    one_line_error(done, "holds scores.parquet, an input of this evaluate")
    assert sorted(p.name for p in folder.iterdir()) == ["near.parquet", "scores.parquet"]
