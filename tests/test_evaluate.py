from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from negalign_cli.cli.app import app
from negalign_cli.compute.evaluation import final_score, fit_calibration
from negalign_cli.compute.metrics import ood_metrics
from negalign_cli.errors import NegalignError
from negalign_cli.stages.evaluation import EvaluateRequest, evaluate, parse_lambdas, parse_ood
from negalign_cli.stages.score_files import write_scores as write_parquet_with_metadata
from tests.helpers.synthetic import write_scores

runner = CliRunner()


@pytest.fixture()
def files(tmp_path):
    return {
        "id": write_scores(tmp_path / "id.parquet", 300, 0, shift=0.3),
        "near": write_scores(tmp_path / "near.parquet", 200, 1, shift=0.1),
        "far": write_scores(tmp_path / "far.csv", 250, 2, shift=-0.2),
    }


def load(path):
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)


def test_lambda_sweep_equals_recomputation(files, workspace):
    request = EvaluateRequest(
        files["id"], [("near", files["near"]), ("far", files["far"])], lambdas=[0, 0.5, 2.0], compare=True
    )
    result = evaluate(request, workspace)
    results = json.loads(result.artifact.file("results.json").read_text())
    id_frame = load(files["id"])
    for name in ("near", "far"):
        ood = load(files[name])
        for lam in (0.0, 0.5, 2.0):
            expected = ood_metrics(
                id_frame["s_neglabel_star"] + lam * id_frame["p_align"],
                ood["s_neglabel_star"] + lam * ood["p_align"],
            )
            stored = results["ood"][name]["lambda_sweep"][str(lam)]["metrics"]["neglabel"]
            assert stored == pytest.approx(expected.as_dict())
        best = max(
            (0.0, 0.5, 2.0),
            key=lambda lam: results["ood"][name]["lambda_sweep"][str(lam)]["metrics"]["neglabel"]["auroc"],
        )
        assert results["ood"][name]["best_lambda"] == best
        assert results["ood"][name]["methods"]["NegAlign"]["lambda"] == best
        mcm = ood_metrics(id_frame["s_mcm"], ood["s_mcm"])
        assert results["ood"][name]["methods"]["MCM"]["metrics"]["neglabel"] == pytest.approx(mcm.as_dict())
        assert set(results["ood"][name]["methods"]) == {
            "MCM",
            "Energy",
            "MaxLogit",
            "NegLabel",
            "NegRefine",
            "NegLabel*",
            "NegAlign",
        }
    # NegAlign's results.json schema, plus the mean block and the metric definitions
    for key in (
        "config",
        "best_lambda",
        "best_auroc",
        "lambda_sweep",
        "statistics",
        "metrics_convention",
        "metric_definitions",
        "mean",
        "lambda_selection",
        "negalign_version",
    ):
        assert key in results
    assert results["metrics_convention"] == "neglabel"
    assert set(results["metric_definitions"]) == {"neglabel", "openood"}
    assert "openood" in results["ood"]["near"]["methods"]["MCM"]["metrics"]
    stats = results["ood"]["near"]["statistics"]["id"]
    assert stats["s_neglabel_plain_mean"] == pytest.approx(id_frame["s_neglabel_plain"].mean())
    assert stats["cam_valid_rate"] == pytest.approx(id_frame["cam_valid"].mean())
    mean_auroc = np.mean(
        [results["ood"][n]["lambda_sweep"]["0.5"]["metrics"]["neglabel"]["auroc"] for n in ("near", "far")]
    )
    assert results["lambda_sweep"]["0.5"]["metrics"]["neglabel"]["auroc"] == pytest.approx(mean_auroc)
    csv = pd.read_csv(result.artifact.file("metrics.csv"))
    assert {
        "ood",
        "method",
        "lambda",
        "convention",
        "auroc_pct",
        "fpr95_pct",
        "aupr_in_pct",
        "aupr_out_pct",
    } <= set(csv.columns)
    for figure in ("roc.png", "score_hist.png"):
        assert result.artifact.file(figure).stat().st_size > 1000


