"""Results a paper can use (issue 22), end to end on a tiny world: two presets' folder layouts
(`imagenet-mos`: ImageNet's WordNet-id class folders and the MOS folders; `openood-imagenet`:
OpenOOD's image lists with integer labels) found by ``resolve_preset``, every set embedded and
scored with ``score --group-seeds 0,1,2`` by the tiny test model, then ``evaluate --benchmark``
and ``report``. The wide table (sets, near/far group means, the mean, mean±std cells, the ID
accuracy line, published rows) must agree across the console, table.csv, results.json and
report.html/md/tex. Also: ImageNet-1K WordNet ids as ID labels, the API's ``groups=`` check, and
the README's screenshots."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from negalign_cli import presets
from negalign_cli.stages.paper_table import MEAN_COLUMN
from tests.faults.helpers import cli
from tests.helpers import in_process
from tests.helpers.images import rgb

ROOT = Path(__file__).resolve().parents[1]
SEEDS = "0,1,2"
# two ImageNet-1K classes (indices 0 and 1 of the `imagenet` preset) and their WordNet ids
CLASSES = ("tench", "goldfish")
WNIDS = ("n01440764", "n01443537")
# the --ood names a user would type: other cases and aliases of the presets' set names
OOD_NAMES = {
    "imagenet-mos": {"iNaturalist": "inat", "SUN": "sun", "Places": "places", "Textures": "dtd"},
    "openood-imagenet": {
        "SSB-hard": "ssb_hard",
        "NINCO": "ninco",
        "iNaturalist": "inaturalist",
        "Textures": "textures",
        "OpenImage-O": "openimage_o",
    },
}
PER_SET = 4


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _layout(root: Path, name: str) -> Path:
    """Preset ``name``'s required sets under ``root``, as the preset expects them: ImageNet's val
    folder in WordNet-id class folders, OpenOOD's lists with integer class indices as labels."""
    preset = presets.get_preset(name)
    for number, spec in enumerate(preset.sets):
        if spec.optional:
            continue
        seeds = [1000 * number + 17 * i + len(name) for i in range(PER_SET)]
        if spec.layout == "folder":
            for i, seed in enumerate(seeds):
                folder = WNIDS[i % 2] if spec is preset.id_set else f"c{i % 2}"
                (root / spec.path / folder).mkdir(parents=True, exist_ok=True)
                rgb(seed, size=24).save(root / spec.path / folder / f"{i}.png")
        else:
            lines = []
            for i, seed in enumerate(seeds):
                relative = f"{spec.name.lower()}/{i}.png"
                (root / spec.images / relative).parent.mkdir(parents=True, exist_ok=True)
                rgb(seed, size=24).save(root / spec.images / relative)
                lines.append(f"{relative} {i % 2 if spec is preset.id_set else -1}")
            (root / spec.path).parent.mkdir(parents=True, exist_ok=True)
            (root / spec.path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _placeholder_png(path: Path, *_args) -> None:
    Image.new("RGB", (16, 12), (255, 255, 255)).save(path)


def _paper_run(base: Path, name: str, figures: bool) -> dict:
    """Preset ``name``'s sets laid out under ``base``, resolved, each embedded and scored over
    three group seeds; `evaluate --benchmark` on them (console output kept) and `report`. Without
    ``figures`` roc.png and score_hist.png are blank PNGs: drawing them is most of evaluate's time
    here, and other tests check them (the ci run of this chain draws them)."""
    from negalign_cli.stages import plots

    (base / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (base / "nouns.txt").write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\nkettle\nsky\n")
    cache = ("--cache-dir", str(base / "c"))
    with in_process(), pytest.MonkeyPatch.context() as patch:
        if not figures:
            patch.setattr(plots, "plot_roc", _placeholder_png)
            patch.setattr(plots, "plot_histograms", _placeholder_png)
        resolved = presets.resolve_preset(name, _layout(base / "data", name))
        files = {}
        for item in resolved.sets:
            key = "id" if item is resolved.id_set else OOD_NAMES[name][item.name]
            embedded, scored = base / "runs" / f"e-{key}", base / "runs" / f"s-{key}"
            where = ["--data-root", str(item.data_root)] if item.data_root else []
            _ok(cli("embed", "images", "--images", str(item.path), *where, "--workers", "0",
                    "--out", str(embedded), *cache))  # fmt: skip
            _ok(cli("score", "--images-dir", str(embedded), "--classes", str(base / "classes.txt"),
                    "--nouns", str(base / "nouns.txt"), "--groups", "2", "--group-seeds", SEEDS,
                    "--out", str(scored), *cache))  # fmt: skip
            files[key] = scored / "scores.parquet"
        out = base / "results"
        argv = ["evaluate", "--id", str(files.pop("id")), "--compare", "--benchmark", name]
        for key, path in files.items():
            argv += ["--ood", f"{key}={path}"]
        evaluated = _ok(cli(*argv, "--out", str(out), *cache, env={"COLUMNS": "240"}))
        _ok(cli("report", str(out), *cache))
    return {"name": name, "resolved": resolved, "out": out, "console": evaluated.stdout, "id": argv[2]}


@pytest.fixture(scope="module")
def mos(tmp_path_factory):
    """imagenet-mos: WordNet-id class folders, the far group, the published rows."""
    return _paper_run(tmp_path_factory.mktemp("mos"), "imagenet-mos", figures=False)


@pytest.fixture(scope="module")
def openood(tmp_path_factory):
    """openood-imagenet: image lists with integer labels, near and far (ci: figures drawn)."""
    return _paper_run(tmp_path_factory.mktemp("openood"), "openood-imagenet", figures=True)


@pytest.fixture(params=["imagenet-mos", pytest.param("openood-imagenet", marks=pytest.mark.ci)])
def world(request):
    return request.getfixturevalue("mos" if request.param == "imagenet-mos" else "openood")


def _results(run) -> dict:
    return json.loads((run["out"] / "results.json").read_text())


def _cell(value: float, std: float | None) -> str:
    return f"{value:.2f}" if std is None else f"{value:.2f}±{std:.2f}"


@pytest.mark.slow
def test_benchmark_fills_sets_and_groups(world):
    run = world
    name, preset = run["name"], presets.get_preset(run["name"])
    results = _results(run)
    typed = OOD_NAMES[name]
    assert results["benchmark"]["sets"] == {typed[s.name]: s.name for s in preset.ood_sets if not s.optional}
    expected: dict[str, list[str]] = {}
    for spec in preset.ood_sets:
        expected.setdefault(str(spec.group), []).append(typed[spec.name])
    assert {group: block["sets"] for group, block in results["groups"].items()} == expected
    if name == "openood-imagenet":
        assert set(expected) == {"near", "far"}
    assert results["group_seeds"]["seeds"] == [0, 1, 2]
    assert "warning" not in run["console"]


@pytest.mark.slow
def test_the_wide_table_agrees_in_all_five_outputs(world):
    """Each run row's cells (sets, groups, mean) in table.csv equal results.json, with a std where
    the method depends on the grouping; the same "mean±std" text is in the console and the three
    reports, with the ID accuracy line."""
    run = world
    results = _results(run)
    table = pd.read_csv(run["out"] / "table.csv")
    convention = results["metrics_convention"]
    columns = [*results["ood"], *results["groups"], MEAN_COLUMN]
    ours = table[table["source"] == "this run"]
    assert len(ours) == len(results["mean"]["methods"])
    reports = {
        n: (run["out"] / "report" / n).read_text(encoding="utf-8")
        for n in ("report.html", "report.md", "report.tex")
    }
    texts = {"console": run["console"], **reports}
    texts["report.html"] = html.unescape(texts["report.html"])
    texts["report.tex"] = texts["report.tex"].replace("$\\pm$", "±").replace("\\pm", "±").replace("\\%", "%")
    with_std = 0
    for (_, row), method in zip(ours.iterrows(), results["mean"]["methods"], strict=True):
        for column in columns:
            block = (
                results["mean"]
                if column == MEAN_COLUMN
                else results["groups"].get(column) or results["ood"][column]
            )
            entry = block["methods"][method]
            metrics, std = entry["metrics"][convention], (entry.get("std") or {}).get(convention)
            assert row[f"{column} AUROC"] == pytest.approx(100 * metrics["auroc"], abs=1e-3), (method, column)
            assert row[f"{column} FPR@95"] == pytest.approx(100 * metrics["fpr95"], abs=1e-3), (
                method,
                column,
            )
            if std is None:
                assert np.isnan(row[f"{column} AUROC std"]), (method, column)
                continue
            with_std += 1
            assert row[f"{column} AUROC std"] == pytest.approx(100 * std["auroc"], abs=1e-3)
            text = _cell(100 * metrics["auroc"], 100 * std["auroc"])
            for where, body in texts.items():
                assert text in body, (where, method, column, text)
    assert with_std >= 3 * len(columns)  # NegLabel, NegRefine, NegLabel* at least: mean ± std everywhere
    # each group column is the unweighted mean of its sets
    for block in results["groups"].values():
        for method, entry in block["methods"].items():
            members = [
                results["ood"][s]["methods"][method]["metrics"][convention]["auroc"] for s in block["sets"]
            ]
            assert entry["metrics"][convention]["auroc"] == pytest.approx(np.mean(members), abs=1e-9)
    # the ID accuracy: one figure, recomputed from the ID score file, in every output
    accuracy = results["id"]["accuracy"]
    assert accuracy["top1"] is not None, accuracy
    frame = pd.read_parquet(run["id"])
    first = frame[frame["group_seed"] == 0] if "group_seed" in frame.columns else frame
    truth = first["label"].map({**dict(zip(WNIDS, (0, 1), strict=True)), "0": 0, "1": 1, 0: 0, 1: 1})
    expected = float(np.mean(truth.to_numpy() == first["pred_class"].to_numpy()))
    assert accuracy["top1"] == pytest.approx(expected) and accuracy["n"] == PER_SET
    line = f"{100 * expected:.2f}%"
    for where, body in texts.items():
        assert "ID accuracy" in body and line in body, where
    assert ours["ID top-1"].to_numpy() == pytest.approx(np.full(len(ours), 100 * expected))


@pytest.mark.slow
def test_published_rows_beside_seeded_rows(mos):
    """imagenet-mos: the published rows (plain, as printed) follow the run's mean±std rows; their
    figures are assets/published.json's, in table.csv and each report."""
    run = mos
    table = pd.read_csv(run["out"] / "table.csv")
    recorded = presets.published_data()["settings"]["imagenet-mos"]["rows"]
    published = table[table["source"] == "published"]
    assert list(published["method"]) == [row["method"] for row in recorded]
    typed = OOD_NAMES["imagenet-mos"]
    for row in recorded:
        line = published[published["method"] == row["method"]].iloc[0]
        for set_name, figure in row["per_set"].items():
            assert line[f"{typed[set_name]} AUROC"] == figure["auroc"]
            assert line[f"{typed[set_name]} FPR@95"] == figure["fpr95"]
            assert np.isnan(line[f"{typed[set_name]} AUROC std"])  # a published figure has no std
        if row["average"]:
            assert line["mean AUROC"] == row["average"]["auroc"]
    assert "NegLabel (published [1])" in run["console"]
    bodies = {
        n: (run["out"] / "report" / n).read_text(encoding="utf-8")
        for n in ("report.html", "report.md", "report.tex")
    }
    for name, body in {**bodies, "console": run["console"]}.items():
        assert "Negative Label Guided OOD Detection" in body, name
        for row in recorded:
            sun = row["per_set"]["SUN"]
            assert f"{sun['auroc']:.2f} / {sun['fpr95']:.2f}" in body, (name, row["method"])


@pytest.mark.slow
def test_id_labels_read_as_wordnet_ids_or_indices(world):
    """imagenet-mos's ID folder is ImageNet's WordNet-id class folders; OpenOOD's ID list gives
    integer class indices: both give an accuracy, each saying how its labels were read."""
    labels = "ImageNet-1K WordNet ids" if world["name"] == "imagenet-mos" else "class indices"
    assert _results(world)["id"]["accuracy"]["labels"] == labels
    assert f"labels read as {labels})" in world["console"]


# ---------------------------------------------------------------------------- WordNet ids


def test_the_wordnet_id_list_is_imagenet_1k_in_class_index_order():
    from negalign_cli.assets import class_presets, imagenet_wnids

    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    names = class_presets()["imagenet"]
    # facts of ILSVRC 2012: a few ids and their classes, ends and the two "crane"s included
    known = {
        "n01440764": "tench",
        "n01443537": "goldfish",
        "n01530575": "brambling",
        "n02012849": "crane bird",
        "n03126707": "construction crane",
        "n02085620": "Chihuahua",
        "n15075141": "toilet paper",
    }
    for wnid, name in known.items():
        assert names[wnids.index(wnid)] == name, wnid
    attribution = (ROOT / "negalign_cli" / "assets" / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "`imagenet_wnids.txt`" in attribution


def _frame(labels, predicted, names):
    return pd.DataFrame(
        {"label": labels, "pred_class": predicted, "pred_name": np.asarray(names, dtype=object)[predicted]}
    )


def test_wordnet_id_accuracy_by_index_by_name_or_a_note():
    from negalign_cli.assets import class_presets, imagenet_wnids
    from negalign_cli.stages.evaluation import id_accuracy

    wnids, names = np.array(imagenet_wnids()), np.array(class_presets()["imagenet"], dtype=object)
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 1000, 400)
    predicted = np.where(rng.uniform(size=400) < 0.6, truth, rng.integers(0, 1000, 400))
    expected = float(np.mean(truth == predicted))
    # the `imagenet` preset's classes: compared by index (the two "missile"s and "sunglasses" apart)
    got = id_accuracy(_frame(wnids[truth], predicted, names))
    assert got == {"top1": pytest.approx(expected), "n": 400, "labels": "ImageNet-1K WordNet ids"}
    # the same classes in another order: compared by name
    order = rng.permutation(1000)
    shuffled = names[order]
    position = np.argsort(order)
    got = id_accuracy(_frame(wnids[truth], position[predicted], shuffled))
    named = np.array([n.lower() for n in names])
    assert got["labels"] == "ImageNet-1K WordNet ids, as class names"
    assert got["top1"] == pytest.approx(float(np.mean(named[truth] == named[predicted])))
    # other classes: a note, no number
    other = np.array(["star", "heart", "moon"], dtype=object)
    got = id_accuracy(_frame(wnids[truth], predicted % 3, other))
    assert got["top1"] is None and "score file's classes are not ImageNet-1K's" in got["note"]
    # an id outside ImageNet-1K (ImageNet-21K's): a note
    labels = wnids[truth].copy()
    labels[5] = "n00004475"
    got = id_accuracy(_frame(labels, predicted, names))
    assert got["top1"] is None and "outside ImageNet-1K's 1,000 classes (e.g. 'n00004475')" in got["note"]


# ---------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("argument,value", [("groups", 0), ("groups", -1), ("groups", 2.5), ("neg_topk", 0)])
def test_api_refuses_groups_below_one(tmp_path, argument, value):
    """Before: accepted, and a ValueError (or nonsense) at the first image scored."""
    from negalign_cli import CLIPNegAlign
    from negalign_cli.errors import NegalignError

    settings = {"groups": 1, argument: value}
    with pytest.raises(NegalignError) as caught:
        CLIPNegAlign(
            train_dataset=["star", "heart"],
            arch="negalign-tiny-test",
            neg_nouns=["sky", "cup", "lamp", "sand"],
            device="cpu",
            use_p_align=False,
            cache_dir=tmp_path / "c",
            **settings,
        )
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{argument}= must be a whole number of at least 1")


# ---------------------------------------------------------------------------- the README


def test_readme_shows_the_report_at_both_widths():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for width in (1280, 390):
        path = ROOT / "docs" / "images" / f"report-{width}.png"
        assert f'src="docs/images/report-{width}.png"' in readme, width
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width == width, (width, image.size)
