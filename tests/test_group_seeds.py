"""`score --group-seeds 0,1,2` and `evaluate` over them (issue 22 item 4): NegLabel's grouping is
random, so the paper-style table shows the grouped methods as mean ± sample std (ddof = 1) over
the seeds, in the console (80 columns), table.csv, results.json and the three reports. Checked
against numpy on the metrics of each seed evaluated on its own."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from negalign_cli.stages.paper_table import MEAN_COLUMN
from tests.faults.helpers import cli, one_line_error
from tests.helpers import placeholder_figures
from tests.helpers.chain import model_chain
from tests.helpers.images import make_image_folder, rgb

SEEDS = (0, 1, 2)
GROUPED = ("NegLabel", "NegRefine", "NegLabel*")  # the methods whose columns depend on the seed
SEED_FREE = ("MCM", "Energy", "MaxLogit")
LAMBDAS = (0.0, 0.05, 0.2)  # small λ: S* still matters, so NegAlign varies with the seed (and its λ)


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The model chain on 8 ID and 8 OOD images, scored with --group-seeds 0,1,2 and evaluated;
    each seed also scored (`score --group-seed S`) and evaluated on its own."""
    with pytest.MonkeyPatch.context() as patch:
        placeholder_figures(patch)  # numbers and tables are checked here; figures elsewhere
        return _seeded(tmp_path_factory)


def _seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    runs = model_chain(root)
    make_image_folder(root / "imgs", per_class=4)
    for i in range(8):  # OOD images: other pixels than the ID ones
        (root / "ood" / "x").mkdir(parents=True, exist_ok=True)
        rgb(100 + i).save(root / "ood" / "x" / f"{i}.png")
    cam = list(runs["cam"])
    _ok(cli(*cam))
    cam[cam.index(str(root / "imgs"))] = str(root / "ood")
    cam[cam.index(str(root / "cam"))] = str(root / "cam-ood")
    _ok(cli(*cam))
    _ok(cli(*runs["split-vocab"]))
    score = list(runs["score"])
    out = score.index(str(root / "scores"))

    def scored(images: str, folder: str, *extra: str):
        argv = list(score)
        argv[argv.index(str(root / "cam"))] = images
        argv[out] = str(root / folder)
        return _ok(cli(*argv, *extra))

    seeds = ",".join(map(str, SEEDS))
    outputs = {
        "id": scored(str(root / "cam"), "s-id", "--group-seeds", seeds),
        "ood": scored(str(root / "cam-ood"), "s-ood", "--group-seeds", seeds),
    }
    for seed in SEEDS:  # each seed on its own: the per-seed artifact the seeds run stored
        for name, images in (("id", "cam"), ("ood", "cam-ood")):
            outputs[f"{name}{seed}"] = scored(
                str(root / images), f"s-{name}{seed}", "--group-seed", str(seed)
            )
    cache = ("--cache-dir", str(root / "c"))

    def evaluate(folder: str, id_file, ood_file, *extra: str):
        argv = ["evaluate", "--id", str(id_file), "--ood", f"far={ood_file}", "--compare", *cache]
        argv += ["--lambda", ",".join(map(str, LAMBDAS))]
        return argv, _ok(cli(*argv, "--out", str(root / folder), *extra))

    both = (root / "s-id" / "scores.parquet", root / "s-ood" / "scores.parquet")
    argv, _ = evaluate("e-seeds", *both)
    return {"root": root, "score": outputs, "files": both, "cache": cache, "evaluate": argv}


def _results(seeded) -> dict:
    return json.loads((seeded["root"] / "e-seeds" / "results.json").read_text())


