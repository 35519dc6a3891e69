"""CLIPNegAlign, the method's Python API: the method description's "Basic Usage" and every
"Configuration Example" on the toy model, equality with the CLI pipeline's scores, one image
against the batch, M3 with ID statistics, arch names, the light import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from negalign_cli.cli.app import app
from negalign_cli.compute.score_columns import SCORE_COLUMNS
from negalign_cli.errors import NegalignError
from negalign_cli.toy.demo import TOY_TAU
from negalign_cli.toy.generate import ToySpec, generate_toy
from tests.helpers import in_process

# The toy model card's settings (negalign_cli/assets/models/negalign-toy.md): every API call in
# this file passes these, as a user of the toy world would.
TOY = {"arch": "negalign-toy", "device": "cpu", "groups": 1, "tau": TOY_TAU, "cam_method": "gradxact"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    generate_toy(root / "toy", ToySpec(n_id=10, n_ood=6))
    return root


@pytest.fixture(scope="module")
def cli_scores(toy):
    """The CLI pipeline on the toy ID split: split-vocab, cam, score (role-aware, λ-free)."""
    runner = CliRunner()
    cache = str(toy / "cli-cache")
    common = ["--model", "negalign-toy", "--device", "cpu", "--cache-dir", cache, "-q"]
    steps = [
        [
            "split-vocab",
            "--nouns",
            str(toy / "toy/vocab.txt"),
            "--tau",
            str(TOY_TAU),
            "--out",
            str(toy / "split"),
        ],
        [
            "cam",
            "--images",
            str(toy / "toy/id/manifest.csv"),
            "--classes",
            str(toy / "toy/classes.txt"),
            "--cam-method",
            "gradxact",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--out",
            str(toy / "cam"),
        ],
        [
            "score",
            "--images-dir",
            str(toy / "cam"),
            "--classes",
            str(toy / "toy/classes.txt"),
            "--negatives-split",
            str(toy / "split"),
            "--role-aware",
            "--groups",
            "1",
            "--out",
            str(toy / "scores"),
        ],
    ]
    with in_process():  # before the per-test isolation: undo what the commands change for the process
        for step in steps:
            result = runner.invoke(app, [*step, *common])
            assert result.exit_code == 0, (step, result.output)
    return pd.read_parquet(toy / "scores" / "scores.parquet")


def _images(toy: Path, split: str = "id") -> list[Image.Image]:
    manifest = pd.read_csv(toy / "toy" / split / "manifest.csv")
    return [Image.open(toy / "toy" / split / p) for p in manifest["path"]]


@pytest.fixture(scope="module")
def api(toy, cli_scores):
    from negalign_cli import CLIPNegAlign

    model = CLIPNegAlign(
        train_dataset=str(toy / "toy/classes.txt"),
        negatives_split=toy / "split",
        lambda_bg=2.0,
        batch_size=4,
        cache_dir=toy / "cli-cache",
        **TOY,
    )
    yield model
    model.close()


def test_detection_scores_equal_the_cli_pipeline(toy, api, cli_scores):
    details = api.detection_scores(_images(toy), return_details=True)
    assert len(details) == len(cli_scores) == 10
    for column in SCORE_COLUMNS:
        (
            np.testing.assert_allclose(
                details[column].to_numpy(),
                cli_scores[column].to_numpy(dtype=np.float64),
                rtol=2e-6,
                atol=2e-6,
            ),
            column,
        )
    assert (details["pred_class"].to_numpy() == cli_scores["pred_class"].to_numpy()).all()
    assert (details["pred_name"].to_numpy() == cli_scores["pred_name"].to_numpy()).all()
    assert (details["cam_valid"].to_numpy() == cli_scores["cam_valid"].to_numpy()).all()
    # S_final = S* + λ·P_align, from the CLI's stored components
    expected = cli_scores["s_neglabel_star"] + 2.0 * cli_scores["p_align"]
    np.testing.assert_allclose(api.detection_scores(_images(toy)), expected.to_numpy(), rtol=2e-6, atol=2e-6)
    # role-aware negatives change S* on this world, so the check above is not S_plain's: on ID
    # images both are near 1, on background-only images S* (object negatives only) is far higher
    spurious = api.detection_scores(_images(toy, "ood_spurious"), return_details=True)
    gap = spurious["s_neglabel_star"] - spurious["s_neglabel_plain"]
    assert (gap >= -1e-6).all() and gap.max() > 0.05, gap


def test_one_image_equals_its_row_of_the_batch(toy, api):
    images = _images(toy)
    batch = torch.stack([api.clip_preprocess(im) for im in images])
    batched = api.detection_scores(batch, return_details=True)
    for index in (0, 7):
        one = api.detection_score(batch[index : index + 1], return_details=True)
        for column in (*SCORE_COLUMNS, "s_final", "pred_score", "fg_fraction"):
            assert one[column] == pytest.approx(batched[column][index], rel=2e-6, abs=2e-6), column
        assert one["pred_class"] == batched["pred_class"][index]
        assert one["cam_valid"] == batched["cam_valid"][index]
        assert one["cam"].shape == one["foreground"].shape == (8, 8)  # 64 px, patch 8
        assert one["fg_fraction"] == pytest.approx(one["foreground"].mean())
        assert api.detection_score(batch[index]) == pytest.approx(one["s_final"])  # (3, H, W) works too
        assert api.detection_score(None, orig_image=images[index]) == pytest.approx(one["s_final"])


def _neglabel_by_loop(x: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> float:
    """NegLabel with one group, written out: Σ_k∈pos softmax([100·x·P, 100·x·N])_k."""
    logits = [100.0 * float(np.dot(x, p)) for p in positives] + [
        100.0 * float(np.dot(x, n)) for n in negatives
    ]
    peak = max(logits)
    weights = [np.exp(v - peak) for v in logits]
    return sum(weights[: len(positives)]) / sum(weights)


BASE_KWARGS = {"use_neglabel_star", "use_role_aware_negatives", "use_p_align", "lambda_bg"}


def test_basic_usage_of_the_method_description(toy):
    """The description's Basic Usage, with the toy world in place of ImageNet: class names from
    the toy's classes.txt, negative labels saved in output_folder (load_saved_labels)."""
    from negalign_cli import CLIPNegAlign

    output = toy / "basic-output"
    output.mkdir()
    (output / "neg_labels_noun.txt").write_text((toy / "toy/vocab.txt").read_text())
    model = CLIPNegAlign(
        train_dataset=["star", "heart"],  # the toy world's ID classes
        arch="negalign-toy",
        device="cpu",
        output_folder=str(output),
        load_saved_labels=True,
        use_neglabel_star=True,
        use_role_aware_negatives=True,
        use_p_align=True,
        lambda_bg=2.0,
        groups=1,
        tau=TOY_TAU,
        cam_method="gradxact",
        cache_dir=toy / "basic-cache",
    )
    img = _images(toy)[3].convert("RGB")
    img_tensor = model.clip_preprocess(img).unsqueeze(0).to("cpu")
    score = model.detection_score(img_tensor)
    details = model.detection_score(img_tensor, orig_image=img, return_details=True)
    assert isinstance(score, float) and score == details["s_final"]
    assert details["s_final"] == pytest.approx(details["s_neglabel_star"] + 2.0 * details["p_align"])
    assert details["pred_name"] in ("star", "heart") and isinstance(details["cam_valid"], bool)
    for key in ("s_neglabel_plain", "s_neglabel_star", "p_align", "s_final"):
        assert f"{details[key]:.4f}"  # printable as the description prints it
    # the split went where the published layout puts it, and was made from the saved labels
    split = pd.read_csv(output / "negatives_split" / "split_scores.csv")
    assert set(split["word"]) == set((toy / "toy/vocab.txt").read_text().split())
    model.close()


