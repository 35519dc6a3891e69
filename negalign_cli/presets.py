"""Benchmark presets: the ID set and OOD sets of a published setting, declared once as data.

A preset names each set, its group (``near``/``far`` for OpenOOD, ``spurious``/``non-spurious``
for Waterbirds), its image count, where it lies under ``--data-root`` (a folder, an OpenOOD
``benchmark_imglist`` file, or Waterbirds' ``metadata.csv``) and where it comes from. Nothing
downloads: :func:`resolve_preset` finds the sets under a data root, :func:`count_images` counts
them, and :func:`check_counts` names the sets whose counts differ from the preset's.
:func:`published_rows` gives the published figures recorded for the preset's setting
(``assets/published.json``).

Torch-free: ``negalign benchmarks`` imports this module.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from negalign_cli.errors import NegalignError

Layout = Literal["folder", "imglist", "waterbirds"]
GROUPS = ("near", "far", "spurious", "non-spurious")
# The image suffixes negalign_cli.inputs.listing lists (a test keeps the two equal).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Source:
    """Where a set comes from: the work that defines it and what distributes it."""

    citation: str
    get: str  # the repository, page or instructions that distribute it


@dataclass(frozen=True)
class SetSpec:
    """One image set of a preset, as expected under ``--data-root``."""

    name: str
    count: int | None  # None: the source fixes no count (then no count is checked)
    layout: Layout
    path: str  # relative to --data-root: the folder, the image-list file, or the folder of metadata.csv
    source: Source
    group: str | None = None
    images: str = ""  # imglist: the folder the list's paths are relative to (under --data-root)
    split: str | None = None  # waterbirds: the metadata split scored
    optional: bool = False  # used where present, never an error where absent
    note: str = ""


@dataclass(frozen=True)
class IdGroupSpec:
    """An ID subgroup (``evaluate --id-group``), defined by a rule over Waterbirds' metadata."""

    name: str
    count: int | None
    rule: str  # human-readable
    description: str


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    classes: str  # the class-name preset (`--classes`)
    id_set: SetSpec
    ood_sets: tuple[SetSpec, ...]
    id_groups: tuple[IdGroupSpec, ...] = ()
    published: str | None = None  # the setting of assets/published.json it matches
    notes: tuple[str, ...] = ()

    @property
    def sets(self) -> tuple[SetSpec, ...]:
        return (self.id_set, *self.ood_sets)


MOS = Source(
    "Huang & Li, MOS: Towards Scaling Out-of-distribution Detection for Large Semantic Space, CVPR 2021",
    "https://github.com/deeplearning-wisc/large_scale_ood "
    "(README: iNaturalist.tar.gz, SUN.tar.gz, Places.tar.gz)",
)
DTD = Source(
    "Cimpoi et al., Describing Textures in the Wild, CVPR 2014 (all 5,640 images, as MOS uses it)",
    "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz; its images/ folder)",
)
IMAGENET_VAL = Source(
    "Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, IJCV 2015 (ILSVRC 2012 val)",
    "https://www.image-net.org/challenges/LSVRC/2012/ (validation images, sorted into one folder per "
    "class: negalign reads an ImageFolder tree or a manifest)",
)
OPENOOD = (
    "Zhang et al., OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution Detection, "
    "DMLR 2024 (arXiv 2306.09301)"
)
OPENOOD_GET = (
    "https://github.com/Jingkang50/OpenOOD: `python scripts/download/download.py --contents datasets "
    "--datasets imagenet-1k --save_dir DATA_ROOT` writes benchmark_imglist/, images_largescale/ "
    "and images_classic/ (ImageNet-1K itself comes from image-net.org)"
)
WATERBIRDS_SOURCE = Source(
    "Sagawa et al., Distributionally Robust Neural Networks for Group Shifts, ICLR 2020 "
    "(waterbird_complete95_forest2water2); spurious-OOD setting of Ming et al., On the Impact of "
    "Spurious Correlation for Out-of-distribution Detection, AAAI 2022, as MCM (NeurIPS 2022) uses it",
    "https://github.com/kohpangwei/group_DRO (the Waterbirds tarball); "
    "https://github.com/deeplearning-wisc/MCM/issues/7 (MCM's instructions)",
)
PLACESBG_SOURCE = Source(
    "Ming et al., On the Impact of Spurious Correlation for Out-of-distribution Detection, AAAI 2022",
    "https://github.com/deeplearning-wisc/Spurious_OOD (datasets/generate_placebg.py: Places365 "
    "land and water scenes, no bird, in land/ and water/)",
)
NONSPURIOUS_SOURCE = Source(
    "Ming et al., AAAI 2022 (the non-spurious OOD sets of its Waterbirds experiments)",
    "https://github.com/deeplearning-wisc/Spurious_OOD (README, 'Non-spurious OOD Test Sets': download "
    "links for Textures, LSUN-R, iSUN and SVHN)",
)