def _alone(seeded, seed: int) -> dict[str, dict]:
    """Each method's metrics on seed ``seed``'s own score files (`score --group-seed S`), computed
    here from the columns: NegAlign at the λ of ``LAMBDAS`` with the best AUROC."""
    from negalign_cli.compute.evaluation import all_metrics, best_lambda, lambda_sweep

    id_, ood = (pd.read_parquet(seeded["root"] / f"s-{n}{seed}" / "scores.parquet") for n in ("id", "ood"))
    columns = {"MCM": "s_mcm", "Energy": "s_energy", "MaxLogit": "s_maxlogit", "NegLabel": "s_neglabel_plain"}
    columns |= {"NegRefine": "s_negrefine", "NegLabel*": "s_neglabel_star"}
    out = {m: all_metrics(id_[c].to_numpy(float), ood[c].to_numpy(float)) for m, c in columns.items()}
    star, align = "s_neglabel_star", "p_align"
    sweep = lambda_sweep(*(f[c].to_numpy(float) for f in (id_, ood) for c in (star, align)), LAMBDAS)
    lam = best_lambda(sweep)
    out["NegAlign"] = {"lambda": lam, **sweep[lam]}
    return out


def test_each_seed_is_its_own_cached_score(seeded):
    """The seeds run stores one `score` artifact per seed: scoring a seed alone is a cache hit,
    and its file holds the seed's columns of the combined file."""
    for seed in SEEDS:
        for name in ("id", "ood"):
            said = " ".join(seeded["score"][f"{name}{seed}"].output.split())
            assert re.search(r"score [0-9a-f]{12} \(cache hit\)", said), said
    combined = pd.read_parquet(seeded["files"][0])
    for seed in SEEDS:
        alone = pd.read_parquet(seeded["root"] / f"s-id{seed}" / "scores.parquet")
        for column in ("s_neglabel_plain", "s_negrefine", "s_neglabel_star"):
            np.testing.assert_array_equal(combined[f"{column}@seed{seed}"], alone[column])
        np.testing.assert_array_equal(combined["s_mcm"], alone["s_mcm"])
    np.testing.assert_array_equal(combined["s_neglabel_plain"], combined["s_neglabel_plain@seed0"])
    # the seeds really group differently
    assert not np.array_equal(combined["s_neglabel_plain@seed0"], combined["s_neglabel_plain@seed1"])
    assert "s_mcm@seed1" not in combined.columns


def test_results_json_is_mean_and_sample_std_of_the_seeds(seeded):
    results = _results(seeded)
    alone = {seed: _alone(seeded, seed) for seed in SEEDS}
    assert results["group_seeds"]["seeds"] == list(SEEDS) and results["group_seeds"]["ddof"] == 1
    assert set(results["group_seeds"]["methods"]) == {*GROUPED, "NegAlign"}
    spread = set()
    for block in (results["ood"]["far"], results["mean"]):  # one OOD set: the mean is that set
        for method in (*GROUPED, "NegAlign"):
            got = block["methods"][method]
            for convention in ("neglabel", "openood"):
                for metric in ("auroc", "fpr95", "aupr_in", "aupr_out"):
                    values = [alone[s][method][convention][metric] for s in SEEDS]
                    assert got["metrics"][convention][metric] == pytest.approx(np.mean(values), abs=1e-12)
                    assert got["std"][convention][metric] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
                    if np.std(values) > 0:
                        spread.add(method)
        for method in SEED_FREE:  # one value, no spread: the same as any seed alone
            assert "std" not in block["methods"][method]
            assert block["methods"][method]["metrics"] == alone[1][method]
    assert spread == {*GROUPED, "NegAlign"}, "a method the same for every seed: a wrong std would pass"
    negalign = results["ood"]["far"]["methods"]["NegAlign"]
    assert negalign["lambda_by_seed"] == {str(s): alone[s]["NegAlign"]["lambda"] for s in SEEDS}
    per_seed = results["group_seeds"]["per_seed"]
    assert per_seed["1"]["ood/far"]["NegLabel"]["neglabel"] == alone[1]["NegLabel"]["neglabel"]


def _cell(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f}±{100 * std:.2f}"


