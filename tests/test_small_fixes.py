"""Issue 22 item 6: progress bars name their set, the README's demo paragraph matches the demo, the
API docs' snippets run, the API's errors name its arguments, the demo's "Next:" lines work."""

from __future__ import annotations

from pathlib import Path

from tests.faults.helpers import cli
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
