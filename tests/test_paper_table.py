"""The paper-style table (issue 22 item 2) and `evaluate --benchmark` (item 1): one table built
from results.json, rendered in the console (80 columns), table.csv and the three reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from negalign_cli.presets import published_data
from tests.faults.helpers import cli, one_line_error
from tests.helpers.synthetic import write_scores

# numbers, tables and errors: evaluate writes blank figures here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("placeholder_figures")

MOS = ("iNaturalist", "SUN", "Places", "Textures")


@pytest.fixture()
def mos(tmp_path):
    """An ID score file and four OOD ones named like imagenet-mos's sets (in other cases)."""
    files = {"id": write_scores(tmp_path / "id.parquet", 300, 0, shift=0.3)}
    for i, name in enumerate(("inaturalist", "SUN", "places", "dtd")):
        files[name] = write_scores(tmp_path / f"{name}.parquet", 150 + 10 * i, i + 1, shift=0.1 * i - 0.1)
    return files


def _evaluate(tmp_path, files, *extra, env=None):
    out = tmp_path / "out"
    args = ["evaluate", "--id", str(files["id"]), "--compare", "--out", str(out)]
    for name, path in files.items():
        if name != "id":
            args += ["--ood", f"{name}={path}"]
    result = cli(*args, *extra, "--cache-dir", str(tmp_path / "cache"), env=env)
    assert result.exit_code == 0, result.output
    return result, out


def test_table_csv_equals_results_and_sklearn(tmp_path, mos):
    _, out = _evaluate(tmp_path, mos, "--ood-group", "near=inaturalist,SUN", "--ood-group", "far=places,dtd")
    results = json.loads((out / "results.json").read_text())
    table = pd.read_csv(out / "table.csv")
    columns = ["method", "source"]
    for column in ["inaturalist", "SUN", "places", "dtd", "near", "far", "mean"]:
        columns += [f"{column} AUROC", f"{column} FPR@95"]
    assert list(table.columns) == [*columns, "ID top-1", "convention", "citation"]
    assert set(table["convention"]) == {"neglabel"}
    assert set(table["source"]) == {"this run"}
    assert len(table) == len(results["mean"]["methods"])
    for _, row in table.iterrows():
        method = row["method"].split(" (λ")[0]
        for name in ("inaturalist", "SUN", "places", "dtd"):
            metrics = results["ood"][name]["methods"][method]["metrics"]["neglabel"]
            assert row[f"{name} AUROC"] == pytest.approx(100 * metrics["auroc"], abs=1e-4)
            assert row[f"{name} FPR@95"] == pytest.approx(100 * metrics["fpr95"], abs=1e-4)
        for group, members in (("near", ["inaturalist", "SUN"]), ("far", ["places", "dtd"])):
            for key in ("AUROC", "FPR@95"):
                expected = np.mean([row[f"{m} {key}"] for m in members])
                assert row[f"{group} {key}"] == pytest.approx(expected, abs=1e-3)
        for key in ("AUROC", "FPR@95"):
            expected = np.mean([row[f"{m} {key}"] for m in ("inaturalist", "SUN", "places", "dtd")])
            assert row[f"mean {key}"] == pytest.approx(expected, abs=1e-3)
    # one cell recomputed from the score files alone (ID positive: the neglabel convention)
    id_scores = pd.read_parquet(mos["id"])["s_mcm"].to_numpy()
    ood_scores = pd.read_parquet(mos["SUN"])["s_mcm"].to_numpy()
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    auroc = 100 * roc_auc_score(labels, np.r_[id_scores, ood_scores])
    mcm = table[table["method"] == "MCM"].iloc[0]
    assert mcm["SUN AUROC"] == pytest.approx(auroc, abs=1e-4)


def test_console_fits_80_columns(tmp_path, mos):
    from negalign_cli.cli.console import stdout

    stdout.cache_clear()  # the console reads COLUMNS when it is made: once per process, as a real run
    try:
        result, _ = _evaluate(tmp_path, mos, "--benchmark", "imagenet-mos", env={"COLUMNS": "80"})
    finally:
        stdout.cache_clear()
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    assert "neglabel convention" in result.stdout
    for name in ("inaturalist", "SUN", "places", "dtd", "far (mean)", "mean"):
        assert name in result.stdout, name