def test_select_lambda_on_a_validation_set(files, workspace):
    request = EvaluateRequest(
        files["id"], [("near", files["near"]), ("far", files["far"])], lambdas=[0, 1, 5], select_on="near"
    )
    results = json.loads(evaluate(request, workspace).artifact.file("results.json").read_text())
    lam = results["ood"]["near"]["best_lambda"]
    assert results["lambda_selection"]["lambda"] == {"near": lam, "far": lam}
    assert "near" in results["lambda_selection"]["rule"]
    assert results["ood"]["far"]["methods"]["NegAlign"]["lambda"] == lam
    # the mean still averages the validation set, and the rule says so (and how to average the rest)
    assert "'near' still counts in the mean; --ood-group test=SET" in results["lambda_selection"]["rule"]
    both = [results["ood"][s]["methods"]["NegAlign"]["metrics"]["neglabel"]["auroc"] for s in ("near", "far")]
    assert results["mean"]["methods"]["NegAlign"]["metrics"]["neglabel"]["auroc"] == pytest.approx(
        np.mean(both)
    )


def test_m3_scale_stabilize(files, workspace, tmp_path):
    request = EvaluateRequest(files["id"], [("near", files["near"])], lambdas=[1.0], scale_stabilize=True)
    results = json.loads(evaluate(request, workspace).artifact.file("results.json").read_text())
    id_frame, ood = load(files["id"]), load(files["near"])
    calibration = fit_calibration(id_frame["s_neglabel_star"].to_numpy(), id_frame["p_align"].to_numpy())
    assert results["calibration"]["s_neglabel_star"] == pytest.approx(calibration["s_neglabel_star"])
    z = lambda f: final_score(f["s_neglabel_star"].to_numpy(), f["p_align"].to_numpy(), 1.0, calibration)  # noqa: E731
    assert results["ood"]["near"]["lambda_sweep"]["1.0"]["metrics"]["neglabel"]["auroc"] == pytest.approx(
        ood_metrics(z(id_frame), z(ood)).auroc
    )
    assert z(id_frame).mean() == pytest.approx(1.0 * 0 + 0, abs=1e-9)  # both terms have mean 0 on ID
    # the saved statistics can be passed back as --calibration
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(results))
    again = EvaluateRequest(
        files["id"], [("near", files["near"])], lambdas=[1.0], scale_stabilize=True, calibration_path=saved
    )
    results2 = json.loads(evaluate(again, workspace).artifact.file("results.json").read_text())
    assert results2["ood"]["near"]["lambda_sweep"]["1.0"] == results["ood"]["near"]["lambda_sweep"]["1.0"]


def test_any_score_column(tmp_path, workspace):
    rng = np.random.default_rng(5)
    pd.DataFrame({"energy": rng.normal(1, 1, 100)}).to_csv(tmp_path / "id.csv", index=False)
    pd.DataFrame({"energy": rng.normal(0, 1, 80)}).to_csv(tmp_path / "ood.csv", index=False)
    request = EvaluateRequest(
        tmp_path / "id.csv", [("x", tmp_path / "ood.csv")], score_column="energy", convention="openood"
    )
    results = json.loads(evaluate(request, workspace).artifact.file("results.json").read_text())
    expected = ood_metrics(
        pd.read_csv(tmp_path / "id.csv")["energy"], pd.read_csv(tmp_path / "ood.csv")["energy"], "openood"
    )
    assert results["ood"]["x"]["methods"]["energy"]["metrics"]["openood"] == pytest.approx(expected.as_dict())
    assert "lambda_sweep" not in results["ood"]["x"]


