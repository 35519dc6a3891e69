"""``negalign toy generate``: the toy spurious-OOD benchmark on disk.

Layout of ``OUT/``::

    classes.txt                the ID classes (two shapes)
    vocab.txt                  negative candidates: other shapes, backgrounds, distractor words
    <split>/images/<label>/<n>.png
    <split>/manifest.csv       path,label (relative to the split folder)
    <split>/metadata.csv       path, label, shape, background, mask, group (mask relative to the split folder)
                               (id also: img_filename, y, split, place: Waterbirds' columns, so
                               that ``--images id/metadata.csv --split test`` reads it as Waterbirds)
    masks/<split>/<label>/<n>.png   the object's exact mask (255 = object), beside the splits so that a
                               split folder holds images only
    id_test.csv                the ID test set: ``id`` and ``id_minority`` (paths relative to OUT)
    groups/minority.csv        the minority-group ID images of id_test.csv (``evaluate --id-group``)
    README.md                  what was generated, with the seed
    toy_files.txt              every file this run wrote (relative to OUT), written before the file

A second run into the same ``OUT`` removes the files the first one listed in ``toy_files.txt``
(and nothing else) before writing, so that ``OUT`` holds exactly the new set; a non-empty ``OUT``
without that list is refused, never emptied.

Splits: ``id`` (Waterbirds-like: each ID shape on its own background group ``correlation`` of the
time), ``id_minority`` (the ID shapes on the other class's backgrounds only: still ID),
``ood_spurious`` (background-only images of the ID backgrounds: the placesbg analogue),
``ood_spurious_object`` (unknown shapes on the ID backgrounds), ``ood_nonspurious`` (other shapes on
other backgrounds), and with ``--train N`` a ``train`` split with captions (the trainer draws its own
batches from the seed; this is for inspection).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from negalign_cli.errors import NegalignError
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.toy.world import BACKGROUNDS, SHAPES, caption, render, scene_rng

DISTRACTORS = (
    "teapot",
    "violin",
    "bicycle",
    "pencil",
    "umbrella",
    "guitar",
    "anchor",
    "kettle",
    "lamp",
    "clock",
)


@dataclass(frozen=True)
class ToySpec:
    seed: int = 0
    n_id: int = 400
    n_ood: int = 200
    n_train: int = 0
    correlation: float = 0.95
    id_shapes: tuple[str, str] = ("star", "heart")
    id_backgrounds: tuple[tuple[str, ...], tuple[str, ...]] = (("water", "snow"), ("forest", "grass"))
    extra: dict = field(default_factory=dict)

    @property
    def other_shapes(self) -> list[str]:
        return [s for s in SHAPES if s not in self.id_shapes]

    @property
    def other_backgrounds(self) -> list[str]:
        used = {b for group in self.id_backgrounds for b in group}
        return [b for b in BACKGROUNDS if b not in used]


MASKS = "masks"  # OUT/masks/<split>/...: the masks' tree, beside the splits
FILE_LIST = "toy_files.txt"  # OUT/toy_files.txt: every file generate_toy wrote, one a line


class _FileList:
    """``OUT/toy_files.txt``: the files of the toy world in ``out``, each recorded before it is
    written (so that the list always holds every file a run, even an interrupted one, left)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files: list[str] = []

    def recorded(self) -> list[Path]:
        """The files the previous run listed, inside ``out`` only (an entry that is absolute,
        climbs out with ``..`` or lies in a folder that now links elsewhere is ignored: the list is
        never a way to delete files outside ``out``)."""
        path = self.out / FILE_LIST
        entries = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        safe = [e for e in entries if e and not Path(e).is_absolute() and ".." not in Path(e).parts]
        root = self.out.resolve()
        inside = {}  # folder -> whether it resolves inside out (asked once per folder)
        kept = []
        for entry in safe:
            folder = (self.out / entry).parent
            if folder not in inside:
                inside[folder] = folder.resolve().is_relative_to(root)
            if inside[folder]:
                kept.append(self.out / entry)
        return kept

    def add(self, paths: list[str]) -> None:
        """Record ``paths`` (relative to ``out``), which are about to be written; refused where a
        folder on the way is a link out of ``out`` (the toy world is written inside ``out`` only)."""
        root = self.out.resolve()
        for folder in {(self.out / p).parent for p in paths}:
            existing = next((f for f in (folder, *folder.parents) if f.exists() or f.is_symlink()), None)
            if existing is not None and not existing.resolve().is_relative_to(root):
                raise NegalignError(
                    f"{existing} leads outside --out {self.out} (a link): `negalign toy generate` writes "
                    "only inside --out; remove the link"
                )
        self.files.extend(paths)
        temporary = self.out / f".{FILE_LIST}.tmp"
        temporary.write_text("".join(f"{p}\n" for p in self.files), encoding="utf-8")
        temporary.replace(self.out / FILE_LIST)