def test_benchmark_adds_published_rows(tmp_path, mos):
    result, out = _evaluate(tmp_path, mos, "--benchmark", "imagenet-mos")
    recorded = published_data()["settings"]["imagenet-mos"]
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"]["sets"] == dict(
        zip(("inaturalist", "SUN", "places", "dtd"), MOS, strict=True)
    )
    assert results["groups"]["far"]["sets"] == ["inaturalist", "SUN", "places", "dtd"]
    table = pd.read_csv(out / "table.csv")
    published = table[table["source"] == "published"]
    assert list(published["method"]) == [row["method"] for row in recorded["rows"]]
    for row in recorded["rows"]:
        line = published[published["method"] == row["method"]].iloc[0]
        for ours, theirs in zip(("inaturalist", "SUN", "places", "dtd"), MOS, strict=True):
            assert line[f"{ours} AUROC"] == row["per_set"][theirs]["auroc"]
            assert line[f"{ours} FPR@95"] == row["per_set"][theirs]["fpr95"]
        if row.get("average"):
            assert line["mean AUROC"] == row["average"]["auroc"]
            assert line["mean FPR@95"] == row["average"]["fpr95"]
        assert "Negative Label Guided OOD Detection" in line["citation"] or "NegRefine" in line["citation"]
    assert "Negative Label Guided OOD Detection" in result.stdout
    assert "(published [1])" in result.stdout
    # the report shows the same rows, with booktabs in LaTeX and the citation in a footnote
    report = cli("report", str(out))
    assert report.exit_code == 0, report.output
    tex = (out / "report" / "report.tex").read_text()
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert rule in tex
    assert "$\\uparrow$" in tex and "↑" not in tex and "—" not in tex  # inputenc's utf8 has no arrows
    for name in ("report.md", "report.html", "report.tex"):
        text = (out / "report" / name).read_text()
        assert "Negative Label Guided OOD Detection" in text, name
        assert "neglabel convention" in text, name
        assert f"{recorded['rows'][1]['per_set']['SUN']['auroc']:.2f}" in text, name


def test_openood_convention_leaves_published_rows_out(tmp_path, mos):
    result, out = _evaluate(tmp_path, mos, "--benchmark", "imagenet-mos", "--metrics", "openood")
    table = pd.read_csv(out / "table.csv")
    assert set(table["source"]) == {"this run"}
    assert "published rows of imagenet-mos left out" in result.stdout


def test_missing_set_warns(tmp_path, mos):
    del mos["dtd"]
    result, _ = _evaluate(tmp_path, mos, "--benchmark", "imagenet-mos")
    assert "expects the OOD set Textures" in result.output


def test_one_benchmark_set_given_twice_is_one_line(tmp_path, mos):
    """`Textures` and its alias `dtd` both given: the published mean (the paper's 4 sets) and the
    run's (5 columns, Textures twice) would differ in what they average. Before: exit 0, no word."""
    args = [
        "evaluate",
        "--id",
        str(mos["id"]),
        "--benchmark",
        "imagenet-mos",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    args += [f"--ood={name}={path}" for name, path in mos.items() if name != "id"]
    line = one_line_error(cli(*args, f"--ood=Textures={mos['dtd']}"), "two --ood names match one set")
    assert "dtd and Textures are both Textures" in line


def test_unknown_benchmark_is_one_line(tmp_path, mos):
    args = ["evaluate", "--id", str(mos["id"]), "--ood", f"SUN={mos['SUN']}", "--benchmark", "imagenet-moss"]
    one_line_error(cli(*args, "--cache-dir", str(tmp_path / "cache")), "unknown benchmark 'imagenet-moss'")


def test_help_shows_an_example():
    result = cli("evaluate", "--help")
    assert "--benchmark imagenet-mos" in result.output


CLASSES = np.array(["tench", "goldfish", "great white shark"], dtype=object)


def _labelled(tmp_path, labels, predicted):
    """ID scores with the label and prediction columns `negalign score` writes."""
    files = {
        "id": write_scores(
            tmp_path / "id.parquet",
            len(labels),
            0,
            shift=0.3,
            label=labels,
            pred_class=predicted,
            pred_name=CLASSES[predicted],
        ),
        "ood": write_scores(tmp_path / "ood.parquet", 100, 1, shift=0.0),
    }
    return _evaluate(tmp_path, files)


@pytest.mark.parametrize("kind", ["indices", "names"])
def test_id_accuracy(tmp_path, kind):
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 3, 240)
    predicted = np.where(rng.uniform(size=240) < 0.7, truth, rng.integers(0, 3, 240))
    # names as ImageFolder folders spell them: other case, underscores for spaces
    labels = truth.astype(str) if kind == "indices" else [CLASSES[t].upper().replace(" ", "_") for t in truth]
    result, out = _labelled(tmp_path, labels, predicted)
    accuracy = json.loads((out / "results.json").read_text())["id"]["accuracy"]
    expected = float(np.mean(truth == predicted))
    assert 0.6 < expected < 0.9
    assert accuracy["top1"] == pytest.approx(expected)
    assert accuracy["labels"] == ("class indices" if kind == "indices" else "class names")
    assert "ID accuracy (zero-shot top-1, 240 ID images" in result.stdout
    assert f"{100 * expected:.2f}%" in result.stdout
    table = pd.read_csv(out / "table.csv")
    assert table["ID top-1"].to_numpy() == pytest.approx(np.full(len(table), 100 * expected), abs=1e-3)