def test_bad_input(tmp_path, files, workspace):
    with pytest.raises(NegalignError, match="more than once"):
        parse_ood(["a=x.csv", "a=y.csv"])
    with pytest.raises(NegalignError, match="NAME=FILE"):
        parse_ood(["x.csv"])
    with pytest.raises(NegalignError, match="at least one"):
        parse_ood([])
    assert parse_lambdas("sweep") == [0.0, 0.5, 1.0, 2.0, 5.0, 10.0] and parse_lambdas("2,0.5") == [0.5, 2.0]
    with pytest.raises(NegalignError, match="cannot read --lambda"):
        parse_lambdas("big")
    empty = tmp_path / "empty.csv"
    empty.write_text("s_mcm\n")
    with pytest.raises(NegalignError, match="no rows"):
        evaluate(EvaluateRequest(empty, [("near", files["near"])], score_column="s_mcm"), workspace)
    nan = write_scores(tmp_path / "nan.parquet", 50, 3, shift=0.0, s_mcm=[np.nan, np.inf] + [0.5] * 48)
    with pytest.raises(NegalignError, match="2 row\\(s\\) have NaN/inf"):
        evaluate(EvaluateRequest(nan, [("near", files["near"])], score_column="s_mcm"), workspace)
    ok = evaluate(
        EvaluateRequest(nan, [("near", files["near"])], score_column="s_mcm", drop_nonfinite=True), workspace
    )
    assert json.loads(ok.artifact.file("results.json").read_text())["id"]["dropped_nonfinite"] == 2
    with pytest.raises(NegalignError, match="lacks column"):
        evaluate(EvaluateRequest(files["id"], [("near", files["near"])], score_column="energy"), workspace)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet_with_metadata(load(files["id"]), a, {"model": "aaaa" * 16, "config": {}})
    write_parquet_with_metadata(load(files["near"]), b, {"model": "bbbb" * 16, "config": {}})
    with pytest.raises(NegalignError, match="different models"):
        evaluate(EvaluateRequest(a, [("near", b)], score_column="s_mcm"), workspace)
    no_align = write_scores(tmp_path / "no_align.parquet", 40, 4, shift=0.0, p_align=np.nan)
    with pytest.raises(NegalignError, match="--lambda needs"):
        evaluate(EvaluateRequest(no_align, [("near", files["near"])], lambdas=[1.0]), workspace)
    with pytest.raises(NegalignError, match="--select-lambda-on"):
        evaluate(
            EvaluateRequest(files["id"], [("near", files["near"])], lambdas=[1.0], select_on="far"), workspace
        )


