"""The ``score`` stage: every score component of every image, from cached embeddings.

Reads what ``embed images`` and ``cam`` write:

- ``image_embeddings.npy`` (N×D) and ``images.parquet`` (row, path, label, digest, status, reason;
  ``row`` is the image's row in the ``.npy`` file, −1 for a skipped image);
- optionally ``background_embeddings.npy`` (N×D, same rows) and ``cam.parquet`` (one row per
  embedding row: pred_class, pred_score, cam_valid, fg_fraction).

Writes ``scores.parquet``: one row per embedded image with its path, label and every component.
The model fingerprint and the score configuration travel in the parquet metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from negalign_cli.cache.statcache import StatCache, sha256_files
from negalign_cli.cache.store import MANIFEST, StageResult, StageSpec, listed_outputs, verify_folder
from negalign_cli.cache.workspace import Workspace
from negalign_cli.compute.score_columns import cam_columns, registry_key, seed_column  # torch-free
from negalign_cli.compute.score_config import ScoreConfig
from negalign_cli.defaults import (
    CLASS_TEMPLATES,
    INVALID_CAM_POLICIES,
    ROLE_AMBIGUOUS,
    ROLE_BACKGROUND,
    ROLE_OBJECT,
)
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.listing import set_name
from negalign_cli.inputs.words import WordList, load_templates
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files
from negalign_cli.stages.score_files import read_score_metadata, write_scores  # torch-free
from negalign_cli.stages.text import text_embeddings
from negalign_cli.stages.vocab import NegativeVocab, check_split_model, negative_features

if TYPE_CHECKING:  # a stage gets a modelref.LazyModel (built on first use) or a models.LoadedModel
    import torch

    from negalign_cli.compute.scores import ScoreInputs
    from negalign_cli.modelref import AnyModel

# torch and the score maths (compute/scores.py) are imported inside the compute step, which the
# store runs only on a miss: a cache hit imports no torch.

# 2: float64 aggregation, duplicate paths, --invalid-cam; 3: the fused scoring path (NegLabel takes
# the classes' log-sum-exp from Energy, in float64: values move by ~1e-9); 4: exp as 2^(x·log₂e)
# in cache-sized blocks (NegLabel moves by ≤ 1e-8 on bench rows, ≤ 1.2e-7 where logits near 100)
SCORE_STAGE, SCORE_VERSION = "score", 4
SEEDS_STAGE, SEEDS_VERSION = "score-seeds", 1  # one file of the per-seed score artifacts
EMBEDDINGS, IMAGES = files.IMAGE_EMBEDDINGS, files.IMAGE_TABLE
BACKGROUND, CAM = files.BACKGROUND_EMBEDDINGS, files.CAM_TABLE


@dataclass(frozen=True)
class ImageSet:
    """An ``embed images`` (+ ``cam``) output folder, checked for consistency."""

    folder: Path
    cam_folder: Path | None
    model_fingerprint: str | None
    cam_inputs: dict | None = None  # what the `cam` run was computed against (its manifest's inputs)
    cam_classes: str | None = None  # where its classes came from, when recorded
    # the files' sha256 as verified against their manifests: the stage key reads no file again
    verified: dict[str, str] | None = None
    source: str | None = None  # the --images the folder was made from, when its manifest records it

    @property
    def name(self) -> str:
        """The set's short name (progress bars): its images' source, else the folder's name."""
        return set_name(self.source) if self.source else self.folder.name

    @property
    def has_cam(self) -> bool:
        return self.cam_folder is not None

    def digests(self) -> dict[str, str]:
        if self.verified is not None:
            return dict(self.verified)
        files = {"embeddings": self.folder / EMBEDDINGS, "images": self.folder / IMAGES}
        if self.cam_folder is not None:
            files.update(background=self.cam_folder / BACKGROUND, cam=self.cam_folder / CAM)
        return dict(zip(files, sha256_files(list(files.values())), strict=True))


def resolve_folder(spec: str | Path, workspace: Workspace) -> Path:
    """A folder path, or the key (prefix) of a cached ``embed-images``/``cam`` artifact."""
    path = Path(spec).expanduser()
    if path.exists() or len(str(spec)) < 4 or any(c not in "0123456789abcdef" for c in str(spec).lower()):
        return path
    artifact = workspace.store.get(workspace.store.resolve(str(spec)))
    if artifact is None:
        raise NegalignError(f"artifact {spec} is corrupt or gone; rerun the stage that made it")
    return artifact.path