CONFIGURATIONS = {
    "baseline": {"use_neglabel_star": False, "use_role_aware_negatives": False, "use_p_align": False},
    "full": {
        "use_neglabel_star": True,
        "use_role_aware_negatives": True,
        "use_scale_stabilization": False,
        "use_p_align": True,
        "lambda_bg": 2.0,
        "cam_fg_percentile": 80,
        "cam_dilate_px": 1,
    },
    "star-only": {"use_neglabel_star": True, "use_role_aware_negatives": True, "use_p_align": False},
    "p-align-only": {"use_neglabel_star": False, "use_p_align": True, "lambda_bg": 2.0},
}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_configuration_examples(toy, name):
    """Each Configuration Example of the description, on the toy model; S_final follows its formula
    and NegLabel (plain, and * with N_obj) matches a loop over the softmax written out."""
    from negalign_cli import CLIPNegAlign

    config = CONFIGURATIONS[name]
    model = CLIPNegAlign(
        train_dataset=str(toy / "toy/classes.txt"),
        neg_nouns=str(toy / "toy/vocab.txt"),
        cache_dir=toy / "config-cache",
        **TOY,
        **config,
    )
    images = _images(toy)[:4]
    frame = model.detection_scores(images, return_details=True)
    plain, star, align = (frame[c].to_numpy() for c in ("s_neglabel_plain", "s_neglabel_star", "p_align"))
    expected = {
        "baseline": plain,
        "full": star + 2.0 * align,
        "star-only": star,
        "p-align-only": plain + 2.0 * align,
    }[name]
    np.testing.assert_allclose(frame["s_final"], expected, rtol=1e-12)
    assert np.isfinite(align).all() == config["use_p_align"]
    assert frame["cam_valid"].notna().all() == config["use_p_align"]
    # brute force: embeddings from the model itself, texts from the API's features
    batch = torch.stack([model.clip_preprocess(im) for im in images])
    with torch.no_grad():
        x = torch.nn.functional.normalize(model.model.model.encode_image(batch).float(), dim=-1).numpy()
    positives = model.class_features.numpy()
    negatives = model.negative_features.numpy()
    roles = np.array(model.negatives.roles)
    star_negatives = (
        negatives[roles == "obj"]
        if config.get("use_role_aware_negatives") and config["use_neglabel_star"]
        else negatives
    )
    for row in range(len(images)):
        assert plain[row] == pytest.approx(
            _neglabel_by_loop(x[row], positives, negatives), rel=1e-4, abs=1e-9
        )
        assert star[row] == pytest.approx(
            _neglabel_by_loop(x[row], positives, star_negatives), rel=1e-4, abs=1e-9
        )
    model.close()


