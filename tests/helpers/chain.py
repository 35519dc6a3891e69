"""The inputs of every model command (embed texts|images, cam, mine-negatives, split-vocab, score)
on a few images and words, for the tests that run the whole chain and then its cache hits."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.images import make_image_folder


def model_chain(root: Path, *extra: str) -> dict[str, tuple[str, ...]]:
    """Write the inputs under ``root``; command name -> its arguments (each with
    ``--cache-dir root/c`` and ``extra``), in the order their inputs need."""
    make_image_folder(root / "imgs", per_class=2)
    (root / "classes.txt").write_text("birds\nboats\n")
    (root / "nouns.txt").write_text("ocean\nforest\nsand\nteapot\nlamp\ncup\nkettle\nsky\n")
    (root / "lexicon").mkdir()
    (root / "lexicon" / "noun.artifact.txt").write_text("teapot\nlamp\ncup\nkettle\nbicycle\nladder\n")
    (root / "lexicon" / "adj.all.txt").write_text("red\nwooden\nshiny\n")
    cache = ("--cache-dir", str(root / "c"), *extra)
    return {
        "embed texts": ("embed", "texts", "--classes", str(root / "classes.txt"), *cache),
        "embed images": ("embed", "images", "--images", str(root / "imgs"), "--workers", "0", *cache),
        "cam": (
            "cam", "--images", str(root / "imgs"), "--classes", str(root / "classes.txt"), "--workers", "0",
            "--out", str(root / "cam"), *cache,
        ),
        "mine-negatives": (
            "mine-negatives", "--classes", str(root / "classes.txt"), "--lexicon", str(root / "lexicon"),
            "--exclude", "", *cache,
        ),
        "split-vocab": (
            "split-vocab", "--nouns", str(root / "nouns.txt"), "--tau", "0", "--out", str(root / "split"), *cache
        ),
        "score": (
            "score", "--images-dir", str(root / "cam"), "--classes", str(root / "classes.txt"), "--groups", "2",
            "--negatives-split", str(root / "split"), "--out", str(root / "scores"), *cache,
        ),
    }  # fmt: skip
