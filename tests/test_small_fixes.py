"""Issue 22 item 6: progress bars name their set, the README's demo paragraph matches the demo, the
API docs' snippets run, the API's errors name its arguments, the demo's "Next:" lines work."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.faults.helpers import cli
from tests.helpers import IMPORT_SPY
from tests.helpers.images import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


# --- a. progress bars name the set they work on ----------------------------------------------


def test_set_names_from_every_kind_of_images_source():
    from negalign_cli.inputs.listing import set_name

    assert set_name("/data/iNaturalist") == "iNaturalist"
    assert set_name("/data/iNaturalist/") == "iNaturalist"
    assert set_name("toy/ood_spurious/manifest.csv") == "ood_spurious"  # a generic list: its folder
    assert set_name("benchmark_imglist/test_inaturalist.txt") == "test_inaturalist"
    assert set_name("/wb/waterbird_complete95/metadata.csv (split test)") == "waterbird_complete95 test"
    assert set_name("/data/inat/{00000..00009}.tar") == "inat"
    assert set_name("/data/places.tar") == "places"


def test_progress_bars_name_the_image_set(tmp_path):
    """The real rich reporter through the CLI: every image bar (hashing, embedding, Grad-CAM,
    scoring) and the text bars say which set or list they work on."""
    make_image_folder(tmp_path / "iNaturalist", per_class=2)
    (tmp_path / "classes.txt").write_text("birds\nboats\n")
    (tmp_path / "nouns.txt").write_text("ocean\nforest\nteapot\nlamp\n")
    cache = ("--cache-dir", str(tmp_path / "c"))
    images = ("--images", str(tmp_path / "iNaturalist"), "--workers", "0")
    embedded = cli("embed", "images", *images, *cache)
    assert embedded.exit_code == 0, embedded.output
    assert "hashing images: iNaturalist" in embedded.stderr, embedded.stderr
    assert "embedding images: iNaturalist" in embedded.stderr, embedded.stderr
    classes = ("--classes", str(tmp_path / "classes.txt"))
    cam = cli("cam", *images, *classes, "--out", str(tmp_path / "cam" / "x"), *cache)
    assert cam.exit_code == 0, cam.output
    assert "Grad-CAM on images: iNaturalist" in cam.stderr, cam.stderr
    assert "embedding texts: classes classes.txt" in cam.stderr, cam.stderr
    split = cli(
        "split-vocab", "--nouns", str(tmp_path / "nouns.txt"), "--tau", "0", "--out", str(tmp_path / "s")
    )
    assert split.exit_code == 0, split.output
    scored = cli(
        "score", "--images-dir", str(tmp_path / "cam" / "x"), *classes, "--groups", "2",
        "--negatives-split", str(tmp_path / "s"), "--out", str(tmp_path / "scores"), *cache,
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    # the folder is called x: the name comes from the images the cam run read
    assert "scoring images: iNaturalist" in scored.stderr, scored.stderr


# --- b. the README's demo paragraph is the demo's -------------------------------------------

CARD = ROOT / "negalign_cli" / "assets" / "models" / "negalign-toy.md"


def _readme_demo_paragraph() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("What the demo does and what to expect:")
    return " ".join(text[start : text.index("\n## ", start)].split())


def _readme_neglabel(paragraph: str) -> dict[str, float]:
    """The NegLabel AUROC the paragraph quotes per set (and ``mean``), in %."""
    found = dict((name, float(value)) for value, name in re.findall(r"(\d+\.\d+)% on `(\w+)`", paragraph))
    found["mean"] = float(re.search(r"(\d+\.\d+)% on average", paragraph).group(1))
    return found


def _card_auroc(method: str) -> dict[str, float]:
    """A row of the model card's OOD table: the full `negalign demo`'s AUROC per set, in %."""
    lines = CARD.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method | spurious"))
    names = [c.strip() for c in lines[header].strip("|").split("|")][1:]
    row = next(line for line in lines[header:] if line.startswith(f"| {method} |"))
    cells = [float(c.strip(" *")) for c in row.strip().strip("|").split("|")[1:]]
    return dict(zip(names, cells, strict=True))


def test_the_readme_demo_paragraph_matches_the_demo_settings():
    """Image counts and set names against the demo's own constants and `negalign demo`'s defaults."""
    import inspect

    from negalign_cli.cli.toy_cmd import demo
    from negalign_cli.toy.demo import OOD_SETS
    from negalign_cli.toy.generate import ToySpec

    defaults = inspect.signature(demo).parameters
    n_id, n_ood = defaults["n_id"].default, defaults["n_ood"].default
    assert (n_id, n_ood) == (ToySpec().n_id, ToySpec().n_ood)
    paragraph = _readme_demo_paragraph()
    # the ID test set is the id split (n_id) and id_minority (n_ood): demo.ID_SET reads id_test.csv
    assert int(re.search(r"\((\d+) ID images", paragraph).group(1)) == n_id + n_ood
    assert int(re.search(r"(\d+) on \"their\" backgrounds", paragraph).group(1)) == n_id
    assert f"{ToySpec().correlation:.0%} of the time" in paragraph
    assert int(re.search(r"(\d+) on the other class's backgrounds", paragraph).group(1)) == n_ood
    count, size = map(int, re.search(r"(\d+) OOD sets of (\d+) images", paragraph).groups())
    assert (count, size) == (len(OOD_SETS), n_ood)
    quoted = re.findall(r"`(\w+)`, (?:background-only|other shapes)", paragraph)
    assert quoted == [name.removeprefix("ood_") for name in OOD_SETS]


def test_the_readme_demo_figures_are_the_recorded_demo_output():
    """The README quotes the model card's table of the full demo (re-measured by the ci test
    tests/test_report_browser.py::test_the_full_demo_prints_what_the_readme_and_the_model_card_say)."""
    card = _card_auroc("NegLabel")
    quoted = _readme_neglabel(_readme_demo_paragraph())
    assert set(quoted) == {*card, "mean"}
    for name, value in card.items():
        assert quoted[name] == value, name
    assert quoted["mean"] == pytest.approx(sum(card.values()) / len(card), abs=0.005)


# --- e. the demo's "Next:" lines work as printed ----------------------------------------------


def _make_demo_command(*variables: str) -> list[str]:
    """What `make demo [VAR=value...]` runs (real GNU make, dry run; STAMP= skips the set-up)."""
    done = subprocess.run(
        ["make", "-n", "demo", *variables, "STAMP="], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [shlex.split(line) for line in done.stdout.splitlines() if "scripts/demo.sh" in line]
    assert len(lines) == 1, done.stdout
    return lines[0]


def test_make_demo_names_the_venv_executable_that_pip_installs():
    """`make demo` hands scripts/demo.sh `.venv/bin/negalign` (what its Next: lines print): the venv
    layout puts the console script there, and this venv has it."""
    command = _make_demo_command()
    assert command[:2] == ["bash", "scripts/demo.sh"], command
    negalign = Path(command[2])
    assert not negalign.is_absolute() and negalign.parts[-2:] == ("bin", "negalign"), negalign
    assert Path(sysconfig.get_path("scripts")) == Path(sys.prefix) / negalign.parts[-2]
    assert (Path(sys.prefix) / "bin" / "negalign").is_file()


def _next_lines(stdout: str) -> list[str]:
    assert "\nNext:\n" in stdout, stdout[-2000:]
    return stdout.split("\nNext:\n", 1)[1].splitlines()


@pytest.mark.slow
def test_the_demo_next_lines_run_as_printed(toy_demo):
    """Every path the demo's Next: lines name exists, and every command line runs: `make demo` (a
    real make dry run), the negalign ones in-process after checking the printed executable."""
    out, done = toy_demo
    assert done.returncode == 0, done.stderr[-3000:]
    lines = _next_lines(done.stdout)
    commands = [shlex.split(line.split("$", 1)[1].split("#", 1)[0]) for line in lines if "$ " in line]
    assert len(commands) == 3, lines
    paths = [
        word.rstrip(";,") for line in lines if "$ " not in line for word in line.split() if str(out) in word
    ]
    assert len(paths) == 3, lines
    for path in paths:
        if "<set>" in path:
            for name in ("id", "spurious", "spurious_object", "nonspurious"):
                assert list(Path(path.replace("<set>", name)).glob("*.png")), path
        else:
            assert Path(path).exists(), path
    negalign = str(Path(sys.executable).with_name("negalign"))  # what the fixture handed demo.sh
    for argv in commands:
        if argv[:2] == ["make", "demo"]:  # the same demo again: same script, same folder
            assert _make_demo_command(*argv[2:])[1:4:2] == ["scripts/demo.sh", str(out)], argv
            continue
        assert argv[0] == negalign and Path(argv[0]).is_file(), argv
        result = cli(*argv[1:])
        assert result.exit_code == 0, (argv, result.output[-2000:])


# --- c. the Python snippets of docs/api.md and the README run ------------------------------


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _readme_python_sections() -> str:
    """The README's sections "## Python" and "## Python API: ..." (up to the next section)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.split(r"^(?=## )", text, flags=re.M)
    return "".join(s for s in sections if s.startswith("## Python"))