def test_m3_uses_id_statistics_fitted_once(toy):
    from negalign_cli import CLIPNegAlign

    model = CLIPNegAlign(
        train_dataset=str(toy / "toy/classes.txt"),
        neg_nouns=str(toy / "toy/vocab.txt"),
        use_scale_stabilization=True,
        lambda_bg=0.5,
        cache_dir=toy / "m3-cache",
        **TOY,
    )
    id_images = _images(toy)
    ood = _images(toy, "ood_spurious")[:3]
    with pytest.raises(NegalignError, match="fit_calibration"):
        model.detection_scores(ood)
    stats = model.fit_calibration(id_images)
    parts = model.detection_scores(id_images, return_details=True)
    assert stats["s_neglabel_star"]["mean"] == pytest.approx(parts["s_neglabel_star"].mean())
    assert stats["s_neglabel_star"]["std"] == pytest.approx(parts["s_neglabel_star"].std(ddof=0))
    assert stats["p_align"]["mean"] == pytest.approx(parts["p_align"].mean())
    assert stats["p_align"]["std"] == pytest.approx(parts["p_align"].std(ddof=0))
    # one image alone gets the same, finite, value as in a batch: no z-score within the batch
    out = model.detection_scores(ood, return_details=True)
    z = (out["s_neglabel_star"] - stats["s_neglabel_star"]["mean"]) / stats["s_neglabel_star"]["std"]
    z_align = (out["p_align"] - stats["p_align"]["mean"]) / stats["p_align"]["std"]
    np.testing.assert_allclose(out["s_final"], z + 0.5 * z_align, rtol=1e-9)
    single = model.detection_score(model.clip_preprocess(ood[0]))
    assert np.isfinite(single) and single == pytest.approx(out["s_final"][0], rel=1e-5)
    # a DataLoader-like iterable of (images, labels) batches fits the same statistics
    batch = torch.stack([model.clip_preprocess(im) for im in id_images])
    again = model.fit_calibration([(batch[:6], None), (batch[6:], None)])
    assert again["p_align"]["mean"] == pytest.approx(stats["p_align"]["mean"], rel=1e-5)
    model.close()