def test_evaluate_cli_round_trip(files, tmp_path):
    args = [
        "evaluate",
        "--id",
        str(files["id"]),
        "--ood",
        f"near={files['near']}",
        "--ood",
        f"far={files['far']}",
        "--compare",
        "--lambda",
        "sweep",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "r"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "NegAlign (λ per set)" in result.output or "NegAlign (λ=" in result.output
    for method in ("MCM", "NegLabel", "NegRefine", "NegLabel*"):
        assert method in result.output
    assert "λ sweep (mean AUROC %)" in result.output
    written = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert written == [
        "manifest.json",
        "metrics.csv",
        "results.json",
        "roc.png",
        "score_hist.png",
        "table.csv",
    ]
    assert "cache hit: evaluate" in runner.invoke(app, args).output
    single = runner.invoke(app, ["evaluate", "--id", str(files["id"]), "--cache-dir", str(tmp_path / "c")])
    assert single.exit_code != 0 and "--ood" in single.output
    dup = runner.invoke(
        app,
        [
            "evaluate",
            "--id",
            str(files["id"]),
            "--ood",
            f"a={files['near']}",
            "--ood",
            f"a={files['far']}",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
    )
    assert dup.exit_code != 0 and "more than once" in dup.output


def test_default_score_and_compare(files, tmp_path):
    """Without flags `evaluate` shows the method's own score (NegAlign, λ swept); --compare adds
    the method table; files without P_align fall back to NegLabel*."""
    base = [
        "evaluate",
        "--id",
        str(files["id"]),
        "--ood",
        f"near={files['near']}",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    plain = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert plain.exit_code == 0, plain.output
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(results["ood"]["near"]["methods"]) == {"NegAlign"}
    assert "MCM" not in plain.output and "NegAlign" in plain.output
    compared = runner.invoke(app, [*base, "--compare", "--out", str(tmp_path / "b")])
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(results["ood"]["near"]["methods"]) == {
        "MCM",
        "Energy",
        "MaxLogit",
        "NegLabel",
        "NegRefine",
        "NegLabel*",
        "NegAlign",
    }
    assert all(m in compared.output for m in ("MCM", "NegRefine", "NegLabel*"))
    assert (
        "Ming" in results["columns"]["MCM"]["reference"]
        and results["columns"]["Energy"]["column"] == "s_energy"
    )
    chosen = runner.invoke(app, [*base, "--score", "s_mcm", "--out", str(tmp_path / "s")])
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert set(results["ood"]["near"]["methods"]) == {"s_mcm"}
    no_align = {}
    for name in ("id", "near"):
        frame = load(files[name]).drop(columns=["p_align"])
        no_align[name] = tmp_path / f"{name}_no_align.parquet"
        frame.to_parquet(no_align[name])
    star = runner.invoke(
        app,
        [
            "evaluate",
            "--id",
            str(no_align["id"]),
            "--ood",
            f"near={no_align['near']}",
            "--out",
            str(tmp_path / "n"),
        ],
    )
    assert star.exit_code == 0, star.output
    assert set(json.loads((tmp_path / "n" / "results.json").read_text())["ood"]["near"]["methods"]) == {
        "NegLabel*"
    }
    assert chosen.exit_code == 0


def test_invalid_cam_rows_are_counted_and_excluded(files, tmp_path, workspace):
    """`score --invalid-cam exclude` leaves P_align undefined where the CAM is invalid: evaluate
    drops those rows (from every method, so the table compares the same images) and says how many;
    every set states how many rows had an invalid CAM."""
    frames = {name: load(files[name]) for name in ("id", "near")}
    paths = {}
    for name, frame in frames.items():
        frame.loc[~frame["cam_valid"], "p_align"] = np.nan
        paths[name] = tmp_path / f"{name}_excluded.parquet"
        frame.to_parquet(paths[name])
    invalid = {name: int((~frame["cam_valid"]).sum()) for name, frame in frames.items()}
    assert all(invalid.values())
    request = EvaluateRequest(paths["id"], [("near", paths["near"])], lambdas=[0.0, 1.0], compare=True)
    results = json.loads(evaluate(request, workspace).artifact.file("results.json").read_text())
    assert (
        results["id"]["cam_invalid"] == invalid["id"]
        and results["id"]["excluded_invalid_cam"] == invalid["id"]
    )
    block = results["ood"]["near"]
    assert block["cam_invalid"] == invalid["near"] and block["excluded_invalid_cam"] == invalid["near"]
    assert (
        results["id"]["n"] == len(frames["id"]) - invalid["id"]
        and block["n"] == len(frames["near"]) - invalid["near"]
    )
    keep_id, keep_ood = frames["id"][frames["id"]["cam_valid"]], frames["near"][frames["near"]["cam_valid"]]
    expected = ood_metrics(keep_id["s_mcm"], keep_ood["s_mcm"]).as_dict()
    assert block["methods"]["MCM"]["metrics"]["neglabel"] == pytest.approx(expected)
    expected = ood_metrics(
        keep_id["s_neglabel_star"] + keep_id["p_align"], keep_ood["s_neglabel_star"] + keep_ood["p_align"]
    )
    assert block["lambda_sweep"]["1.0"]["metrics"]["neglabel"] == pytest.approx(expected.as_dict())
    # the fallback files (P_align defined everywhere) keep every row, and still count invalid CAMs
    request = EvaluateRequest(files["id"], [("near", files["near"])], lambdas=[0.0, 1.0])
    results = json.loads(evaluate(request, workspace).artifact.file("results.json").read_text())
    assert results["id"]["cam_invalid"] == invalid["id"] and results["id"]["excluded_invalid_cam"] == 0
    assert results["id"]["n"] == len(frames["id"])


def _with_paths(tmp_path):
    paths = [str(tmp_path / "images" / f"{i:03d}.png") for i in range(300)]
    file = write_scores(tmp_path / "id_paths.parquet", 300, 0, shift=0.3)
    frame = pd.read_parquet(file).assign(path=paths)
    frame.to_parquet(file, index=False)
    return file


def test_id_group_rejection_per_method(files, workspace, tmp_path):
    from negalign_cli.compute.metrics import group_rejection

    id_file = _with_paths(tmp_path)
    id_frame = load(id_file)
    chosen = id_frame["path"].iloc[::7].tolist()
    manifest = tmp_path / "groups" / "minority.csv"
    manifest.parent.mkdir()
    # relative to the manifest's folder, as every manifest is read; one image the ID file lacks
    relative = ["../images/" + p.rsplit("/", 1)[1] for p in chosen]
    pd.DataFrame({"path": relative + ["../images/elsewhere.png"]}).to_csv(manifest, index=False)
    request = EvaluateRequest(
        id_file,
        [("near", files["near"]), ("far", files["far"])],
        lambdas=[0.0, 2.0],
        compare=True,
        id_groups=[("minority", manifest)],
    )
    results = json.loads(evaluate(request, workspace).artifact.file("results.json").read_text())
    group = results["id_groups"]["minority"]
    in_group = id_frame["path"].isin(chosen).to_numpy()
    assert group["n"] == len(chosen) == in_group.sum() and group["listed_not_in_id"] == 1
    for method, column in (
        ("MCM", "s_mcm"),
        ("NegLabel", "s_neglabel_plain"),
        ("NegLabel*", "s_neglabel_star"),
    ):
        expected = group_rejection(id_frame[column].to_numpy(), in_group)
        assert group["rejected"][method] == pytest.approx(expected)
    for lam in (0.0, 2.0):
        combined = (id_frame["s_neglabel_star"] + lam * id_frame["p_align"]).to_numpy()
        assert group["negalign_sweep"][str(lam)] == pytest.approx(group_rejection(combined, in_group))
    # independent check of one figure: sort, cut at the 95% rank, count the group below it
    mcm = id_frame["s_mcm"].to_numpy()
    cut = np.sort(mcm)[::-1][int(np.ceil(0.95 * len(mcm))) - 1]
    assert group["rejected"]["MCM"] == pytest.approx(np.mean(mcm[in_group] < cut))
    assert len({round(v, 6) for v in group["rejected"].values()}) > 1  # the methods differ on this data
    # the same manifest bytes in another folder list other images: not the cached group (before: a hit)
    elsewhere = tmp_path / "copy" / "groups" / "minority.csv"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(manifest, elsewhere)
    request.id_groups = [("minority", elsewhere)]
    with pytest.raises(NegalignError, match="none of its 44 image"):
        evaluate(request, workspace)


def test_id_group_errors(files, workspace, tmp_path):
    stranger = tmp_path / "stranger.csv"
    stranger.write_text("path\n/not/scored.png\n")
    with pytest.raises(NegalignError, match="none of its 1 image"):
        evaluate(
            EvaluateRequest(
                _with_paths(tmp_path), [("near", files["near"])], compare=True, id_groups=[("g", stranger)]
            ),
            workspace,
        )
    with pytest.raises(NegalignError, match="no path column"):
        evaluate(
            EvaluateRequest(
                files["id"], [("near", files["near"])], compare=True, id_groups=[("g", stranger)]
            ),
            workspace,
        )
    with pytest.raises(NegalignError, match="not found"):
        evaluate(
            EvaluateRequest(
                files["id"],
                [("near", files["near"])],
                compare=True,
                id_groups=[("g", tmp_path / "missing.csv")],
            ),
            workspace,
        )
    with pytest.raises(NegalignError, match="--id-group takes NAME=FILE"):
        parse_ood(["nofile"], "--id-group", required=False)
    assert parse_ood([], "--id-group", required=False) == []


def test_evaluate_cli_id_group(files, tmp_path):
    id_file = _with_paths(tmp_path)
    group = tmp_path / "images"  # a folder of images is a group too: its files, matched by path
    group.mkdir()
    for i in range(0, 300, 10):
        (group / f"{i:03d}.png").write_bytes(b"")
    base = ["evaluate", "--id", str(id_file), "--ood", f"near={files['near']}", "--compare"]
    base += ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*base, "--id-group", f"minority={group}"])
    assert result.exit_code == 0, result.output
    assert "ID group minority (30 images)" in result.output and "NegLabel*" in result.output
    stored = json.loads((tmp_path / "r" / "results.json").read_text())["id_groups"]["minority"]
    assert stored["n"] == 30 and set(stored["rejected"]) >= {"MCM", "NegLabel", "NegAlign"}
    bad = runner.invoke(app, [*base, "--id-group", "minority"])
    assert bad.exit_code == 2 and "--id-group takes NAME=FILE" in bad.output