def _openood(name: str, list_name: str, count: int, group: str | None, images: str, citation: str) -> SetSpec:
    return SetSpec(
        name=name,
        count=count,
        layout="imglist",
        path=f"benchmark_imglist/imagenet/{list_name}",
        images=images,
        group=group,
        source=Source(citation, OPENOOD_GET),
    )


PRESETS: tuple[Preset, ...] = (
    Preset(
        name="imagenet-mos",
        description="ImageNet-1K val against the MOS suite (iNaturalist, SUN, Places, Textures): the "
        "setting MCM, NegLabel, CSP and NegRefine report",
        classes="imagenet",
        id_set=SetSpec("ImageNet-1K", 50_000, "folder", "imagenet/val", IMAGENET_VAL),
        ood_sets=(
            SetSpec("iNaturalist", 10_000, "folder", "iNaturalist", MOS, group="far"),
            SetSpec("SUN", 10_000, "folder", "SUN", MOS, group="far"),
            SetSpec("Places", 10_000, "folder", "Places", MOS, group="far"),
            SetSpec("Textures", 5_640, "folder", "dtd/images", DTD, group="far"),
        ),
        published="imagenet-mos",
        notes=(
            "SUN, Places and Textures hold images of ImageNet-1K classes (Bitterwolf et al., "
            "In or Out? Fixing ImageNet Out-of-Distribution Detection Evaluation, ICML 2023).",
        ),
    ),
    Preset(
        name="openood-imagenet",
        description="OpenOOD v1.5's ImageNet-1K benchmark: near SSB-hard, NINCO; far iNaturalist, "
        "Textures, OpenImage-O (its benchmark_imglist files)",
        classes="imagenet",
        id_set=_openood(
            "ImageNet-1K",
            "test_imagenet.txt",
            45_000,
            None,
            "images_largescale",
            OPENOOD + "; ILSVRC 2012 val",
        ),
        ood_sets=(
            _openood(
                "SSB-hard",
                "test_ssb_hard.txt",
                49_000,
                "near",
                "images_largescale",
                "Vaze et al., Open-Set Recognition: a Good Closed-Set Classifier is All You Need?, "
                "ICLR 2022; " + OPENOOD,
            ),
            _openood(
                "NINCO",
                "test_ninco.txt",
                5_879,
                "near",
                "images_largescale",
                "Bitterwolf et al., In or Out? Fixing ImageNet Out-of-Distribution Detection Evaluation, "
                "ICML 2023; " + OPENOOD,
            ),
            _openood(
                "iNaturalist",
                "test_inaturalist.txt",
                10_000,
                "far",
                "images_largescale",
                "Huang & Li, MOS, CVPR 2021; " + OPENOOD,
            ),
            _openood(
                "Textures",
                "test_textures.txt",
                5_160,
                "far",
                "images_classic",
                "Cimpoi et al., Describing Textures in the Wild, CVPR 2014; " + OPENOOD,
            ),
            _openood(
                "OpenImage-O",
                "test_openimage_o.txt",
                15_869,
                "far",
                "images_largescale",
                "Wang et al., ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022; " + OPENOOD,
            ),
        ),
        notes=(
            "The ID list is OpenOOD's ImageNet-1K test split (45,000 of the 50,000 val images; the "
            "other 5,000 are its val_imagenet.txt).",
            "--data-root is OpenOOD's data folder: the lists' paths are relative to images_largescale/ "
            "(Textures: images_classic/), as in OpenOOD's configs/datasets/imagenet/imagenet_ood.yml.",
        ),
    ),
    Preset(
        name="waterbirds",
        description="Waterbirds test split as ID (minority groups: birds on the other class's "
        "background), placesbg as spurious OOD, non-spurious OOD sets where present",
        classes="waterbird",
        id_set=SetSpec(
            "Waterbirds",
            5_794,
            "waterbirds",
            "waterbird_complete95_forest2water2",
            WATERBIRDS_SOURCE,
            split="test",
            note="metadata.csv rows with split 2",
        ),
        ood_sets=(
            SetSpec(
                "placesbg",
                None,
                "folder",
                "placesbg",
                PLACESBG_SOURCE,
                group="spurious",
                note="its size follows the Places365 classes it is drawn from: no count is checked",
            ),
            SetSpec(
                "Textures",
                5_640,
                "folder",
                "dtd/images",
                NONSPURIOUS_SOURCE,
                group="non-spurious",
                optional=True,
            ),
            SetSpec(
                "LSUN_resize",
                10_000,
                "folder",
                "LSUN_resize",
                NONSPURIOUS_SOURCE,
                group="non-spurious",
                optional=True,
            ),
            SetSpec("iSUN", 8_925, "folder", "iSUN", NONSPURIOUS_SOURCE, group="non-spurious", optional=True),
            SetSpec(
                "SVHN",
                26_032,
                "folder",
                "svhn",
                NONSPURIOUS_SOURCE,
                group="non-spurious",
                optional=True,
                note="distributed as test_32x32.mat: write its images to files first (negalign reads "
                "image files)",
            ),
        ),
        id_groups=(
            IdGroupSpec(
                "minority",
                2_897,
                "y != place",
                "land birds on water and water birds on land (2,255 + 642 in the test split)",
            ),
        ),
        notes=(
            "The toy world (`negalign toy generate`) mirrors this setting: ood_spurious, "
            "ood_nonspurious and groups/minority.csv.",
        ),
    ),
)