def test_arch_names_and_checkpoint_paths(tmp_path):
    from negalign_cli.api import resolve_arch

    assert resolve_arch("ViT-B/16") == ("ViT-B-16", "openai")
    assert resolve_arch("ViT-L/14@336px") == ("ViT-L-14-336", "openai")
    assert resolve_arch("ViT-B/16", "laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert resolve_arch("negalign-toy") == ("negalign-toy", None)
    assert resolve_arch("ViT-B-32", "/w/x.pt") == ("ViT-B-32", "/w/x.pt")
    checkpoint = tmp_path / "ViT-B-16.pt"
    checkpoint.write_bytes(b"x")
    assert resolve_arch(str(checkpoint)) == ("ViT-B-16", str(checkpoint))
    with pytest.raises(NegalignError, match="unknown arch"):
        resolve_arch("ViT-X/99")


def test_a_local_checkpoint_loads_like_the_cli(toy):
    """pretrained= a checkpoint file gives the same model (fingerprint) as the CLI's --pretrained."""
    from negalign_cli import CLIPNegAlign
    from negalign_cli.assets import asset_path
    from negalign_cli.models import load_model

    path = asset_path("models/negalign-toy.pt")
    model = CLIPNegAlign(
        train_dataset=["star", "heart"],
        pretrained=str(path),
        neg_nouns=["circle", "water", "forest", "teapot", "square"],
        use_p_align=False,
        use_neglabel_star=False,
        cache_dir=toy / "ckpt-cache",
        **{**TOY, "arch": "negalign-toy"},
    )
    assert model.model.fingerprint == load_model("negalign-toy", str(path)).fingerprint
    model.close()


def test_import_stays_light_and_the_class_is_lazy():
    script = (
        "import sys, negalign_cli\n"
        "print('torch' in sys.modules)\n"
        "from negalign_cli import CLIPNegAlign\n"
        "print(CLIPNegAlign.__module__, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    # the API module imports torch when a model is built or something is computed, not on import
    assert result.stdout.split() == ["False", "negalign_cli.api", "False"]


def test_labels_are_mined_and_saved_then_loaded(toy):
    """Without saved labels the API mines them (NegLabel's recipe, the mine-negatives stage) into
    output_folder; the next construction loads them instead (load_saved_labels)."""
    from negalign_cli import CLIPNegAlign
    from negalign_cli.reporting import RecordingReporter

    lexicon = toy / "lexicon"
    lexicon.mkdir()
    nouns = [f"{w}" for w in ("water", "forest", "grass", "snow", "sand", "teapot", "violin", "bicycle")]
    nouns += [
        "pencil",
        "umbrella",
        "guitar",
        "anchor",
        "kettle",
        "lamp",
        "clock",
        "circle",
        "square",
        "cloud",
    ]
    (lexicon / "noun.artifact.txt").write_text("\n".join(nouns) + "\n")
    (lexicon / "adj.all.txt").write_text("red\nblue\ngreen\nround\nsharp\nsoft\nwet\ndry\n")
    output = toy / "mined"
    settings = {
        "train_dataset": ["star", "heart"],
        "output_folder": output,
        "lexicon": lexicon,
        "use_p_align": False,
        "use_neglabel_star": False,
        "cache_dir": toy / "mine-cache",
        **TOY,
    }
    first = RecordingReporter()
    model = CLIPNegAlign(load_saved_labels=True, reporter=first, **settings)
    assert "mining negative labels" in first.text()
    mined_nouns = (output / "neg_labels_noun.txt").read_text().split("\n")[:-1]
    mined_adjs = (output / "neg_labels_adj.txt").read_text().split("\n")[:-1]
    assert 1 <= len(mined_nouns) < len(nouns) and set(mined_nouns) <= set(nouns)  # the least class-like share
    assert model.negatives.words == (*mined_nouns, *mined_adjs)
    assert (output / "negatives_split" / "split_scores.csv").is_file()
    model.close()
    second = RecordingReporter()
    again = CLIPNegAlign(load_saved_labels=True, reporter=second, **settings)
    assert "mining" not in second.text() and f"negative labels from {output}" in second.text()
    assert again.negatives == model.negatives
    again.close()
    # labels mined there for other ID classes are refused (a negative may be a class now), before
    # any text is encoded; lists put there by hand (no mine-negatives manifest) are taken as given
    with pytest.raises(NegalignError, match="were mined for other ID classes: give another output_folder"):
        CLIPNegAlign(load_saved_labels=True, **{**settings, "train_dataset": ["lamp", "star"]})
    (output / "manifest.json").unlink()
    by_hand = CLIPNegAlign(load_saved_labels=True, **{**settings, "train_dataset": ["lamp", "star"]})
    assert by_hand.negatives.words == (*mined_nouns, *mined_adjs)
    by_hand.close()