def _clear_previous(out: Path) -> _FileList:
    """Make ``out`` ready for a new toy world: created if missing; if it holds files, they must be a
    previous run's (``toy_files.txt``), and only the files it lists are removed (then the folders
    they leave empty); anything else in ``out`` stays. Raises NegalignError for a non-empty folder
    without the list: it is not a toy folder, or one from before the list was kept."""
    if out.exists() and not out.is_dir():
        raise NegalignError(f"--out {out} is a file: give a folder for the toy benchmark")
    out.mkdir(parents=True, exist_ok=True)
    listing = _FileList(out)
    if not (out / FILE_LIST).is_file():
        if any(out.iterdir()):
            raise NegalignError(
                f"--out {out} is not empty and holds no {FILE_LIST} (the list of files `negalign toy "
                "generate` wrote, which it alone removes before writing again): give a new or empty "
                "folder, or remove this one yourself"
            )
        return listing
    folders: set[Path] = set()
    for path in listing.recorded():
        if path.is_file() or path.is_symlink():
            path.unlink()
        folders.update(p for p in path.parents if out in p.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    listing.add([])  # the new list starts empty: the old files are gone
    return listing


ID_TEST = "id_test.csv"  # OUT/id_test.csv: the ID test set (id and id_minority)
GROUPS = "groups"  # OUT/groups/<name>.csv: ID subgroups


def _write(folder: Path, rows: list[dict], scenes, listing: _FileList) -> None:
    split = folder.relative_to(listing.out).as_posix()
    listing.add(
        [f"{split}/{name}" for name in ("metadata.csv", "manifest.csv")]
        + [os.path.normpath(f"{split}/{row[key]}") for row in rows for key in ("path", "mask")]
    )
    for row, scene in zip(rows, scenes, strict=True):
        image_path, mask_path = folder / row["path"], folder / row["mask"]
        image_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(image_path)
        Image.fromarray((scene.mask * 255).astype(np.uint8)).save(mask_path)
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "metadata.csv", index=False)
    frame[["path", "label"]].to_csv(folder / "manifest.csv", index=False)


# The ID split's Waterbirds split column: 0 train, 1 val, 2 test, about Waterbirds' 40/10/50 shares.
WATERBIRDS_SPLIT_CYCLE = (0, 0, 0, 0, 1, 2, 2, 2, 2, 2)


def _waterbirds_columns(row: dict, index: int, label_index: int, place: int) -> dict:
    """Waterbirds' metadata.csv columns for an ID row: img_filename, y (class index), split
    (0 train, 1 val, 2 test) and place (the index of the background group the image is on)."""
    return {
        **row,
        "img_filename": row["path"],
        "y": label_index,
        "split": WATERBIRDS_SPLIT_CYCLE[index % len(WATERBIRDS_SPLIT_CYCLE)],
        "place": place,
    }


def _write_id_lists(out: Path, listing: _FileList) -> None:
    """``id_test.csv`` (every ID image: ``id`` then ``id_minority``) and ``groups/minority.csv``
    (its minority-group images), paths relative to the file's own folder as manifests are read."""
    listing.add([ID_TEST, f"{GROUPS}/minority.csv"])
    frames = []
    for split in ("id", "id_minority"):
        meta = pd.read_csv(out / split / "metadata.csv", keep_default_na=False)
        meta["path"] = split + "/" + meta["path"]
        frames.append(meta)
    both = pd.concat(frames, ignore_index=True)
    both[["path", "label"]].to_csv(out / ID_TEST, index=False)
    minority = both[both["group"] == "minority"][["path", "label"]].copy()
    minority["path"] = "../" + minority["path"]
    (out / GROUPS).mkdir(exist_ok=True)
    minority.to_csv(out / GROUPS / "minority.csv", index=False)


def _scene_rows(split: str, label: str, index: int, scene, group: str, text: str | None = None) -> dict:
    row = {
        "path": f"images/{label}/{index:05d}.png",
        "label": label,
        "shape": scene.shape or "",
        "background": scene.background,
        "mask": f"../{MASKS}/{split}/{label}/{index:05d}.png",
        "group": group,
    }
    if text is not None:
        row["caption"] = text
    return row