def preset_names() -> list[str]:
    return [preset.name for preset in PRESETS]


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a one-line error naming the closest ones."""
    for preset in PRESETS:
        if preset.name == name.strip().lower():
            return preset
    close = difflib.get_close_matches(name.strip().lower(), preset_names(), n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise NegalignError(
        f"unknown benchmark {name!r}: {hint}the presets are {', '.join(preset_names())} "
        "(`negalign benchmarks` lists them)"
    )


@dataclass(frozen=True)
class ResolvedSet:
    """A set found (or not) under a data root: what to pass as ``--images`` (and ``--data-root``)."""

    spec: SetSpec
    path: Path  # the folder, the image-list file, or metadata.csv
    data_root: Path | None  # imglist: the folder its paths are relative to (pass as --data-root)
    present: bool

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def group(self) -> str | None:
        return self.spec.group

    @property
    def split(self) -> str | None:
        return self.spec.split


@dataclass(frozen=True)
class ResolvedPreset:
    preset: Preset
    data_root: Path
    id_set: ResolvedSet
    ood_sets: tuple[ResolvedSet, ...]  # required sets, and the optional ones that are present
    absent_optional: tuple[str, ...] = field(default=())

    @property
    def sets(self) -> tuple[ResolvedSet, ...]:
        return (self.id_set, *self.ood_sets)

    @property
    def groups(self) -> dict[str, str]:
        """OOD set name -> its group (sets without a group left out)."""
        return {s.name: s.group for s in self.ood_sets if s.group}


def locate(spec: SetSpec, data_root: str | Path) -> ResolvedSet:
    """Where ``spec`` is expected under ``data_root``, and whether it is there."""
    root = Path(data_root).expanduser()
    base = root / spec.path
    if spec.layout == "folder":
        return ResolvedSet(spec, base, None, base.is_dir())
    if spec.layout == "imglist":
        images = root / spec.images if spec.images else root
        return ResolvedSet(spec, base, images, base.is_file() and images.is_dir())
    metadata = base / "metadata.csv"
    return ResolvedSet(spec, metadata, None, metadata.is_file())


def expected_location(spec: SetSpec) -> str:
    """The layout a set needs, in words, relative to ``--data-root``."""
    if spec.layout == "folder":
        return f"{spec.path}/ (image files, in sub-folders or not)"
    if spec.layout == "imglist":
        return f"{spec.path} (paths relative to {spec.images or '.'}/)"
    return f"{spec.path}/metadata.csv (split {spec.split}) and its images"


def locate_all(name: str, data_root: str | Path) -> list[ResolvedSet]:
    """Every set of preset ``name`` (optional ones included), present or not."""
    preset = get_preset(name)
    return [locate(spec, data_root) for spec in preset.sets]


def resolve_preset(name: str, data_root: str | Path) -> ResolvedPreset:
    """The concrete inputs of preset ``name`` under ``data_root``; a missing required set is a
    one-line error naming each missing set, the path expected and where the set comes from."""
    preset = get_preset(name)
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise NegalignError(f"--data-root {root} is not a folder")
    found = [locate(spec, root) for spec in preset.sets]
    missing = [r for r in found if not r.present and not r.spec.optional]
    if missing:
        parts = [
            f"{r.name} (expected {root / expected_location(r.spec)}; from {r.spec.source.get})"
            for r in missing
        ]
        raise NegalignError(
            f"benchmark {preset.name}: {len(missing)} set(s) missing under --data-root {root}: "
            + "; ".join(parts)
            + f". `negalign benchmarks {preset.name}` shows the expected layout"
        )
    ood = tuple(r for r in found[1:] if r.present)
    absent = tuple(r.name for r in found[1:] if not r.present)
    return ResolvedPreset(preset, root, found[0], ood, absent)


def _count_folder(root: Path) -> int:
    total = 0
    for _, _, files in os.walk(root):
        total += sum(
            1 for name in files if name.rfind(".") > 0 and name[name.rfind(".") :].lower() in IMAGE_SUFFIXES
        )
    return total


def _count_list(path: Path) -> int:
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        return sum(1 for line in handle if line.strip() and not line.lstrip().startswith("#"))


def _split_number(value: str) -> int | None:
    try:
        return int(float(value))
    except ValueError:
        return None


def _waterbirds_rows(metadata: Path, split: str | None) -> list[dict[str, str]]:
    """The rows of a Waterbirds ``metadata.csv`` (of ``split``: a name or a number, matched as
    numbers, as negalign's reader does)."""
    with metadata.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        columns = {c.strip() for c in reader.fieldnames or ()}
    if split is None:
        return rows
    if "split" not in columns:
        raise NegalignError(f"{metadata} has no 'split' column: it is not Waterbirds' metadata.csv")
    wanted = WATERBIRDS_SPLITS.get(split, _split_number(split))
    return [row for row in rows if _split_number(row.get("split", "")) == wanted]


def count_images(resolved: ResolvedSet) -> int:
    """The set's images as listed: files under a folder, lines of an image list, metadata rows of
    the split. Fast (no image is opened); a missing set counts 0."""
    if not resolved.present:
        return 0
    if resolved.spec.layout == "folder":
        return _count_folder(resolved.path)
    if resolved.spec.layout == "imglist":
        return _count_list(resolved.path)
    return len(_waterbirds_rows(resolved.path, resolved.split))


def id_group_members(resolved: ResolvedSet, group: IdGroupSpec) -> list[str]:
    """The ``img_filename`` of each ID image in ``group`` (Waterbirds' ``y != place``), ready for
    a manifest given to ``evaluate --id-group``."""
    if resolved.spec.layout != "waterbirds" or group.rule != "y != place":
        raise NegalignError(f"ID group {group.name}: no rule to select it from {resolved.path}")
    rows = _waterbirds_rows(resolved.path, resolved.split)
    if rows and not {"y", "place", "img_filename"} <= rows[0].keys():
        raise NegalignError(
            f"{resolved.path} lacks the y, place or img_filename column for ID group {group.name}"
        )
    return [row["img_filename"] for row in rows if row["y"] != row["place"]]


def check_counts(preset: Preset | str, counted: Mapping[str, int]) -> list[str]:
    """A warning for each set of ``counted`` (set name -> images found) whose count differs from
    the preset's; sets the preset gives no count for, or that are not counted, are skipped."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    warnings = []
    for spec in preset.sets:
        if spec.name not in counted or spec.count is None or counted[spec.name] == spec.count:
            continue
        found = counted[spec.name]
        warnings.append(
            f"{spec.name}: {found:,} image(s) found, the {preset.name} preset expects {spec.count:,} "
            f"({abs(found - spec.count):,} {'fewer' if found < spec.count else 'more'}): results on it will "
            "not match the published setting"
        )
    return warnings


# ---------------------------------------------------------------------------- published figures


@dataclass(frozen=True)
class Figure:
    auroc: float
    fpr95: float
    source: str  # a key of the sources table


@dataclass(frozen=True)
class PublishedRow:
    method: str
    backbone: str
    method_citation: str
    per_set: dict[str, Figure]
    average: Figure | None  # as published; None where the source prints no average
    note: str = ""


@functools.cache
def published_data() -> dict[str, Any]:
    from negalign_cli.assets import asset_path

    data: dict[str, Any] = json.loads(asset_path("published.json").read_text(encoding="utf-8"))
    return data


def _figure(cell: Mapping[str, Any]) -> Figure:
    return Figure(float(cell["auroc"]), float(cell["fpr95"]), str(cell["source"]))


def published_setting(setting: str) -> list[PublishedRow]:
    """The rows recorded for ``setting`` (a key of ``settings`` in assets/published.json)."""
    entry = published_data()["settings"][setting]
    return [
        PublishedRow(
            method=row["method"],
            backbone=entry["backbone"],
            method_citation=row["method_citation"],
            per_set={name: _figure(cell) for name, cell in row["per_set"].items()},
            average=_figure(row["average"]) if row.get("average") else None,
            note=row.get("note", ""),
        )
        for row in entry["rows"]
    ]


def published_rows(preset: Preset | str) -> list[PublishedRow]:
    """The published rows for the preset's setting (CLIP ViT-B/16; AUROC and FPR@95 in %, FPR@95
    in the `neglabel` convention); empty where the preset matches no recorded setting."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    return published_setting(preset.published) if preset.published else []


