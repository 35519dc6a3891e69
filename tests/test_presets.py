"""Benchmark presets (negalign_cli/presets.py), their published rows (assets/published.json) and
`negalign benchmarks`: well-formed data, real folders / image lists / metadata under a data root,
the counts negalign's own reader finds, and the transcription of the published figures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from negalign_cli import presets
from negalign_cli.assets import asset_path, class_presets
from negalign_cli.errors import NegalignError
from tests.faults.helpers import cli, one_line_error


def _image(path: Path, colour: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (colour, 90, 200)).save(path)


def make_root(root: Path, name: str, per_set: int = 3) -> Path:
    """A tiny data root with every required set of preset ``name`` laid out as the preset expects
    (real image files, OpenOOD lists, a Waterbirds metadata.csv); optional sets left out."""
    preset = presets.get_preset(name)
    for number, spec in enumerate(preset.sets):
        if spec.optional:
            continue
        if spec.layout == "folder":
            for i in range(per_set):
                _image(root / spec.path / f"class{i % 2}" / f"{spec.name}-{i}.jpg", number * 20)
        elif spec.layout == "imglist":
            lines = []
            for i in range(per_set):
                relative = f"{spec.name.lower()}/img{i}.jpg"
                _image(root / spec.images / relative, number * 20)
                lines.append(f"{relative} {i if number == 0 else -1}")
            (root / spec.path).parent.mkdir(parents=True, exist_ok=True)
            (root / spec.path).write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            folder = root / spec.path
            rows = []
            # (y, place, split): two majority and two minority test images, one train image
            for i, (y, place, split) in enumerate([(0, 0, 2), (1, 1, 2), (0, 1, 2), (1, 0, 2), (1, 1, 0)]):
                name_ = f"{i:03d}.Bird/img{i}.jpg"
                _image(folder / name_, i * 30)
                rows.append({"img_id": i, "img_filename": name_, "y": y, "split": split, "place": place})
            with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return root


# ---------------------------------------------------------------------------- the presets as data


def test_every_preset_is_well_formed():
    names = presets.preset_names()
    assert len(names) == len(set(names)) and {"imagenet-mos", "openood-imagenet", "waterbirds"} <= set(names)
    settings = json.loads(asset_path("published.json").read_text(encoding="utf-8"))["settings"]
    for preset in presets.PRESETS:
        set_names = [spec.name for spec in preset.sets]
        assert len(set_names) == len(set(set_names)), preset.name
        assert preset.classes in class_presets(), preset.name
        assert preset.id_set.group is None and not preset.id_set.optional, preset.name
        assert preset.published is None or preset.published in settings, preset.name
        for spec in preset.sets:
            where = f"{preset.name}/{spec.name}"
            assert spec.layout in ("folder", "imglist", "waterbirds"), where
            assert spec.count is None or spec.count > 0, where
            assert spec.count is not None or spec.note, f"{where}: an unchecked count says why"
            assert spec.source.citation and spec.source.get, where
            assert (spec.layout == "imglist") == bool(spec.images), where
            assert (spec.layout == "waterbirds") == (spec.split is not None), where
        for spec in preset.ood_sets:
            assert spec.group is None or spec.group in presets.GROUPS, f"{preset.name}/{spec.name}"
        for group in preset.id_groups:
            assert group.count is None or 0 < group.count < (preset.id_set.count or 10**9)


def test_the_published_counts_of_each_setting():
    """The figures the presets promise (MOS subsets, OpenOOD v1.5 list lengths, Waterbirds test)."""
    counts = {p.name: {s.name: s.count for s in p.sets} for p in presets.PRESETS}
    assert counts["imagenet-mos"] == {
        "ImageNet-1K": 50_000,
        "iNaturalist": 10_000,
        "SUN": 10_000,
        "Places": 10_000,
        "Textures": 5_640,
    }
    assert counts["openood-imagenet"] == {
        "ImageNet-1K": 45_000,
        "SSB-hard": 49_000,
        "NINCO": 5_879,
        "iNaturalist": 10_000,
        "Textures": 5_160,
        "OpenImage-O": 15_869,
    }
    groups = {s.name: s.group for s in presets.get_preset("openood-imagenet").ood_sets}
    assert groups == {
        "SSB-hard": "near",
        "NINCO": "near",
        "iNaturalist": "far",
        "Textures": "far",
        "OpenImage-O": "far",
    }
    assert counts["waterbirds"]["Waterbirds"] == 5_794


def test_the_suffixes_counted_are_the_ones_negalign_reads():
    from negalign_cli.inputs.listing import IMAGE_SUFFIXES

    assert presets.IMAGE_SUFFIXES == IMAGE_SUFFIXES


# ---------------------------------------------------------------------------- a real data root


@pytest.mark.parametrize("name", ["imagenet-mos", "openood-imagenet", "waterbirds"])
def test_resolve_finds_every_set_and_negalign_reads_what_is_counted(tmp_path, name):
    from negalign_cli.inputs.listing import list_images

    root = make_root(tmp_path / "data", name)
    resolved = presets.resolve_preset(name, root)
    preset = presets.get_preset(name)
    assert [s.name for s in resolved.ood_sets] == [s.name for s in preset.ood_sets if not s.optional]
    assert resolved.groups == {s.name: s.group for s in preset.ood_sets if s.group and not s.optional}
    for item in resolved.sets:
        assert item.present and item.path.exists(), item.name
        counted = presets.count_images(item)
        # what negalign's own reader makes of the same inputs
        images = list_images(item.path, data_root=item.data_root, split=item.split)
        assert counted == len(images) == (2 + 2 if item.spec.layout == "waterbirds" else 3), item.name
        assert not images.problems, (item.name, images.problems)
        assert all(Path(p).is_file() for p in images.paths), item.name


def test_check_counts_names_exactly_the_sets_that_differ(tmp_path):
    root = make_root(tmp_path / "data", "imagenet-mos")
    resolved = presets.resolve_preset("imagenet-mos", root)
    counted = {item.name: presets.count_images(item) for item in resolved.sets}
    counted["SUN"] = 10_000  # as published
    warnings = presets.check_counts("imagenet-mos", counted)
    named = [w.split(":", 1)[0] for w in warnings]
    assert named == ["ImageNet-1K", "iNaturalist", "Places", "Textures"]
    assert (
        "3 image(s) found" in warnings[1] and "expects 10,000" in warnings[1] and "9,997 fewer" in warnings[1]
    )
    assert (
        presets.check_counts(
            "imagenet-mos", {s.name: s.count for s in presets.get_preset("imagenet-mos").sets}
        )
        == []
    )
    # a set the preset gives no count for (placesbg) is never named
    assert presets.check_counts("waterbirds", {"placesbg": 12}) == []


def test_optional_sets_are_used_where_present(tmp_path):
    root = make_root(tmp_path / "data", "waterbirds")
    _image(root / "iSUN" / "a.jpg")
    resolved = presets.resolve_preset("waterbirds", root)
    assert [s.name for s in resolved.ood_sets] == ["placesbg", "iSUN"]
    assert resolved.groups == {"placesbg": "spurious", "iSUN": "non-spurious"}
    assert resolved.absent_optional == ("Textures", "LSUN_resize", "SVHN")


def test_the_minority_group_is_read_from_metadata(tmp_path):
    root = make_root(tmp_path / "data", "waterbirds")
    resolved = presets.resolve_preset("waterbirds", root)
    (group,) = presets.get_preset("waterbirds").id_groups
    # test split only (the train row is left out); y != place: rows 2 and 3
    assert presets.id_group_members(resolved.id_set, group) == ["002.Bird/img2.jpg", "003.Bird/img3.jpg"]


def test_a_missing_set_names_the_path_expected_and_its_source(tmp_path):
    root = make_root(tmp_path / "data", "openood-imagenet")
    (root / "benchmark_imglist/imagenet/test_ninco.txt").unlink()
    with pytest.raises(NegalignError) as caught:
        presets.resolve_preset("openood-imagenet", root)
    message = str(caught.value)
    assert "\n" not in message
    assert "NINCO" in message and "SSB-hard" not in message
    assert str(root / "benchmark_imglist/imagenet/test_ninco.txt") in message
    assert "github.com/Jingkang50/OpenOOD" in message
    with pytest.raises(NegalignError, match="not a folder"):
        presets.resolve_preset("imagenet-mos", tmp_path / "nowhere")


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(NegalignError, match="did you mean imagenet-mos"):
        presets.get_preset("imagenet_mos")
    with pytest.raises(NegalignError) as caught:
        presets.resolve_preset("cifar10", ".")
    assert "did you mean" not in str(caught.value)
    assert "imagenet-mos, openood-imagenet, waterbirds" in str(caught.value)


# ---------------------------------------------------------------------------- the command


def test_benchmarks_lists_every_preset():
    result = cli("benchmarks")
    assert result.exit_code == 0, result.output
    for preset in presets.PRESETS:
        assert preset.name in result.output
    for text in (
        "SSB-hard [near] 49,000",
        "OpenImage-O [far] 15,869",
        "Textures [far] 5,640",
        "MCM, NegLabel",
    ):
        assert text in result.output, text


def test_benchmarks_shows_one_preset():
    result = cli("benchmarks", "openood-imagenet")
    assert result.exit_code == 0, result.output
    assert "benchmark_imglist/imagenet/test_ssb_hard.txt" in result.output
    assert "images_classic" in result.output and "download.py" in result.output
    assert "none recorded" in result.output
    shown = cli("benchmarks", "imagenet-mos").output
    assert "99.49 / 1.91" in shown and "90.77 / 42.74" in shown and "Table 1" in shown
    one_line_error(
        cli("benchmarks", "imagenet-moss"), "unknown benchmark 'imagenet-moss': did you mean imagenet-mos"
    )


def test_benchmarks_checks_a_data_root(tmp_path):
    root = make_root(tmp_path / "data", "imagenet-mos")
    for image in (root / "Places").rglob("*.jpg"):
        image.unlink()
    (root / "dtd").rename(tmp_path / "elsewhere")
    result = cli("benchmarks", "imagenet-mos", "--data-root", str(root))
    assert result.exit_code == 0, result.output
    assert "missing: Textures" in result.output
    assert "warning: iNaturalist: 3 image(s) found" in result.output
    assert "warning: Places: 0 image(s) found" in result.output
    assert "warning: Textures" not in result.output  # missing, not miscounted
    one_line_error(cli("benchmarks", "--data-root", str(tmp_path / "nowhere")), "is not a folder")


def test_benchmarks_imports_no_torch(tmp_path):
    root = make_root(tmp_path / "data", "waterbirds")
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from negalign_cli.cli.app import app\n"
        "runner = CliRunner()\n"
        "for args in (['benchmarks'], ['benchmarks', 'imagenet-mos'], ['benchmarks', 'waterbirds', '--data-root', sys.argv[1]]):\n"
        "    result = runner.invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = [m for m in ('torch', 'sklearn', 'pandas', 'matplotlib', 'open_clip', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(root)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"negalign benchmarks imported {result.stdout.strip()}"


# ---------------------------------------------------------------------------- published figures


def test_published_averages_agree_with_their_per_set_figures():
    """Where a source prints both, the mean of the recorded per-set figures is the recorded average
    (to the 0.01 of two-decimal rounding): a mistyped figure fails here."""
    checked = 0
    for setting in presets.published_data()["settings"]:
        for row in presets.published_setting(setting):
            if row.average is None:
                continue
            figures = list(row.per_set.values())
            for metric in ("auroc", "fpr95"):
                mean = sum(getattr(f, metric) for f in figures) / len(figures)
                assert abs(mean - getattr(row.average, metric)) <= 0.01, (setting, row.method, metric, mean)
            checked += 1
    assert checked >= 2


def test_every_published_figure_names_its_source():
    data = presets.published_data()
    assert data["metric_convention"]["name"] == "neglabel"
    from negalign_cli.defaults import METRIC_CONVENTIONS

    assert "neglabel" in METRIC_CONVENTIONS
    for key, source in data["sources"].items():
        for field in ("authors", "title", "venue", "year", "table", "url", "checked"):
            assert source.get(field), (key, field)
    for setting, entry in data["settings"].items():
        assert entry["backbone"] == "CLIP ViT-B/16"
        for row in presets.published_setting(setting):
            assert row.method_citation, (setting, row.method)
            assert set(row.per_set) == set(entry["sets"]), (setting, row.method)
            for figure in [*row.per_set.values(), *([row.average] if row.average else [])]:
                assert figure.source in data["sources"], (setting, row.method)
                assert 0 <= figure.fpr95 <= 100 and 50 <= figure.auroc <= 100
                assert presets.citation(figure.source).count(",") >= 3


def test_published_rows_follow_the_preset():
    rows = presets.published_rows("imagenet-mos")
    assert [r.method for r in rows] == ["MCM", "NegLabel", "NegRefine"]
    assert all(set(r.per_set) == set(presets.set_names("imagenet-mos")) for r in rows)
    assert rows[1].per_set["iNaturalist"].fpr95 == 1.91 and rows[1].average.auroc == 94.21
    assert presets.published_rows("openood-imagenet") == []
    assert presets.published_rows("waterbirds") == []


def test_the_docs_show_every_preset_count_and_every_published_figure():
    text = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for preset in presets.PRESETS:
        section = text.split(f"## `{preset.name}`", 1)[1].split("\n## ", 1)[0]
        for spec in preset.sets:
            count = "not checked" if spec.count is None else f"{spec.count:,}"
            assert f"| {spec.name} |" in section and count in section, (preset.name, spec.name)
    for setting in presets.published_data()["settings"]:
        for row in presets.published_setting(setting):
            for figure in [*row.per_set.values(), *([row.average] if row.average else [])]:
                assert f"{figure.auroc:.2f} / {figure.fpr95:.2f}" in text, (setting, row.method, figure)


def test_waterbirds_splits_are_matched_as_numbers(tmp_path):
    root = make_root(tmp_path / "data", "waterbirds")
    metadata = root / "waterbird_complete95_forest2water2" / "metadata.csv"
    metadata.write_text(metadata.read_text(encoding="utf-8").replace(",2,", ",2.0,"), encoding="utf-8")
    resolved = presets.resolve_preset("waterbirds", root)
    assert presets.count_images(resolved.id_set) == 4
    metadata.write_text("img_filename,y,place\na.jpg,0,1\n", encoding="utf-8")
    with pytest.raises(NegalignError, match="no 'split' column"):
        presets.count_images(resolved.id_set)