SNIPPETS = {
    "docs/api.md": [_python_blocks((ROOT / "docs" / "api.md").read_text(encoding="utf-8"))],
    "README.md": [[block] for block in _python_blocks(_readme_python_sections())],
}


@pytest.fixture(scope="module")
def snippet_world(tmp_path_factory):
    """A tiny toy folder (the toy generator's own layout: the names docs/api.md uses)."""
    from negalign_cli.toy.generate import ToySpec, generate_toy

    toy = tmp_path_factory.mktemp("snippets") / "toy"
    generate_toy(toy, ToySpec(n_id=8, n_ood=8))
    return toy


def _names(toy: Path, tmp_path: Path) -> dict:
    """What the test puts in place of the names the snippets set at their top (docs/api.md)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "neg_labels_noun.txt").write_text((toy / "vocab.txt").read_text())  # saved labels: no mining
    return {
        "ARCH": "negalign-tiny-test",
        "CLASSES": toy / "classes.txt",
        "NEGATIVES": toy / "vocab.txt",
        "ID_IMAGES": sorted((toy / "id" / "images").rglob("*.png")),
        "IMAGES": sorted((toy / "ood_spurious" / "images").rglob("*.png")),
        "RUNS": runs,
        "OPTIONS": {"groups": 1, "tau": 0.0},  # the tiny model's random r-scores: every word has a role
        "CACHE": tmp_path / "cache",
    }


def _run_snippet(code: str, namespace: dict, provided: set[str], name: str) -> str:
    """Run ``code`` in ``namespace`` with the top-level assignments of the provided names left out;
    returns what it printed."""
    tree = ast.parse(code)
    tree.body = [
        node
        for node in tree.body
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in provided
        )
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(tree, name, "exec"), namespace)  # noqa: S102 - the documentation's own code
    return printed.getvalue()


@pytest.mark.parametrize(
    "source,blocks",
    [(source, blocks) for source, groups in SNIPPETS.items() for blocks in groups],
    ids=[f"{source}-{i}" for source, groups in SNIPPETS.items() for i in range(len(groups))],
)
def test_the_documented_python_snippets_run(snippet_world, tmp_path, monkeypatch, source, blocks):
    """Every ```python block of docs/api.md (one session, in order) and of the README's Python
    sections runs in-process on the tiny test model and a tiny toy folder, and prints what each
    ``print(...)  # ...`` line says it prints."""
    assert blocks, source
    monkeypatch.chdir(tmp_path)  # a relative path a snippet writes to lands here
    namespace = _names(snippet_world, tmp_path)
    provided = set(namespace)
    # a reader copies the session as printed: its first block sets every provided name it uses
    used = {n for n in provided if re.search(rf"\b{n}\b", "".join(blocks))}
    assert used and used <= {n for n in provided if re.search(rf"^{n} = ", blocks[0], flags=re.M)}, used
    for index, code in enumerate(blocks):
        printed = _run_snippet(code, namespace, provided, f"{source}[{index}]")
        for expected in re.findall(r"^\s*print\(.*\)\s+#\s*(.+)$", code, flags=re.M):
            assert expected.strip() in printed, (source, index, expected, printed)


# --- d. the Python API's errors name its own arguments ----------------------------------------


def test_api_message_spells_the_api_arguments():
    from negalign_cli.api import api_message

    assert api_message("CUDA is not available here: use --device cpu") == (
        "CUDA is not available here: use device='cpu'"
    )
    assert api_message("--groups 100 and --neg-topk K; lower --groups") == (
        "groups=100 and neg_topk=K; lower groups="
    )
    assert api_message("--role-aware keeps 0 negatives") == "use_role_aware_negatives=True keeps 0 negatives"
    assert api_message("--pretrained /w/x.pt is a folder") == "pretrained='/w/x.pt' is a folder"
    # a command to run stays as the CLI spells it, and so do options the API does not take
    assert api_message("run `negalign score --groups 2` with --shards-dir") == (
        "run `negalign score --groups 2` with --shards-dir"
    )


API_BASE = {
    "train_dataset": ["star", "heart"],
    "arch": "negalign-tiny-test",
    "neg_nouns": ["sky", "cup", "lamp", "sand"],
    "groups": 1,
    "device": "cpu",
}


API_ERRORS = [
    ({"precision": "fp16"}, "precision='fp16' needs a CUDA device"),
    ({"cam_method": "nope"}, "unknown cam_method='nope'"),
    ({"bg_pool": "nope"}, "unknown bg_pool='nope'"),
    ({"cam_fg_percentile": 150}, "cam_fg_percentile= must be in [0, 100]"),
    ({"cam_dilate_px": -1}, "cam_dilate_px= must be ≥ 0"),
    ({"invalid_cam": "nope"}, "unknown invalid_cam='nope'"),
    ({"tau": -1}, "tau= must be ≥ 0"),
    ({"groups": 100}, "cannot fill groups=100"),
    ({"negatives_split": "/nonexistent-split"}, "negatives_split= takes"),
]


@pytest.mark.parametrize("arguments,expected", API_ERRORS, ids=[next(iter(a)) for a, _ in API_ERRORS])
def test_api_errors_name_the_api_argument(tmp_path, arguments, expected):
    """The checks the API shares with the CLI, through the API: the message names the argument."""
    from negalign_cli import CLIPNegAlign
    from negalign_cli.errors import NegalignError

    with pytest.raises(NegalignError) as caught:
        CLIPNegAlign(**{**API_BASE, **arguments}, cache_dir=tmp_path / "c").close()
    message = str(caught.value)
    assert expected in message and "--" + next(iter(arguments)).split("_")[-1] not in message, message


def test_api_device_error_names_device_and_the_cli_keeps_its_option(tmp_path):
    import torch

    from negalign_cli import CLIPNegAlign
    from negalign_cli.errors import NegalignError
    from tests.faults.helpers import one_line_error

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(NegalignError, match=r"use device='cpu'$"):
        CLIPNegAlign(**{**API_BASE, "device": "cuda"}, cache_dir=tmp_path / "c")
    # the same check from the command line names the option
    one_line_error(cli("embed", "texts", "--classes", "cifar10", "--device", "cuda"), "use --device cpu")


# ==============================================================================================
# Defects from earlier reviews (one section each; every test here failed on the code before its fix)
# ==============================================================================================

# --- 2. importing the Python API imports no torch ---------------------------------------------

_API_IMPORT = (
    IMPORT_SPY
    + """
import negalign_cli.api, negalign_cli.models
print(json.dumps({"imported": {m: m in sys.modules for m in HEAVY}, "first": first}))
"""
)


def test_importing_the_api_and_models_imports_no_torch():
    """A fresh process (the import is the point): `import negalign_cli.api` (and `negalign_cli.models`)
    import neither torch nor open_clip; their type hints still resolve (torch under TYPE_CHECKING,
    bound on first use), here where torch is loaded."""
    import json
    import typing

    heavy = ["torch", "open_clip"]
    done = subprocess.run(
        [sys.executable, "-c", _API_IMPORT, "{}", json.dumps(heavy)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["imported"] == {"torch": False, "open_clip": False}, seen["first"]
    from negalign_cli.api import CLIPNegAlign
    from negalign_cli.models import LoadedModel

    assert set(typing.get_type_hints(CLIPNegAlign._pixels)) == {"argument", "batch", "return"}
    assert "torch" in str(typing.get_type_hints(LoadedModel)["device"])


# --- 1. the Python API's group_seeds= is `score --group-seeds` ----------------------------------

SEEDS = (0, 1, 2)


def test_api_group_seeds_equal_the_cli_score_group_seeds(tmp_path):
    """`score --group-seeds 0,1,2` and `CLIPNegAlign(group_seeds=[0, 1, 2])` on the same images
    and settings: the same columns (the first seed's) and the same `<column>@seed<S>` per seed;
    the API adds S_final per seed, from that seed's S*."""
    import numpy as np
    import pandas as pd

    from negalign_cli import CLIPNegAlign
    from negalign_cli.compute.score_columns import SCORE_COLUMNS
    from negalign_cli.errors import NegalignError
    from tests.helpers.chain import model_chain

    runs = model_chain(tmp_path)
    for name in ("cam", "split-vocab"):
        assert cli(*runs[name]).exit_code == 0, name
    scored = cli(*runs["score"], "--group-seeds", ",".join(map(str, SEEDS)))
    assert scored.exit_code == 0, scored.output
    expected = pd.read_parquet(tmp_path / "scores" / "scores.parquet")
    seeded = [c for c in expected.columns if "@seed" in c]
    assert seeded, expected.columns  # the CLI wrote per-seed columns: this compares something
    images = [p if Path(p).is_absolute() else tmp_path / "imgs" / p for p in expected["path"]]
    with CLIPNegAlign(
        train_dataset=tmp_path / "classes.txt", arch="negalign-tiny-test", device="cpu",
        negatives_split=tmp_path / "split", groups=2, group_seeds=list(SEEDS),
        use_role_aware_negatives=False, lambda_bg=0.5, cache_dir=tmp_path / "c",
    ) as model:  # fmt: skip
        table = model.detection_scores(images, return_details=True)
        one = model.detection_score(None, orig_image=images[1], return_details=True)
        assert model.settings()["group_seeds"] == list(SEEDS)
    assert [c for c in table.columns if "@seed" in c and not c.startswith("s_final")] == seeded
    for column in (*SCORE_COLUMNS, *seeded):
        got, want = table[column].to_numpy(np.float64), expected[column].to_numpy(np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=column)
    assert {c.split("@")[0] for c in seeded} >= {"s_neglabel_plain", "s_neglabel_star"}
    assert not np.allclose(table["s_neglabel_plain@seed0"], table["s_neglabel_plain@seed1"])  # seeds differ
    for seed in SEEDS:  # S_final of each seed: that seed's S* + λ·P_align
        final = expected[f"s_neglabel_star@seed{seed}"] + 0.5 * expected["p_align"]
        np.testing.assert_allclose(table[f"s_final@seed{seed}"], final, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(table["s_final"], table["s_final@seed0"])
    assert one["s_neglabel_plain@seed2"] == pytest.approx(table["s_neglabel_plain@seed2"][1], rel=2e-6)

    # calibration= a results.json of group-seeded scores: each seed's S_final with its own statistics
    stats = {
        str(seed): {
            "s_neglabel_star": {"mean": 0.1 * seed, "std": 1.0 + seed},
            "p_align": {"mean": 0.0, "std": 2.0},
        }
        for seed in SEEDS
    }
    with CLIPNegAlign(
        train_dataset=tmp_path / "classes.txt", arch="negalign-tiny-test", device="cpu",
        negatives_split=tmp_path / "split", groups=2, group_seeds=list(SEEDS),
        use_role_aware_negatives=False, lambda_bg=0.5, cache_dir=tmp_path / "c",
        use_scale_stabilization=True, calibration={"calibration": stats["0"], "calibration_by_seed": stats},
    ) as model:  # fmt: skip
        m3 = model.detection_scores(images, return_details=True)
    for seed in SEEDS:
        star, align = stats[str(seed)]["s_neglabel_star"], stats[str(seed)]["p_align"]
        z = (expected[f"s_neglabel_star@seed{seed}"] - star["mean"]) / star["std"]
        final = z + 0.5 * (expected["p_align"] - align["mean"]) / align["std"]
        np.testing.assert_allclose(m3[f"s_final@seed{seed}"], final, rtol=2e-6, atol=2e-6)
    with pytest.raises(NegalignError, match="not for seed 0"):
        CLIPNegAlign(
            train_dataset=tmp_path / "classes.txt", arch="negalign-tiny-test", device="cpu",
            negatives_split=tmp_path / "split", groups=2, group_seeds=list(SEEDS),
            use_scale_stabilization=True, calibration={"calibration_by_seed": {"7": stats["0"]}},
        )  # fmt: skip


@pytest.mark.parametrize(
    "arguments,expected",
    [
        ({"group_seeds": [0, 1], "groups": 1}, "group_seeds= changes nothing with groups=1"),
        ({"group_seeds": [0, 1], "group_seed": 3}, "give either group_seed= or group_seeds=, not both"),
        ({"group_seeds": [4]}, "holds one seed"),
        ({"group_seeds": [1, 1]}, "gives seed(s) 1 more than once"),
        ({"group_seeds": [0, 1.5]}, "is not a list of integers"),
    ],
    ids=["one-group", "both", "one-seed", "twice", "not-whole"],
)
def test_api_group_seeds_errors_name_the_argument(tmp_path, arguments, expected):
    """Refused before any model is built, as `score --group-seeds` refuses them."""
    from negalign_cli import CLIPNegAlign
    from negalign_cli.errors import NegalignError

    with pytest.raises(NegalignError) as caught:
        CLIPNegAlign(**{**API_BASE, "groups": 2, **arguments}, cache_dir=tmp_path / "c").close()
    assert expected in str(caught.value) and "--group" not in str(caught.value), str(caught.value)


# --- 3. `toy generate` into an earlier run's folder writes exactly the new set -----------------


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _toy(out: Path, n_id: int, n_ood: int):
    return cli("toy", "generate", "--out", str(out), "--n-id", str(n_id), "--n-ood", str(n_ood), "-q")


def test_toy_generate_again_removes_only_its_own_earlier_files(tmp_path):
    """A second, smaller run into the same folder: the folder then holds what a run into an empty
    folder writes (no stale image of the first run is listed), plus a user's own file, untouched;
    ``toy_files.txt`` lists exactly the toy's files."""
    from negalign_cli.inputs.listing import list_images

    out, fresh = tmp_path / "toy", tmp_path / "fresh"
    assert _toy(out, 6, 3).exit_code == 0
    (out / "notes.md").write_text("my notes\n")  # the user's: not in toy_files.txt
    (out / "id" / "images" / "mine").mkdir()
    (out / "id" / "images" / "mine" / "keep.png").write_bytes(b"user")  # inside a toy folder, not the toy's
    assert _toy(out, 2, 1).exit_code == 0
    assert _toy(fresh, 2, 1).exit_code == 0
    assert _files(out) == sorted([*_files(fresh), "notes.md", "id/images/mine/keep.png"])
    listed = (out / "toy_files.txt").read_text().splitlines()
    assert sorted(listed) == [f for f in _files(fresh) if f != "toy_files.txt"]
    assert len(list_images(out / "ood_spurious" / "images").paths) == 1
    assert (out / "notes.md").read_text() == "my notes\n"
    folders = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir()}  # none left empty
    assert folders == {p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_dir()} | {
        "id/images/mine"
    }


def test_toy_generate_refuses_a_folder_it_did_not_write(tmp_path):
    """A non-empty folder without toy_files.txt is refused (one error line), nothing removed; a
    toy_files.txt naming files outside the folder removes none of them; --help says so."""
    from tests.faults.helpers import one_line_error

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    one_line_error(_toy(mine, 2, 1), "is not empty and holds no toy_files.txt")
    assert _files(mine) == ["thesis.tex"]
    out = tmp_path / "toy"
    assert _toy(out, 2, 1).exit_code == 0
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    elsewhere = tmp_path / "elsewhere"  # a listed folder replaced by a link to another folder
    elsewhere.mkdir()
    (elsewhere / "minority.csv").write_text("keep")
    shutil.rmtree(out / "groups")
    (out / "groups").symlink_to(elsewhere)
    with (out / "toy_files.txt").open("a") as listing:
        listing.write(f"../outside.txt\n{outside}\n")
    one_line_error(_toy(out, 2, 1), "leads outside --out")  # nothing written through the link
    assert outside.read_text() == "keep" and (elsewhere / "minority.csv").read_text() == "keep"
    help_text = " ".join(cli("toy", "generate", "--help").output.split())
    assert "toy_files.txt" in help_text and "refused" in help_text, help_text


# --- 4. results.json is standard JSON ----------------------------------------------------------


def _no_constants(name: str):
    raise ValueError(f"results.json holds {name}, which standard JSON does not have")


def test_results_json_is_standard_json_with_nonfinite_values_noted(tmp_path, placeholder_figures):
    """A score column `evaluate` does not rank by (s_energy without --compare) holding inf: its
    statistics were written as `Infinity`/`NaN`; now null, listed under `nonfinite` with their
    value, which the project's readers (the hit's rendering, `report`, `--calibration`) put back."""
    import json
    import math

    import numpy as np
    import pandas as pd

    from negalign_cli.stages.results_json import loads_results
    from tests.helpers.synthetic import write_scores

    ood = write_scores(tmp_path / "ood.parquet", 20, 1, shift=0.1)
    frame = pd.read_parquet(ood)
    frame.loc[3, "s_energy"] = np.inf
    frame.to_parquet(ood, index=False)
    ids = write_scores(tmp_path / "id.parquet", 20, 0, shift=0.3)
    argv = [
        "evaluate",
        "--id",
        str(ids),
        "--ood",
        f"far={ood}",
        "--scale-stabilize",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    done = cli(*argv, "--out", str(tmp_path / "r"))
    assert done.exit_code == 0, done.output
    text = (tmp_path / "r" / "results.json").read_text()
    results = json.loads(text, parse_constant=_no_constants)  # browsers' JSON.parse and jq read it
    noted = {tuple(entry["path"]): entry["value"] for entry in results["nonfinite"]["values"]}
    assert noted[("statistics", "ood:far", "s_energy_mean")] == "Infinity", noted
    assert noted[("statistics", "ood:far", "s_energy_std")] == "NaN", noted
    assert results["statistics"]["ood:far"]["s_energy_mean"] is None
    restored = loads_results(text)
    assert "nonfinite" not in restored and restored["statistics"]["ood:far"]["s_energy_mean"] == math.inf
    assert math.isnan(restored["statistics"]["ood:far"]["s_energy_std"])
    assert restored["statistics"]["id"] == results["statistics"]["id"]  # finite values as written
    hit = cli(*argv, "--out", str(tmp_path / "r2"))  # the hit renders the stored results.json
    assert hit.exit_code == 0 and "cache hit" in hit.output, hit.output
    assert cli("report", str(tmp_path / "r"), "-q").exit_code == 0
    again = cli(
        *argv[:-2], "--calibration", str(tmp_path / "r" / "results.json"), "--cache-dir", str(tmp_path / "c")
    )
    assert again.exit_code == 0, again.output


# --- 5. a cache hit leaves an unchanged --out export as it is ----------------------------------


def _stats(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_ctime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_cam_hit_does_not_copy_an_unchanged_export_again(tmp_path):
    """`cam --out` on a hit used to replace every exported file (new inodes, new times); now an
    exported file with the artifact's content is left alone (same inode, mtime and ctime), one that
    was changed is restored, and a file the export no longer has is still removed."""
    from tests.helpers.chain import model_chain

    argv = model_chain(tmp_path)["cam"]
    out = tmp_path / "cam"
    assert cli(*argv).exit_code == 0
    before = _stats(out)
    assert "manifest.json" in before and len(before) > 2, before
    (out / "scores.parquet").write_bytes(b"another stage's output, left by an earlier run")
    hit = cli(*argv)
    assert hit.exit_code == 0 and "cache hit" in hit.output, hit.output
    assert _stats(out) == before  # scores.parquet removed, nothing else touched
    changed = next(name for name in before if name.endswith(".npy"))
    original = (out / changed).read_bytes()
    (out / changed).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes
    assert cli(*argv).exit_code == 0
    assert (out / changed).read_bytes() == original
    after = _stats(out)
    assert {n: s for n, s in after.items() if n not in (changed, "manifest.json")} == {
        n: s for n, s in before.items() if n not in (changed, "manifest.json")
    }


# --- 6. the stat cache keeps inodes (and devices) of 2**63 and more -----------------------------


def test_stat_rows_round_trip_unsigned_64_bit_inodes():
    """SQLite's INTEGER is signed: an inode ≥ 2**63 (NFS, overlayfs, FUSE) made the row insert raise
    OverflowError; the row packing stores it as its two's complement and reads the same stat back."""
    from negalign_cli.cache.statcache import _row_stat, _stat_row

    for inode in (0, 2**63 - 1, 2**63, 2**63 + 7, 2**64 - 1):
        seen = (10, -5, 7, inode, 2**64 - 2)
        row = _stat_row(b"/x", seen, "ab" * 32)
        assert all(-(2**63) <= v < 2**63 for v in row[1:6]), row
        assert _row_stat(row) == seen


def test_a_file_with_an_inode_beyond_int64_is_remembered(tmp_path, monkeypatch):
    """Through the real stat.db: a file whose stat reports an inode ≥ 2**63 is hashed once,
    recorded, and served from its row the next time; another inode is hashed again."""
    import os

    from negalign_cli.cache.statcache import StatCache

    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    os.utime(path, ns=(10**18, 10**18))  # older than the racy window: it may be recorded
    inode = {"value": 2**63 + 7}
    real_stat = os.stat

    class Stat:  # os.stat's answer for this file, with the inode a large file system gives
        def __init__(self, result):
            self.result = result

        def __getattr__(self, name):
            return inode["value"] if name == "st_ino" else getattr(self.result, name)

    def stat(target, *args, **kwargs):
        result = real_stat(target, *args, **kwargs)
        return Stat(result) if os.fspath(target) == str(path) else result

    monkeypatch.setattr(os, "stat", stat)
    cache = StatCache(tmp_path / "stat.db")
    first = cache.file_digests([str(path)])
    assert first[0][0] is not None and cache.hashed == 1, first
    assert cache.file_digests([str(path)]) == first and cache.hits == 1 and cache.hashed == 1
    inode["value"] = 2**64 - 1  # another file at the same path: not served from the row
    assert cache.file_digests([str(path)]) == first and cache.hashed == 2


# --- 7. scikit-learn is a test dependency, not a runtime one -----------------------------------

# The import names of the dev extra's packages that a runtime module could import by mistake.
DEV_IMPORTS = {
    "scikit-learn": "sklearn",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "grad-cam": "pytorch_grad_cam",
}


def _imported_roots(folder: Path) -> dict[str, str]:
    """Top-level module name -> the first file under ``folder`` that imports it (any import statement)."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_scikit_learn_is_a_dev_dependency_that_no_runtime_module_imports():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    runtime, dev = names(project["dependencies"]), names(project["optional-dependencies"]["dev"])
    assert "scikit-learn" not in runtime and "scikit-learn" in dev
    imported = _imported_roots(ROOT / "negalign_cli")  # what `pip install negalign` must provide
    for package, module in DEV_IMPORTS.items():
        if package not in runtime:
            assert module not in imported, f"{imported[module]} imports {module} ({package}: a dev extra)"


# --- 8. a fixture is written once (conftest), not copied into each test file ---------------------


def test_no_two_test_modules_define_the_same_fixture():
    """tests/test_gpu_paths.py copied test_vision.py's `setup` fixture (and two fault files their
    `folder`): a fixture defined with the same name and the same body in two files is shared from a
    conftest.py (or tests/helpers) instead."""
    from collections import defaultdict

    defined = defaultdict(list)
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and any(
                "fixture" in ast.dump(d) for d in node.decorator_list
            ):
                body = ast.dump(ast.Module(body=node.body, type_ignores=[]))
                defined[node.name, body].append(path.relative_to(ROOT).as_posix())
    copies = {name: paths for (name, _), paths in defined.items() if len(paths) > 1}
    assert not copies, copies