def open_image_set(
    images_dir: str | Path, cam_dir: str | Path | None = None, stat_cache: StatCache | None = None
) -> ImageSet:
    """An ``embed images`` or ``cam`` output folder (an ``--out`` export or an artifact folder),
    verified against its manifest.json: a truncated, edited or half-written file is refused. Each
    file is hashed once (not at all when ``stat_cache`` knows it unchanged); the digests it was
    verified by are the score stage's input digests."""
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise NegalignError(
            f"--images-dir {folder} is not a folder: give an `embed images` or `cam` --out folder"
        )
    manifest = _verified(
        folder,
        (EMBEDDINGS, IMAGES),
        "--images-dir takes an `embed images` or `cam` --out folder",
        stat_cache=stat_cache,
    )
    cam_folder: Path | None = Path(cam_dir).expanduser() if cam_dir is not None else folder
    cam_manifest = None
    if cam_dir is not None or (folder / BACKGROUND).is_file() or (folder / CAM).is_file():
        assert cam_folder is not None
        cam_manifest = _verified(
            cam_folder,
            (BACKGROUND, CAM),
            "--cam-dir takes a `cam` --out folder",
            "delete them to score without CAM outputs, or pass a `cam` --out folder with --cam-dir",
            stat_cache=stat_cache,
        )
    else:
        cam_folder = None
    recorded = [m.get("inputs", {}) for m in (manifest, cam_manifest) if m is not None]
    fingerprints = {inputs.get("model") for inputs in recorded} - {None}
    if len(fingerprints) > 1:
        raise NegalignError("the image embeddings and the CAM outputs come from different models")
    if len({inputs.get("images") for inputs in recorded}) > 1:
        raise NegalignError(
            f"--images-dir {folder} and --cam-dir {cam_folder} were made from different image lists: "
            "run `embed images` and `cam` on the same --images"
        )
    verified = {"embeddings": _sha256(manifest, EMBEDDINGS), "images": _sha256(manifest, IMAGES)}
    if cam_manifest is not None:
        verified.update(background=_sha256(cam_manifest, BACKGROUND), cam=_sha256(cam_manifest, CAM))
    return ImageSet(
        folder,
        cam_folder,
        next(iter(fingerprints), None),
        cam_manifest.get("inputs", {}) if cam_manifest is not None else None,
        (cam_manifest.get("sources") or {}).get("classes") if cam_manifest is not None else None,
        verified,
        manifest.get("images_source"),
    )


def _sha256(manifest: dict, name: str) -> str:
    """The sha256 a verified manifest records for ``name`` (the file was checked against it)."""
    return str(manifest["outputs"][name]["sha256"])


def check_cam_inputs(image_set: ImageSet, classes: WordList) -> str | None:
    """The CAM outputs were computed toward each image's predicted class among the `cam` run's
    classes, encoded with its class prompts: scoring with other classes or prompts would pair
    P_align (and cam.parquet's pred_name) with a class the scores do not know, so it is refused.
    Needs no model: the CLI runs it before loading weights. Returns a warning when the CAM outputs
    do not record both (made by an older negalign), so they could not be fully checked."""
    if image_set.cam_inputs is None:
        return None
    recorded_classes = image_set.cam_inputs.get("classes")
    recorded_templates = image_set.cam_inputs.get("class_templates")
    if recorded_classes is not None and recorded_classes != classes.digest:
        made = f" ({image_set.cam_classes})" if image_set.cam_classes else ""
        raise NegalignError(
            f"the CAM outputs in {image_set.cam_folder} were computed for other classes{made} than "
            f"--classes {classes.source}: their CAMs aim at classes this scoring does not know. Pass "
            "the --classes the `cam` run used, or rerun `cam` with these classes"
        )
    if recorded_templates is not None and recorded_templates != load_templates(CLASS_TEMPLATES).digest:
        raise NegalignError(
            f"the CAM outputs in {image_set.cam_folder} were computed with other class prompt templates "
            "than this negalign's (made by another version): rerun `cam`"
        )
    if recorded_classes is None or recorded_templates is None:
        return (
            f"the CAM outputs in {image_set.cam_folder} do not record their "
            f"{'classes' if recorded_classes is None else 'class prompt templates'} (an older negalign "
            "made them), so they cannot be checked against this scoring; rerun `cam` to have them checked"
        )
    return None