def citation(source_key: str) -> str:
    """One line for a figure's source: authors, title, venue year, table."""
    source = published_data()["sources"][source_key]
    return f"{source['authors']}, {source['title']}, {source['venue']} {source['year']}, {source['table']}"


def set_names(preset: Preset | str) -> Sequence[str]:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    return [spec.name for spec in preset.ood_sets]


# Other names a set goes by (after normalising: lower case, letters and digits only).
ALIASES = {
    "dtd": "textures",
    "texture": "textures",
    "inat": "inaturalist",
    "places365": "places",
    "ssb": "ssbhard",
    "openimageo": "openimageo",
    "openimage": "openimageo",
}


def _normal(name: str) -> str:
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return ALIASES.get(key, key)


def match_sets(preset: Preset | str, names: Sequence[str]) -> dict[str, str]:
    """The preset's OOD set each of ``names`` (the ``--ood`` names) is: matched case-insensitively,
    ignoring anything but letters and digits (``ssb_hard`` is SSB-hard, ``openimage_o`` is
    OpenImage-O), and through ``ALIASES`` (``dtd`` is Textures, ``inat`` iNaturalist). Names that
    match no set of the preset are left out."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    specs = {_normal(spec.name): spec.name for spec in preset.ood_sets}
    return {name: specs[_normal(name)] for name in names if _normal(name) in specs}