def test_every_output_shows_mean_and_std(seeded):
    root = seeded["root"]
    results = _results(seeded)
    entry = results["ood"]["far"]["methods"]["NegLabel"]
    auroc = _cell(entry["metrics"]["neglabel"]["auroc"], entry["std"]["neglabel"]["auroc"])
    fpr = _cell(entry["metrics"]["neglabel"]["fpr95"], entry["std"]["neglabel"]["fpr95"])
    neglabel = f"{auroc} / {fpr}"
    mcm = results["ood"]["far"]["methods"]["MCM"]["metrics"]["neglabel"]
    plain = f"{_cell(mcm['auroc'], None)} / {_cell(mcm['fpr95'], None)}"
    # table.csv: the mean and the std in separate columns; none for the seed-free methods
    table = pd.read_csv(root / "e-seeds" / "table.csv").set_index("method")
    assert table.loc["NegLabel", "far AUROC"] == pytest.approx(
        100 * entry["metrics"]["neglabel"]["auroc"], abs=1e-4
    )
    assert table.loc["NegLabel", "far AUROC std"] == pytest.approx(
        100 * entry["std"]["neglabel"]["auroc"], abs=1e-4
    )
    assert table.loc["NegLabel", "far FPR@95 std"] == pytest.approx(
        100 * entry["std"]["neglabel"]["fpr95"], abs=1e-4
    )
    assert np.isnan(table.loc["MCM", "far AUROC std"]) and not np.isnan(table.loc["MCM", "far AUROC"])
    # the console, at 80 columns
    from negalign_cli.cli.console import stdout

    stdout.cache_clear()  # the console reads COLUMNS when it is made
    try:
        shown = _ok(cli(*seeded["evaluate"], env={"COLUMNS": "80"})).stdout  # a cache hit
    finally:
        stdout.cache_clear()
    assert max(len(line) for line in shown.splitlines()) <= 80, shown
    lines = {line.split("│")[1].strip(): line for line in shown.splitlines() if line.count("│") > 2}
    assert neglabel in lines["NegLabel"] and plain in lines["MCM"] and "±" not in lines["MCM"], shown
    chosen = results["mean"]["methods"]["NegAlign"]["lambda_by_seed"]
    label = "NegAlign (λ per seed)" if len(set(chosen.values())) > 1 else f"NegAlign (λ={chosen['0']:g})"
    assert label in lines, shown
    assert "ddof = 1" in shown
    # the reports
    _ok(cli("report", str(root / "e-seeds"), "--cams", "1", *seeded["cache"]))
    for name in ("report.md", "report.html"):
        text = (root / "e-seeds" / "report" / name).read_text()
        assert neglabel in text and plain in text and "ddof = 1" in text, name
    tex = (root / "e-seeds" / "report" / "report.tex").read_text()
    assert neglabel.replace("±", "$\\pm$") in tex and "±" not in tex
    assert "\\toprule" in tex


def test_mean_column_is_over_seeds_of_the_mean_over_sets(seeded):
    """With one OOD set the mean column is the set; the paper table reads results.json's std."""
    from negalign_cli.stages.paper_table import paper_table

    paper = paper_table(_results(seeded))
    assert paper.columns == ["far"] and MEAN_COLUMN not in paper.columns
    rows = {row.method.split(" (")[0]: row for row in paper.rows}
    assert rows["NegLabel"].cells["far"].auroc_std is not None
    assert rows["MCM"].cells["far"].auroc_std is None


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ("a,b", "cannot read --group-seeds 'a,b'"),
        ("0,1,0", "gives seed(s) 0 more than once"),
        ("", "--group-seeds is empty"),
        (",", "--group-seeds is empty"),
        ("3", "holds one seed"),
    ],
)
def test_bad_seeds_are_one_line(tmp_path, seeds, message):
    """Refused before anything is read or loaded: the folders need not exist."""
    argv = ["score", "--images-dir", str(tmp_path / "none"), "--classes", "waterbird", "--nouns", "x"]
    one_line_error(cli(*argv, "--group-seeds", seeds, "--cache-dir", str(tmp_path / "c")), message)


