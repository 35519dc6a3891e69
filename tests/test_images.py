from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import negalign_cli.compute.vision as vision_module
from negalign_cli.cli.app import app
from negalign_cli.compute.vision import CamConfig, cam_batch, encode_images
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.datasets import load_rgb
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.words import WordList
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages.images import cam_images, digest_images, embed_images
from tests.helpers import TINY
from tests.helpers.images import make_awkward_images, make_image_folder, rgb

runner = CliRunner()
REPORT = RecordingReporter()


def listing_of(spec, **kwargs):
    return digest_images(list_images(spec, **kwargs), REPORT)


def test_image_lists(tmp_path):
    folder = make_image_folder(tmp_path / "tree")
    tree = list_images(folder)
    assert len(tree) == 6 and sorted(set(tree.labels)) == ["birds", "boats"]
    (folder / "loose.png").write_bytes((folder / "birds" / "1.png").read_bytes())
    # a loose image has no label; the others keep theirs (they lost them all before)
    assert list_images(folder).labels == [*["birds"] * 3, *["boats"] * 3, ""]
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\ntree/birds/0.jpg,bird\ntree/boats/1.png,boat\n")
    listed = list_images(manifest)
    assert listed.labels == ["bird", "boat"] and listed.paths[0] == str(tmp_path / "tree/birds/0.jpg")
    openood = tmp_path / "openood.txt"
    openood.write_text("birds/0.jpg 3\nboats/1.png 7\n")
    listed = list_images(openood, data_root=folder)
    assert listed.labels == ["3", "7"] and listed.paths[1] == str(folder / "boats/1.png")
    meta = tmp_path / "metadata.csv"
    pd.DataFrame(
        {
            "img_filename": ["birds/0.jpg", "boats/1.png", "boats/2.jpg"],
            "y": [1, 0, 0],
            "split": [2, 2, 0],
            "place": [1, 0, 1],
        }
    ).to_csv(meta, index=False)
    test = list_images(meta, data_root=folder, split="test")
    assert test.labels == ["1", "0"] and test.extra["place"] == ["1", "0"]
    with pytest.raises(NegalignError, match="--split"):
        list_images(meta, data_root=folder, split="holdout")
    with pytest.raises(NegalignError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(NegalignError, match="lists no images"):
        list_images(tmp_path / "empty_dir")


def test_awkward_files_are_recorded_not_fatal(tiny_model, workspace, tmp_path):
    files = make_awkward_images(tmp_path / "awkward")
    make_image_folder(tmp_path / "awkward" / "more", per_class=1)
    listing = listing_of(tmp_path / "awkward")
    vanished = tmp_path / "awkward" / "more" / "birds" / "0.jpg"
    vanished.unlink()  # listed and hashed, then gone before decoding
    reporter = RecordingReporter()
    result = embed_images(tiny_model, listing, workspace, workers=0, batch_size=3, reporter=reporter)
    table = pd.read_parquet(result.artifact.file("images.parquet"))
    names = ["/".join(p.split("/")[-2:]) for p in table["path"]]
    reason = dict(zip([n.removeprefix("awkward/") for n in names], table["reason"], strict=True))
    status = dict(zip([n.removeprefix("awkward/") for n in names], table["status"], strict=True))
    assert status["corrupt.jpg"] == "skipped" and "decode" in reason["corrupt.jpg"]
    assert reason["empty.png"] == "empty file"
    assert reason["birds/0.jpg"] == "file vanished before it was read"
    for ok in ("alpha.png", "sixteen.png", "gray.png", "tiny.png", "boats/0.jpg"):
        assert status[ok] == "ok", (ok, reason[ok])
    embeddings = np.load(result.artifact.file("image_embeddings.npy"))
    assert embeddings.shape == (5, 64) and embeddings.dtype == np.float32  # the default store dtype
    assert "skipped 3 image(s)" in reporter.text()
    sixteen = np.asarray(load_rgb(str(files["sixteen"])))
    assert sixteen.dtype == np.uint8 and sixteen.max() > 200 and sixteen.min() < 10  # scaled, not clipped
    with pytest.raises(NegalignError, match="--strict"):
        embed_images(tiny_model, listing, workspace, workers=0, strict=True, store_dtype="float32")


def test_embeddings_batch_equals_single_and_cache_equals_fresh(tiny_model, workspace, tmp_path):
    folder = make_image_folder(tmp_path / "tree")
    listing = listing_of(folder)
    result = embed_images(tiny_model, listing, workspace, workers=0, batch_size=4, store_dtype="float32")
    stored = np.load(result.artifact.file("image_embeddings.npy"))
    transform = tiny_model.image_transform()
    for row, path in enumerate(listing.images.paths):
        single = encode_images(tiny_model.model, transform(load_rgb(path)).unsqueeze(0))[0].numpy()
        np.testing.assert_allclose(stored[row], single, atol=1e-6)
    assert result.artifact.manifest["counts"]["encoded"] == 6
    again = embed_images(tiny_model, listing, workspace, workers=0, store_dtype="float16")
    assert again.artifact.manifest["counts"] == {
        **result.artifact.manifest["counts"],
        "encoded": 0,
        "cached": 6,
    }
    np.testing.assert_allclose(np.load(again.artifact.file("image_embeddings.npy")), stored, atol=1e-3)


def test_new_files_renames_and_resume(tiny_model, workspace, tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "tree", per_class=4)
    first = embed_images(tiny_model, listing_of(folder), workspace, workers=0, batch_size=3)
    assert first.artifact.manifest["counts"]["encoded"] == 8
    rgb(100).save(folder / "birds" / "new1.png")
    rgb(101).save(folder / "boats" / "new2.png")
    (folder / "birds" / "0.jpg").rename(folder / "birds" / "renamed.jpg")
    second = embed_images(tiny_model, listing_of(folder), workspace, workers=0, batch_size=3)
    counts = second.artifact.manifest["counts"]
    assert (counts["encoded"], counts["cached"], counts["embedded"]) == (2, 8, 10)
    # interrupted run: the first batch is kept, a rerun encodes only the rest
    for i in range(6):
        rgb(200 + i).save(folder / "boats" / f"late{i}.png")
    calls = {"n": 0}
    original = vision_module.encode_images  # the stage imports it inside its compute step

    def flaky(model, batch, *passes):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(model, batch, *passes)

    monkeypatch.setattr(vision_module, "encode_images", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed_images(tiny_model, listing_of(folder), workspace, workers=0, batch_size=3)
    monkeypatch.setattr(vision_module, "encode_images", original)
    resumed = embed_images(tiny_model, listing_of(folder), workspace, workers=0, batch_size=3)
    assert resumed.artifact.manifest["counts"]["encoded"] == 3
    assert not list(workspace.store.tmp_dir.iterdir())


def test_reduced_precision_embeds_and_cams(workspace, tmp_path, monkeypatch):
    """bf16 weights (fp16 is the same path on a GPU): the pixels are cast to the dtype of the patch
    embedding, not to that of the first parameter (the class embedding, which open_clip keeps in
    float32); layer norms run in float32 on float32 inputs (the CUDA kernel refuses a float32
    weight with fp16 input, the CPU one accepts it: the strict stand-in below refuses it here too);
    and the results stay close to float32's."""
    import torch.nn.functional as F

    from negalign_cli.models import load_model

    layer_norm = F.layer_norm

    def strict_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        assert weight is None or weight.dtype == x.dtype, f"layer_norm on {x.dtype} with {weight.dtype}"
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(F, "layer_norm", strict_layer_norm)

    fp32, bf16 = load_model("negalign-tiny-test"), load_model("negalign-tiny-test", precision="bf16")
    assert fp32.input_dtype == torch.float32 and bf16.input_dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.float32  # why input_dtype exists
    assert bf16.to_input(torch.zeros(1, 3, 32, 32)).dtype == torch.bfloat16
    listing = listing_of(make_image_folder(tmp_path / "tree"))
    want = embed_images(fp32, listing, workspace, workers=0, store_dtype="float32")
    got = embed_images(bf16, listing, workspace, workers=0, store_dtype="float32")
    assert got.artifact.manifest["counts"]["encoded"] == 6  # another precision, another cache entry
    a, b = (np.load(r.artifact.file("image_embeddings.npy")) for r in (want, got))
    assert (a * b).sum(1).min() > 0.99
    from negalign_cli.compute.text import encode_texts

    words, templates = ["birds", "boats", "a lake"], ["a photo of a {}.", "a {} in the wild."]
    text32, text16 = (encode_texts(m.model, m.tokenizer, words, templates) for m in (fp32, bf16))
    assert text16.dtype == torch.float32 and (text32 * text16).sum(1).min() > 0.99
    cams = cam_images(bf16, listing, WordList("t", ("birds", "boats")), workspace, CamConfig(), workers=0)
    assert np.isfinite(np.load(cams.artifact.file("background_embeddings.npy"))).all()


def test_cam_stage(tiny_model, workspace, tmp_path):
    folder = make_image_folder(tmp_path / "tree")
    listing = listing_of(folder)
    classes = WordList("t", ("birds", "boats"))
    result = cam_images(
        tiny_model, listing, classes, workspace, CamConfig(), workers=0, batch_size=4, store_dtype="float32"
    )
    art = result.artifact
    assert sorted(art.files) == [
        "background_embeddings.npy",
        "cam.parquet",
        "cams.npy",
        "foreground.npy",
        "image_embeddings.npy",
        "images.parquet",
    ]
    cams = np.load(art.file("cams.npy"))
    assert cams.shape == (6, 4, 4) and cams.dtype == np.float16
    meta = pd.read_parquet(art.file("cam.parquet"))
    assert list(meta.columns) == ["pred_class", "pred_name", "pred_score", "cam_valid", "fg_fraction"]
    transform = tiny_model.image_transform()
    batch = torch.stack([transform(load_rgb(p)) for p in listing.images.paths])
    from negalign_cli.inputs.words import load_templates
    from negalign_cli.stages.text import text_embeddings

    features = torch.from_numpy(
        text_embeddings(tiny_model, classes.words, load_templates("noun"), workspace).vectors
    )
    direct = cam_batch(tiny_model.model, batch, features, CamConfig())
    np.testing.assert_allclose(cams, direct.cams.numpy().astype(np.float16), atol=1e-3)
    np.testing.assert_allclose(
        np.load(art.file("background_embeddings.npy")), direct.background.numpy(), atol=1e-5
    )
    assert meta["cam_valid"].tolist() == direct.valid.tolist()
    np.testing.assert_array_equal(meta["pred_class"], direct.pred_class.numpy())
    np.testing.assert_array_equal(np.load(art.file("foreground.npy")), direct.foreground.numpy())
    # the CAM forward filled the embedding cache: embed images encodes nothing
    embedded = embed_images(tiny_model, listing, workspace, workers=0, store_dtype="float32")
    assert embedded.artifact.manifest["counts"]["encoded"] == 0
    np.testing.assert_allclose(
        np.load(embedded.artifact.file("image_embeddings.npy")),
        np.load(art.file("image_embeddings.npy")),
        atol=1e-6,
    )
    with pytest.raises(NegalignError, match="out of range"):
        cam_images(tiny_model, listing, classes, workspace, CamConfig(block=-3), workers=0)


@pytest.mark.slow
def test_embed_cam_score_evaluate_cli(tmp_path):
    folder = make_image_folder(tmp_path / "id", per_class=4)
    ood = make_image_folder(tmp_path / "ood", per_class=3)
    cache = ["--cache-dir", str(tmp_path / "c")]
    nouns = tmp_path / "nouns.txt"
    nouns.write_text(
        "\n".join(
            [
                "ocean",
                "forest",
                "sand",
                "brick",
                "snow",
                "grass",
                "lava",
                "sky",
                "teapot",
                "cup",
                "lamp",
                "kettle",
            ]
        )
        + "\n"
    )
    assert (
        runner.invoke(
            app,
            [
                "split-vocab",
                "--nouns",
                str(nouns),
                "--tau",
                "0",
                "--out",
                str(tmp_path / "split"),
                *cache,
                *TINY,
            ],
        ).exit_code
        == 0
    )
    for name, images in (("id", folder), ("ood", ood)):
        result = runner.invoke(
            app,
            [
                "cam",
                "--images",
                str(images),
                "--classes",
                "waterbird",
                "--workers",
                "0",
                "--viz",
                "2",
                "--viz-dir",
                str(tmp_path / f"viz_{name}"),
                "--out",
                str(tmp_path / f"cam_{name}"),
                *cache,
                *TINY,
            ],
        )
        assert result.exit_code == 0, result.output
        assert len(list((tmp_path / f"viz_{name}").glob("*.png"))) == 2
        result = runner.invoke(
            app,
            [
                "score",
                "--images-dir",
                str(tmp_path / f"cam_{name}"),
                "--classes",
                "waterbird",
                "--negatives-split",
                str(tmp_path / "split"),
                "--groups",
                "3",
                "--out",
                str(tmp_path / f"score_{name}"),
                *cache,
                *TINY,
            ],
        )
        assert result.exit_code == 0, result.output
    embedded = runner.invoke(
        app, ["embed", "images", "--images", str(folder), "--workers", "0", *cache, *TINY]
    )
    assert embedded.exit_code == 0 and "encoded 0, cached 8" in embedded.output
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--id",
            str(tmp_path / "score_id/scores.parquet"),
            "--ood",
            f"ood={tmp_path / 'score_ood/scores.parquet'}",
            "--compare",
            "--lambda",
            "sweep",
            "--out",
            str(tmp_path / "results"),
            *cache,
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "results.json").is_file()


def test_batched_torch_decoder_matches_pil(tiny_model, workspace, tmp_path):
    """The --decode torch path (nvJPEG on CUDA) runs here on the CPU: same images, close embeddings."""
    folder = make_image_folder(tmp_path / "tree", per_class=3)  # JPEGs and PNGs
    (folder / "birds" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    listing = listing_of(folder)
    pil = embed_images(tiny_model, listing, workspace, workers=0, store_dtype="float32")
    torch_path = embed_images(
        tiny_model, listing, workspace, workers=0, store_dtype="float32", decoder="torch"
    )
    assert torch_path.artifact.key != pil.artifact.key
    assert torch_path.artifact.manifest["counts"]["encoded"] == 6  # its own cache namespace
    a = np.load(pil.artifact.file("image_embeddings.npy"))
    b = np.load(torch_path.artifact.file("image_embeddings.npy"))
    assert a.shape == b.shape == (6, 64)
    assert (np.sum(a * b, axis=1) > 0.98).all()
    table = pd.read_parquet(torch_path.artifact.file("images.parquet"))
    assert table.loc[table["path"].str.endswith("broken.jpg"), "status"].item() == "skipped"
    with pytest.raises(NegalignError, match="--decode"):
        embed_images(tiny_model, listing, workspace, decoder="nvjpeg")


def test_store_dtype_is_checked_by_both_stages(tiny_model, workspace, tmp_path):
    listing = listing_of(make_image_folder(tmp_path / "tree", per_class=1))
    with pytest.raises(NegalignError, match="--store-dtype"):
        embed_images(tiny_model, listing, workspace, workers=0, store_dtype="int8")
    with pytest.raises(NegalignError, match="--store-dtype"):
        cam_images(tiny_model, listing, WordList("t", ("a", "b")), workspace, CamConfig(), store_dtype="int8")