def _verified(
    folder: Path,
    names: tuple[str, ...],
    hint: str,
    leftover: str | None = None,
    stat_cache: StatCache | None = None,
) -> dict:
    """The manifest of ``folder``, which must list ``names`` and match them byte for byte. Files
    the manifest does not list were left by an earlier command (``leftover`` says what to do)."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise NegalignError(f"{folder / missing[0]} not found: {hint}")
    listed = listed_outputs(folder / MANIFEST)
    unlisted = [name for name in names if name not in listed]
    if listed and unlisted:
        stage = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("stage", "another command")
        raise NegalignError(
            f"{folder} holds {', '.join(unlisted)}, which its manifest.json (a `{stage}` output) does not "
            f"list: an earlier command left them there; {leftover or hint}"
        )
    manifest, reason = verify_folder(folder, names, stat_cache)
    if manifest is None:
        raise NegalignError(
            f"{folder} does not match its manifest.json ({reason}): it is truncated, edited or was "
            "written by an interrupted export; rerun the command that wrote it"
        )
    return manifest


def _load_images(
    image_set: ImageSet,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None, pd.DataFrame | None]:
    """The listed paths that were embedded (in list order, each with the ``row`` of its content:
    byte-identical files share a row), the embeddings, and the CAM outputs when present."""
    embeddings = np.load(image_set.folder / EMBEDDINGS, mmap_mode="r")
    table = pd.read_parquet(image_set.folder / IMAGES)
    if "row" not in table.columns:
        raise NegalignError(f"{image_set.folder / IMAGES} has no 'row' column")
    table = table[table["row"] >= 0]
    rows = np.unique(table["row"].to_numpy())
    if not np.array_equal(rows, np.arange(embeddings.shape[0])):
        raise NegalignError(
            f"{image_set.folder}: {IMAGES} refers to {len(rows)} distinct embedding rows but {EMBEDDINGS} "
            f"has {embeddings.shape[0]}; the two files come from different runs"
        )
    background = cam = None
    if image_set.cam_folder is not None:
        background = np.load(image_set.cam_folder / BACKGROUND, mmap_mode="r")
        cam = pd.read_parquet(image_set.cam_folder / CAM)
        if background.shape != embeddings.shape or len(cam) != embeddings.shape[0]:
            raise NegalignError(
                f"{image_set.cam_folder}: CAM outputs do not match the {embeddings.shape[0]} images"
            )
    return table.reset_index(drop=True), embeddings, background, cam


def check_config(config: ScoreConfig) -> None:
    """The settings' own ranges (the CLI's options check them too; the Python API only here)."""
    for option, value in (("--groups", config.groups), ("--neg-topk", config.neg_topk)):
        if value is None and option == "--neg-topk":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise NegalignError(f"{option} must be a whole number of at least 1 (got {value!r})")
    temperature = config.mcm_temperature  # MCM's softmax: below 0 it would rank the least similar class
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise NegalignError(f"--mcm-temperature must be a number (got {temperature!r})")
    if not np.isfinite(temperature) or temperature <= 0:
        raise NegalignError(f"--mcm-temperature must be a finite number above 0 (got {temperature!r})")


def check_request(negatives: NegativeVocab, config: ScoreConfig, *, has_cam: bool = False) -> None:
    """The checks that need no model: run them before loading weights or encoding any text."""
    check_config(config)
    if config.groups > len(negatives.words):
        raise NegalignError(f"{len(negatives.words)} negatives cannot fill --groups {config.groups}")
    if config.invalid_cam not in INVALID_CAM_POLICIES:
        raise NegalignError(
            f"unknown --invalid-cam {config.invalid_cam!r}: use {', '.join(INVALID_CAM_POLICIES)}"
        )
    if has_cam and negatives.roles is not None and len(negatives.indices(ROLE_BACKGROUND)) == 0:
        raise NegalignError("the split has no background-leaning negatives (N_bg): P_align is undefined")
    if not config.role_aware:
        return
    if negatives.roles is None:
        raise NegalignError("--role-aware needs --negatives-split DIR (a split-vocab output)")
    roles = star_roles(config)
    kept = len(negatives.indices(*roles))
    if kept < (config.groups if config.neg_topk is None else 1):
        raise NegalignError(
            f"--role-aware keeps {kept} negative(s) ({'/'.join(roles)}), too few for {config.groups} "
            "groups: lower --groups, add --neg-topk K, or include ambiguous words"
        )


def star_roles(config: ScoreConfig) -> tuple[str, ...]:
    """The roles whose words are the negatives of S* under M2."""
    return (ROLE_OBJECT, ROLE_AMBIGUOUS) if config.include_ambiguous else (ROLE_OBJECT,)


def score_images(
    model: AnyModel,
    image_set: ImageSet,
    classes: WordList,
    negatives: NegativeVocab,
    workspace: Workspace,
    config: ScoreConfig,
    *,
    multimatch: bool = True,
    batch_size: int = 1024,
    reporter: Reporter | None = None,
) -> StageResult:
    """Score one image set; changing a switch reruns only this stage (texts come from the item cache)."""
    reporter = reporter or NullReporter()
    if image_set.model_fingerprint and image_set.model_fingerprint != model.fingerprint:
        raise NegalignError(
            f"the images were embedded with model {image_set.model_fingerprint[:16]}, not with "
            f"{model.describe()}: pass the same --model/--pretrained"
        )
    check_request(negatives, config, has_cam=image_set.has_cam)
    unchecked = check_cam_inputs(image_set, classes)
    if unchecked:
        reporter.warn(unchecked)
    check_split_model(negatives, model, reporter)
    if not image_set.has_cam:
        reporter.info("no CAM outputs beside the embeddings: the background columns stay empty")
    params = {
        **asdict(config),
        "multimatch": multimatch,
        "precision": model.precision,
        "columns": registry_key(),  # a new or re-versioned score column is a new key
    }
    inputs = {
        "model": model.fingerprint,
        "classes": classes.digest,
        "negatives": negatives.digest,
        "class_templates": load_templates(CLASS_TEMPLATES).digest,  # the prompts of every text encoded
        "noun_templates": load_templates("noun").digest,
        "adjective_templates": load_templates("adjective").digest,
        **image_set.digests(),
    }
    spec = StageSpec(SCORE_STAGE, SCORE_VERSION, params, inputs)

    def compute(folder):
        from negalign_cli.compute.scores import compute_scores

        table, embeddings, background, cam = _load_images(image_set)
        if background is not None and negatives.roles is None:
            reporter.warn(
                "P_align needs background negatives: pass --negatives-split DIR; P_align left empty"
            )
            background = cam = None
        texts = TextEncoder(model, workspace, batch_size, reporter)
        inputs_ = score_inputs(embeddings, background, cam, classes, negatives, config, texts)
        label = f"scoring images: {image_set.name} ({len(embeddings)} distinct" + (
            f", {len(table)} paths)" if len(table) != len(embeddings) else ")"
        )
        if model.device.type == "cpu":
            from negalign_cli.compute.native import describe

            reporter.debug(f"scoring's passes after its matmuls: {describe()}")
        with reporter.progress(label, len(embeddings)) as advance:
            columns = compute_scores(
                inputs_, config, texts.pairs if multimatch else None, on_chunk=advance, device=model.device
            )
        frame = _scores_frame(table, columns, classes, cam)
        metadata = {
            "model": model.fingerprint,
            "config": params,
            "classes": classes.digest,
            "negatives": negatives.digest,
        }
        write_scores(frame, folder / files.SCORES, metadata)
        counts = {
            "images": len(frame),
            "distinct": len(embeddings),
            "negatives": len(negatives.words),
            "classes": len(classes),
        }
        if inputs_.star_indices is not None:
            counts["star_negatives"] = int(inputs_.star_indices.numel())
        if inputs_.background_indices is not None:
            counts["background_negatives"] = int(inputs_.background_indices.numel())
            counts["cam_valid"] = int(frame["cam_valid"].sum())
            counts["cam_invalid"] = int((~frame["cam_valid"].astype(bool)).sum())
        cam_dir = (
            {"cam_dir": str(image_set.cam_folder)}
            if image_set.cam_folder not in (None, image_set.folder)
            else {}
        )
        return {"counts": counts, "model": model.describe(), "images_dir": str(image_set.folder), **cam_dir}

    return workspace.store.run(spec, compute, reporter)


def parse_group_seeds(text: str) -> tuple[int, ...]:
    """``--group-seeds 0,1,2``: two or more distinct integer seeds, in the order given."""
    usage = "give two or more distinct integer seeds, e.g. --group-seeds 0,1,2"
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise NegalignError(f"--group-seeds is empty: {usage}")
    try:
        seeds = tuple(int(part) for part in parts)
    except ValueError:
        raise NegalignError(f"cannot read --group-seeds {text!r}: {usage}") from None
    return check_group_seeds(seeds, text)


def check_group_seeds(seeds: Sequence[int], shown: str | None = None) -> tuple[int, ...]:
    """Two or more distinct integer seeds (``--group-seeds``, the API's ``group_seeds=``), in the
    order given; ``shown`` is how the caller wrote them (default: comma-separated)."""
    usage = "give two or more distinct integer seeds, e.g. --group-seeds 0,1,2"
    try:
        whole = not isinstance(seeds, (str, bytes)) and all(
            not isinstance(seed, bool) and int(seed) == seed for seed in seeds
        )
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise NegalignError(f"--group-seeds {seeds!r} is not a list of integers: {usage}")
    seeds = tuple(int(seed) for seed in seeds)
    shown = shown if shown is not None else ",".join(map(str, seeds))
    duplicated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if duplicated:
        raise NegalignError(
            f"--group-seeds gives seed(s) {', '.join(map(str, duplicated))} more than once: {usage}"
        )
    if len(seeds) < 2:
        count = "one seed" if seeds else "no seed"
        raise NegalignError(
            f"--group-seeds {shown!r} holds {count}, and a standard deviation needs two: {usage} "
            "(or --group-seed S for one)"
        )
    return seeds


def check_seeds(config: ScoreConfig) -> None:
    """``--group-seeds`` needs a score that depends on the grouping."""
    if not config.seeded_columns():
        raise NegalignError(
            f"--group-seeds changes nothing with --groups {config.groups}: every seed gives the same "
            "single group; use --groups 2 or more, or drop --group-seeds"
        )


def seed_columns(per_seed: Mapping[int, Any], seeded: Sequence[str]) -> dict[str, np.ndarray]:
    """The columns ``score --group-seeds`` adds to the first seed's: ``<column>@seed<S>`` of each
    seeded column (``ScoreConfig.seeded_columns``) for each seed, seed by seed, from each seed's
    columns (a score frame, or ``compute_scores``'s output in the Python API)."""
    return {
        seed_column(column, seed): np.asarray(columns[column])
        for seed, columns in per_seed.items()
        for column in seeded
    }


@dataclass(frozen=True)
class SeedsResult:
    """``score --group-seeds``: the file of every seed (``combined``) and each seed's own score
    artifact (the one ``score --group-seed S`` makes: cached per seed)."""

    combined: StageResult
    seeds: dict[int, StageResult]


def score_seeds(
    model: AnyModel,
    image_set: ImageSet,
    classes: WordList,
    negatives: NegativeVocab,
    workspace: Workspace,
    config: ScoreConfig,
    seeds: Sequence[int],
    *,
    multimatch: bool = True,
    batch_size: int = 1024,
    reporter: Reporter | None = None,
) -> SeedsResult:
    """Score one image set once per NegLabel group seed (each run is the ``score`` artifact of that
    seed, cached on its own: adding a seed later scores only that seed; the texts come from the
    item cache), then put them in one ``scores.parquet`` (its own small artifact, keyed by the
    per-seed files): every column as the first seed scored it, and each grouped column once per
    seed as ``<column>@seed<S>`` (``evaluate`` reports mean ± std over them)."""
    reporter = reporter or NullReporter()
    check_seeds(config)
    per_seed = {}
    for seed in seeds:
        reporter.info(f"group seed {seed}")
        per_seed[seed] = score_images(
            model,
            image_set,
            classes,
            negatives,
            workspace,
            replace(config, group_seed=seed),
            multimatch=multimatch,
            batch_size=batch_size,
            reporter=reporter,
        )
    seeded = list(config.seeded_columns())
    params = {"seeds": list(seeds), "columns": seeded}
    inputs = {
        f"seed {seed}": result.artifact.manifest["outputs"][files.SCORES]["sha256"]
        for seed, result in per_seed.items()
    }
    spec = StageSpec(SEEDS_STAGE, SEEDS_VERSION, params, inputs)
    first = per_seed[seeds[0]].artifact

    def compute(folder):
        frame = pd.read_parquet(first.file(files.SCORES))
        frames = {}
        for seed, result in per_seed.items():
            other = frame if seed == seeds[0] else pd.read_parquet(result.artifact.file(files.SCORES))
            if not other["path"].equals(frame["path"]):
                raise NegalignError(f"the score files of group seeds {seeds[0]} and {seed} list other images")
            frames[seed] = other
        for name, values in seed_columns(frames, seeded).items():
            frame[name] = values
        metadata = read_score_metadata(first.file(files.SCORES))
        metadata["config"] = {**metadata.get("config", {}), "group_seeds": list(seeds)}
        metadata["seeded_columns"] = seeded
        write_scores(frame, folder / files.SCORES, metadata)
        return {
            "counts": first.manifest.get("counts", {}),
            "model": first.manifest.get("model"),
            "images_dir": first.manifest.get("images_dir"),
            "group_seeds": {str(seed): result.artifact.key for seed, result in per_seed.items()},
        }

    return SeedsResult(workspace.store.run(spec, compute, reporter), per_seed)


@dataclass
class TextEncoder:
    """Class, negative and "p and n" features through the per-word cache (noun templates)."""

    model: AnyModel
    workspace: Workspace
    batch_size: int
    reporter: Reporter

    def words(self, words: Sequence[str]) -> torch.Tensor:
        return self._encode(words, "classes")

    def _encode(self, words: Sequence[str], label: str) -> torch.Tensor:
        import torch

        vectors = text_embeddings(
            self.model,
            list(words),
            load_templates(CLASS_TEMPLATES),
            self.workspace,
            batch_size=self.batch_size,
            reporter=self.reporter,
            label=label,
        ).vectors
        return torch.from_numpy(vectors)

    def negatives(self, negatives: NegativeVocab) -> torch.Tensor:
        import torch

        features = negative_features(
            self.model, negatives, self.workspace, batch_size=self.batch_size, reporter=self.reporter
        )
        return torch.from_numpy(features)

    def pairs(self, texts: list[str]) -> torch.Tensor:
        """Features of "p and n" texts: ``compute_scores`` keeps them in a table addressed by
        (class, negative) index and asks, once per chunk of images, only for pairs not seen before."""
        self.reporter.debug(f"multi-matching: {len(texts)} 'p and n' texts not seen before")
        return self._encode(texts, "'p and n' texts")


def score_inputs(
    embeddings: np.ndarray,
    background: np.ndarray | None,
    cam: pd.DataFrame | None,
    classes: WordList,
    negatives: NegativeVocab,
    config: ScoreConfig,
    texts: TextEncoder,
) -> ScoreInputs:
    """Everything ``compute_scores`` reads: the image rows (memory-mapped), the text features, and
    which negatives form N_obj (M2) and N_bg (P_align)."""
    import torch

    from negalign_cli.compute.scores import ScoreInputs

    star = torch.from_numpy(negatives.indices(*star_roles(config))) if config.role_aware else None
    valid = background_indices = None
    if background is not None and cam is not None:
        valid = torch.from_numpy(cam["cam_valid"].to_numpy(dtype=bool).copy())
        background_indices = torch.from_numpy(negatives.indices(ROLE_BACKGROUND))
    return ScoreInputs(
        images=embeddings,
        classes=texts.words(classes.words),
        negatives=texts.negatives(negatives),
        class_names=classes.words,
        negative_names=negatives.words,
        star_indices=star,
        background=background if valid is not None else None,
        background_valid=valid,
        background_indices=background_indices,
    )


def _scores_frame(
    table: pd.DataFrame, columns: dict[str, np.ndarray], classes: WordList, cam: pd.DataFrame | None
) -> pd.DataFrame:
    """One row per listed path: scores are per distinct content, so byte-identical copies share them."""
    rows = table["row"].to_numpy()
    predicted = columns["pred_class"][rows]
    frame = pd.DataFrame(
        {
            "row": rows,
            "path": table["path"].astype(str).to_numpy(),
            "label": table["label"].to_numpy() if "label" in table else None,
            "pred_class": predicted,
            "pred_name": np.array(classes.words, dtype=object)[predicted],
            **{name: values[rows] for name, values in columns.items() if name != "pred_class"},
            "cam_valid": cam["cam_valid"].to_numpy(dtype=bool)[rows] if cam is not None else None,
        }
    )
    if cam is None:
        frame[list(cam_columns())] = None
    return frame