def test_seed_and_seeds_together_are_one_line(tmp_path):
    argv = ["score", "--images-dir", str(tmp_path / "none"), "--classes", "waterbird", "--nouns", "x"]
    result = cli(*argv, "--group-seed", "0", "--group-seeds", "0,1", "--cache-dir", str(tmp_path / "c"))
    one_line_error(result, "give either --group-seed or --group-seeds, not both")


def test_one_group_has_no_seed_to_vary(seeded, tmp_path):
    root = seeded["root"]
    argv = list(model_chain(tmp_path)["score"])  # the arguments; the inputs are the fixture's
    argv = [a.replace(str(tmp_path), str(root)) for a in argv]
    argv[argv.index("--groups") + 1] = "1"
    one_line_error(cli(*argv, "--group-seeds", "0,1"), "--group-seeds changes nothing with --groups 1")


def test_files_with_other_seeds_are_refused(seeded):
    """A multi-seed ID file against a one-seed OOD file: their NegLabel columns are not comparable."""
    root = seeded["root"]
    argv = ["evaluate", "--id", str(seeded["files"][0]), "--ood", f"far={root / 's-ood1' / 'scores.parquet'}"]
    result = cli(*argv, "--compare", *seeded["cache"])
    one_line_error(result, "group_seeds")
    result = cli(*argv, "--compare", "--allow-mixed-settings", *seeded["cache"])
    one_line_error(result, "made with different --group-seeds (ID: 0,1,2; far: one seed)")


def test_a_calibration_file_gives_each_seed_its_own_statistics(seeded):
    """`--calibration results.json` of group-seeded score files evaluated with --scale-stabilize:
    each seed's S* is z-scored with that seed's statistics (``calibration_by_seed``), so the
    evaluation equals the one that fitted them. Before: the first seed's for every seed, and
    NegAlign's metrics for seeds 1 and 2 moved."""
    root = seeded["root"]
    argv = [*seeded["evaluate"], "--scale-stabilize", "--out", str(root / "e-m3")]
    _ok(cli(*argv))
    fitted = json.loads((root / "e-m3" / "results.json").read_text())
    by_seed = fitted["calibration_by_seed"]
    assert by_seed["1"] != by_seed["0"]  # the seeds' S* differ: one set of statistics would show
    argv = [*seeded["evaluate"], "--calibration", str(root / "e-m3" / "results.json")]
    _ok(cli(*argv, "--out", str(root / "e-cal")))
    given = json.loads((root / "e-cal" / "results.json").read_text())
    strip = lambda c: {s: {k: v for k, v in stats.items() if k != "source"} for s, stats in c.items()}  # noqa: E731
    assert strip(given["calibration_by_seed"]) == strip(by_seed)
    assert given["group_seeds"]["per_seed"] == fitted["group_seeds"]["per_seed"]
    # a file of one seed (`score --group-seed 1`) takes that seed's statistics, as fitting on it gives
    alone = [root / f"s-{name}1" / "scores.parquet" for name in ("id", "ood")]
    argv = [
        "evaluate",
        "--id",
        str(alone[0]),
        "--ood",
        f"far={alone[1]}",
        *seeded["cache"],
        "--lambda",
        "0.2",
    ]
    _ok(cli(*argv, "--calibration", str(root / "e-m3" / "results.json"), "--out", str(root / "e-one")))
    _ok(cli(*argv, "--scale-stabilize", "--out", str(root / "e-one-fit")))
    one, fit = (json.loads((root / f / "results.json").read_text()) for f in ("e-one", "e-one-fit"))
    assert strip({"1": one["calibration"]}) == strip({"1": by_seed["1"]}) == strip({"1": fit["calibration"]})
    assert one["ood"]["far"]["methods"] == fit["ood"]["far"]["methods"]
    # statistics of other seeds than the files': refused, in one line
    (root / "other.json").write_text(
        json.dumps({"calibration_by_seed": {"5": by_seed["0"], "6": by_seed["1"]}})
    )
    argv = [*seeded["evaluate"], "--calibration", str(root / "other.json"), "--out", str(root / "e-other")]
    one_line_error(cli(*argv), "holds M3 statistics for group seed(s) 5, 6, not for seed 0")