def test_id_accuracy_from_wordnet_ids(tmp_path):
    """ImageNet's class folders are WordNet ids: each is its ImageNet-1K class index (the sorted
    id list), compared with pred_class (CLASSES are the `imagenet` preset's first three)."""
    wnids = np.array(["n01440764", "n01443537", "n01484850"])
    truth, predicted = np.arange(120) % 3, (np.arange(120) * 7 // 5) % 3
    result, out = _labelled(tmp_path, list(wnids[truth]), predicted)
    accuracy = json.loads((out / "results.json").read_text())["id"]["accuracy"]
    expected = float(np.mean(truth == predicted))
    assert 0 < expected < 1 and accuracy["top1"] == pytest.approx(expected)
    assert accuracy["labels"] == "ImageNet-1K WordNet ids"
    assert f"labels read as ImageNet-1K WordNet ids): {100 * expected:.2f}%" in result.stdout


def test_id_accuracy_not_from_other_wordnet_ids(tmp_path):
    """WordNet ids outside ImageNet-1K (n01440765 is none of its classes): no accuracy, a note why."""
    labels = [f"n0{1440764 + i % 3}" for i in range(120)]
    result, out = _labelled(tmp_path, labels, np.arange(120) % 3)
    accuracy = json.loads((out / "results.json").read_text())["id"]["accuracy"]
    assert accuracy["top1"] is None and "outside ImageNet-1K's 1,000 classes" in accuracy["note"]
    assert "ID accuracy not computed: 80 of 120 ID labels are WordNet ids outside" in result.stdout


def test_ood_names_match_preset_sets():
    from negalign_cli.presets import match_sets

    names = ["ssb_hard", "NINCO", "inat", "DTD", "openimage_o", "mnist"]
    assert match_sets("openood-imagenet", names) == {
        "ssb_hard": "SSB-hard",
        "NINCO": "NINCO",
        "inat": "iNaturalist",
        "DTD": "Textures",
        "openimage_o": "OpenImage-O",
    }


def test_openood_benchmark_groups_near_and_far(tmp_path):
    files = {"id": write_scores(tmp_path / "id.parquet", 200, 0, shift=0.3)}
    for i, name in enumerate(("ssb_hard", "ninco", "inaturalist", "textures", "openimage_o")):
        files[name] = write_scores(tmp_path / f"{name}.parquet", 100, i + 1, shift=0.05 * i)
    result, out = _evaluate(tmp_path, files, "--benchmark", "openood-imagenet")
    results = json.loads((out / "results.json").read_text())
    assert {name: block["sets"] for name, block in results["groups"].items()} == {
        "near": ["ssb_hard", "ninco"],
        "far": ["inaturalist", "textures", "openimage_o"],
    }
    assert "warning" not in result.output
    assert set(pd.read_csv(out / "table.csv")["source"]) == {"this run"}  # no published rows recorded