def generate_toy(out: str | Path, spec: ToySpec, reporter: Reporter | None = None) -> dict[str, int]:
    reporter = reporter or NullReporter()
    if not 0.5 <= spec.correlation <= 1.0:
        raise NegalignError(f"--correlation must be in [0.5, 1], got {spec.correlation}")
    for shape in spec.id_shapes:
        if shape not in SHAPES:
            raise NegalignError(f"unknown ID shape {shape!r}; shapes: {', '.join(SHAPES)}")
    out = Path(out)
    listing = _clear_previous(out)
    counts: dict[str, int] = {}

    def split(name: str, n: int, draw) -> None:
        rows, scenes = [], []
        with reporter.progress(f"toy split {name}: {n} images", n) as advance:
            for index in range(n):
                rng = scene_rng(spec.seed, name, index)
                row, scene = draw(index, rng)
                rows.append(row)
                scenes.append(scene)
                advance(1)
        _write(out / name, rows, scenes, listing)
        counts[name] = n

    def draw_id(index, rng):
        label_index = index % 2
        majority = rng.random() < spec.correlation
        place = label_index if majority else 1 - label_index
        group = spec.id_backgrounds[place]
        background = group[rng.integers(len(group))]
        scene = render(spec.id_shapes[label_index], background, rng)
        row = _scene_rows("id", str(scene.shape), index, scene, "majority" if majority else "minority")
        return _waterbirds_columns(row, index, label_index, place), scene

    def draw_minority(index, rng):
        label_index = index % 2
        group = spec.id_backgrounds[1 - label_index]
        scene = render(spec.id_shapes[label_index], group[rng.integers(len(group))], rng)
        return _scene_rows("id_minority", str(scene.shape), index, scene, "minority"), scene

    def draw_spurious(index, rng):
        backgrounds = [b for group in spec.id_backgrounds for b in group]
        scene = render(None, backgrounds[index % len(backgrounds)], rng)
        return _scene_rows("ood_spurious", scene.background, index, scene, "background-only"), scene

    def draw_spurious_object(index, rng):
        backgrounds = [b for group in spec.id_backgrounds for b in group]
        shapes = spec.other_shapes
        scene = render(shapes[index % len(shapes)], backgrounds[rng.integers(len(backgrounds))], rng)
        return _scene_rows("ood_spurious_object", str(scene.shape), index, scene, "other-on-id"), scene

    def draw_other(index, rng):
        shapes, backgrounds = spec.other_shapes, spec.other_backgrounds
        scene = render(shapes[index % len(shapes)], backgrounds[rng.integers(len(backgrounds))], rng)
        return _scene_rows("ood_nonspurious", str(scene.shape), index, scene, "other"), scene

    def draw_train(index, rng):
        shape = None if rng.random() < 0.12 else SHAPES[rng.integers(len(SHAPES))]
        scene = render(shape, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], rng)
        label = scene.shape or scene.background
        return _scene_rows(
            "train", label, index, scene, "train", caption(shape, scene.background, rng)
        ), scene

    split("id", spec.n_id, draw_id)
    split("id_minority", spec.n_ood, draw_minority)
    split("ood_spurious", spec.n_ood, draw_spurious)
    split("ood_spurious_object", spec.n_ood, draw_spurious_object)
    split("ood_nonspurious", spec.n_ood, draw_other)
    if spec.n_train:
        split("train", spec.n_train, draw_train)
    _write_id_lists(out, listing)
    listing.add(["classes.txt", "vocab.txt", "README.md"])
    (out / "classes.txt").write_text("\n".join(spec.id_shapes) + "\n", encoding="utf-8")
    vocab = spec.other_shapes + list(BACKGROUNDS) + list(DISTRACTORS)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        "# negalign toy benchmark\n\n"
        f"Generated by `negalign toy generate --seed {spec.seed} --n-id {spec.n_id} --n-ood {spec.n_ood} "
        f"--correlation {spec.correlation}`.\n\n"
        f"- ID classes: {', '.join(spec.id_shapes)}; {spec.id_shapes[0]} appears on "
        f"{'/'.join(spec.id_backgrounds[0])} and {spec.id_shapes[1]} on {'/'.join(spec.id_backgrounds[1])} "
        f"{spec.correlation:.0%} of the time (the rest swapped).\n"
        "- id_minority: the ID shapes on the other class's backgrounds only (still ID).\n"
        f"- {ID_TEST}: the ID test set (id and id_minority); {GROUPS}/minority.csv: its minority-group "
        "images (`evaluate --id-group minority=...`).\n"
        "- ood_spurious: background-only images of the ID backgrounds (the placesbg analogue).\n"
        f"- ood_spurious_object: {', '.join(spec.other_shapes)} on the ID backgrounds.\n"
        f"- ood_nonspurious: {', '.join(spec.other_shapes)} on {', '.join(spec.other_backgrounds)}.\n"
        "- vocab.txt: negative candidates (other shapes, backgrounds, distractor words).\n"
        f"- {MASKS}/<split>/: the object's exact mask (255 = object), the ground truth for CAM "
        "localisation; the metadata.csv `mask` column is relative to the split folder.\n",
        encoding="utf-8",
    )
    return counts
