"""``CLIPNegAlign``: NegAlign's Python API, a thin facade over the stages and compute functions the
CLI runs.

Nothing here computes a score itself. Class and negative text features come from the per-word
cache (:func:`negalign_cli.stages.text.text_embeddings`, :func:`negalign_cli.stages.vocab.negative_features`),
the negatives from ``mine-negatives`` / ``split-vocab`` (:mod:`negalign_cli.stages.vocab`), the
CAM and the background embedding from :func:`negalign_cli.compute.vision.cam_batch`, every score
column from :func:`negalign_cli.compute.scores.compute_scores` (through the same
:func:`negalign_cli.stages.scoring.score_inputs` the ``score`` stage uses), and S_final from
:func:`negalign_cli.compute.evaluation.final_score`. Scores for the same images therefore equal
``negalign cam`` + ``negalign score`` with the same settings (to float32 rounding).

The constructor takes the arguments of NegAlign's published API (``train_dataset``, ``arch``,
``device``, ``output_folder``, ``load_saved_labels``, ``use_neglabel_star``,
``use_role_aware_negatives``, ``use_scale_stabilization``, ``use_p_align``, ``lambda_bg``,
``cam_fg_percentile``, ``cam_dilate_px``) plus this project's knobs. M3 (scale stabilisation)
z-scores with statistics fitted on ID images by :meth:`CLIPNegAlign.fit_calibration`, never
within a batch (a batch of one has no spread).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from negalign_cli.cache.workspace import Workspace
from negalign_cli.compute.cam_layout import CamConfig
from negalign_cli.compute.evaluation import ALIGN, STAR, final_score, nonfinite_final
from negalign_cli.compute.evaluation import fit_calibration as fit_statistics
from negalign_cli.compute.score_columns import SCORE_COLUMNS, seed_column
from negalign_cli.compute.score_config import ScoreConfig
from negalign_cli.defaults import (
    COMPILE_MODES,
    DEFAULT_COMPILE,
    DEFAULT_INVALID_CAM,
    DEFAULT_PRETRAINED,
    DEFAULT_TAU,
)
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import sha256_lines
from negalign_cli.inputs.datasets import PIXEL_ARRAYS, TooLarge, load_rgb, to_rgb
from negalign_cli.inputs.lexicon import load_lexicon
from negalign_cli.inputs.words import WordList, load_classes, load_negatives
from negalign_cli.lazy import lazy_module
from negalign_cli.model_names import OPENAI_ARCHS  # OpenAI's names, the same map the CLI reads
from negalign_cli.modelref import CHECKPOINT_SUFFIXES, PROJECT_MODELS, LazyModel, plan_model
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.settings import resolve_cache_dir, resolve_device, resolve_precision
from negalign_cli.stages import files
from negalign_cli.stages.scoring import (
    TextEncoder,
    check_config,
    check_group_seeds,
    check_request,
    check_seeds,
    score_inputs,
    seed_columns,
)
from negalign_cli.stages.vocab import (
    NegativeVocab,
    VocabEntry,
    mine_negatives,
    negatives_from_split,
    split_scores,
    split_vocab,
)

if TYPE_CHECKING:
    import torch
else:  # imported when a model is built or something is computed: `import negalign_cli.api` stays light
    torch = lazy_module("torch", live=True)

# What a single image's details hold besides the score columns of ``scores.parquet``.
DETAIL_EXTRAS = ("s_final", "pred_class", "pred_name", "pred_score", "cam_valid", "fg_fraction")


# The CLI options whose checks the API shares, and the API's own argument for each: an error raised
# by a shared check names the argument the caller passed (``device='cpu'``, not ``--device cpu``).
API_ARGUMENTS = {
    "--model": "arch",
    "--pretrained": "pretrained",
    "--device": "device",
    "--precision": "precision",
    "--cache-dir": "cache_dir",
    "--batch-size": "batch_size",
    "--classes": "train_dataset",
    "--cam-method": "cam_method",
    "--block": "cam_block",
    "--bg-pool": "bg_pool",
    "--fg-percentile": "cam_fg_percentile",
    "--dilate": "cam_dilate_px",
    "--tau": "tau",
    "--groups": "groups",
    "--group-seed": "group_seed",
    "--group-seeds": "group_seeds",
    "--neg-topk": "neg_topk",
    "--role-aware": "use_role_aware_negatives",
    "--role-aware-include-ambiguous": "role_aware_include_ambiguous",
    "--invalid-cam": "invalid_cam",
    "--negatives-split": "negatives_split",
    "--nouns": "neg_nouns",
    "--adjs": "neg_adjs",
    "--lexicon": "lexicon",
    "--calibration": "calibration",
    "--lambda": "lambda_bg",
    "--scale-stabilize": "use_scale_stabilization",
}
_SWITCHES = {"--role-aware", "--role-aware-include-ambiguous", "--scale-stabilize"}  # True in the API
_CHOICES = (  # option values the messages spell bare (``--device cpu``): an option's value, not prose
    r"auto|cpu|cuda(?::\w+)?|fp32|fp16|bf16|gradcam|gradxact|tokens|maskclip|clearclip|mask|fallback|zero|exclude"
)
_FLAG = re.compile(
    r"(?<![\w-])(?P<flag>--[a-z][a-z-]*[a-z])"
    r"(?: (?P<value>'[^']*'|\"[^\"]*\"|-?\d[\w.]*|[KN]\b|[/~][^\s,;)]*|(?:" + _CHOICES + r")\b))?"
)


def api_message(message: str) -> str:
    """A shared check's message as the Python API's caller reads it: each CLI option the API
    also takes becomes its argument (``--device cpu`` -> ``device='cpu'``, ``--groups`` ->
    ``groups=``, ``--role-aware`` -> ``use_role_aware_negatives=True``); options inside a quoted
    command (`` `negalign merge --shards-dir` ``) and options of other commands stay."""

    def spell(match: re.Match[str]) -> str:
        flag, value = match.group("flag"), match.group("value")
        name = API_ARGUMENTS.get(flag)
        if name is None:
            return match.group(0)
        if flag in _SWITCHES:
            return f"{name}=True" + (f" {value}" if value else "")
        if value is None:
            return f"{name}="
        if value[0] in "'\"" or value[0].isdigit() or value[0] == "-" or value in ("K", "N"):
            return f"{name}={value}"
        return f"{name}={value!r}"

    parts = message.split("`")
    return "`".join(_FLAG.sub(spell, part) if i % 2 == 0 else part for i, part in enumerate(parts))


F = TypeVar("F", bound=Callable[..., Any])


def _api_names(method: F) -> F:
    """Errors leave ``method`` naming the API's arguments (:func:`api_message`), not the CLI's options."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except NegalignError as exc:
            exc.args = (api_message(str(exc)),)
            raise

    return wrapper  # type: ignore[return-value]


def resolve_arch(arch: str, pretrained: str | None = None) -> tuple[str, str | None]:
    """``(open_clip architecture, weights)`` for an ``arch`` as the published API names it.

    OpenAI's names (``ViT-B/16``) map to open_clip's (``ViT-B-16``) with OpenAI's weights unless
    ``pretrained`` says otherwise; project models (``negalign-toy``) and open_clip names pass
    through; a checkpoint file named after its architecture (``/weights/ViT-B-16.pt``, as
    ``clip.load`` takes it) becomes that architecture with the file as weights."""
    if arch in OPENAI_ARCHS:
        return OPENAI_ARCHS[arch], pretrained or DEFAULT_PRETRAINED
    path = Path(arch).expanduser()
    if path.suffix in CHECKPOINT_SUFFIXES and path.is_file():
        stem = path.stem.replace("/", "-")
        if pretrained is not None:
            raise NegalignError(f"arch={arch!r} is a checkpoint file: leave pretrained out")
        return stem, str(path)
    if "/" in arch and not arch.startswith("local-dir:") and arch not in PROJECT_MODELS:
        raise NegalignError(
            f"unknown arch {arch!r}: use an OpenAI name ({', '.join(OPENAI_ARCHS)}), an open_clip "
            "architecture (`negalign models`), a project model, or a checkpoint file"
        )
    return arch, pretrained


def _word_list(spec: str | Path | Sequence[str], what: str, reporter: Reporter) -> WordList:
    """A preset name or a file (as the CLI reads them), or the names themselves."""
    if isinstance(spec, (str, Path)):
        return load_classes(str(spec), reporter) if what == "class" else load_negatives(spec, reporter)
    words = tuple(" ".join(str(w).split()) for w in spec)
    if not words or any(not w for w in words):
        raise NegalignError(f"{what} names must be non-empty strings")
    if len(set(words)) != len(words):
        if what == "class":
            raise NegalignError("train_dataset lists a class more than once")
        words = tuple(dict.fromkeys(words))
    return WordList(f"python list ({sha256_lines(words)[:12]})", words)


class CLIPNegAlign:
    """NegAlign's zero-shot OOD detector: S_final = S_NegLabel* + λ·P_align (higher = more ID).

    ``train_dataset`` names the ID classes: a preset (``imagenet``, ``waterbird``, ...), a text
    file with one class a line, or a list of class names. Negatives: ``negatives_split`` (a
    ``split-vocab`` folder) if given; else ``neg_nouns``/``neg_adjs`` (bundled list names, files or
    lists of words); else ``output_folder``'s ``neg_labels_noun.txt``/``neg_labels_adj.txt`` when
    ``load_saved_labels``; else NegLabel's mining from the lexicon (saved to ``output_folder``).
    Unless ``negatives_split`` is given they are split at ``tau`` (cached; exported to
    ``output_folder/negatives_split``). M1 (``neg_topk``), M2 (``use_role_aware_negatives``) and
    M3 (``use_scale_stabilization``) shape S* and apply only with ``use_neglabel_star``; without it
    S_final starts from S_NegLabel plain. ``group_seeds`` (two or more, as ``score --group-seeds``)
    scores every image once per NegLabel group seed: the columns are the first seed's, and each
    column that depends on the grouping (S_final included) is also given per seed as
    ``<column>@seed<S>``.
    """

    @_api_names
    def __init__(
        self,
        train_dataset: str | Path | Sequence[str] = "imagenet",
        arch: str = "ViT-B/16",
        device: str = "auto",
        output_folder: str | Path | None = None,
        load_saved_labels: bool = True,
        use_neglabel_star: bool = True,
        use_role_aware_negatives: bool = True,
        use_scale_stabilization: bool = False,
        use_p_align: bool = True,
        lambda_bg: float = 1.0,
        cam_fg_percentile: float = 80.0,
        cam_dilate_px: int = 1,
        *,
        cam_method: str = "gradcam",
        cam_block: int = -1,
        bg_pool: str = "tokens",
        tau: float = DEFAULT_TAU,
        groups: int = 100,
        group_seed: int | None = None,
        group_seeds: Sequence[int] | None = None,
        neg_topk: int | None = None,
        role_aware_include_ambiguous: bool = False,
        multimatch: bool = True,
        invalid_cam: str = DEFAULT_INVALID_CAM,
        pretrained: str | None = None,
        negatives_split: str | Path | None = None,
        neg_nouns: str | Path | Sequence[str] | None = None,
        neg_adjs: str | Path | Sequence[str] | None = None,
        lexicon: str | Path | None = None,
        calibration: Mapping[str, Mapping[str, float]] | str | Path | None = None,
        precision: str = "fp32",
        batch_size: int = 128,
        cache_dir: str | Path | None = None,
        reporter: Reporter | None = None,
        compile: str = DEFAULT_COMPILE,
    ) -> None:
        self.reporter = reporter or NullReporter()
        self.use_neglabel_star = use_neglabel_star
        self.use_role_aware_negatives = use_role_aware_negatives
        self.use_scale_stabilization = use_scale_stabilization
        self.use_p_align = use_p_align
        self.lambda_bg = float(lambda_bg)
        self.multimatch = multimatch
        self.batch_size = batch_size
        self.output_folder = Path(output_folder).expanduser() if output_folder is not None else None
        self.cam_config = CamConfig(
            method=cam_method,
            block=cam_block,
            fg_percentile=float(cam_fg_percentile),
            dilate=int(cam_dilate_px),
            bg_pool=bg_pool,
        )
        self.cam_config.validate(10**6)  # names and ranges; the block is checked against the model below
        star = use_neglabel_star
        seeds = check_group_seeds(group_seeds) if group_seeds is not None else None
        if seeds is not None and group_seed is not None:
            raise NegalignError("give either --group-seed or --group-seeds, not both")
        self.config = ScoreConfig(
            groups=groups,
            group_seed=seeds[0] if seeds else (group_seed or 0),
            neg_topk=neg_topk if star else None,
            role_aware=star and (use_role_aware_negatives or role_aware_include_ambiguous),
            include_ambiguous=star and role_aware_include_ambiguous,
            invalid_cam=invalid_cam,
        )
        check_config(self.config)  # groups=0 fails here, not at the first image
        if seeds is not None:
            check_seeds(self.config)
        # the group seeds scored: ``group_seeds``, or the one seed; the statistics M3 fitted per seed
        self.group_seeds: tuple[int, ...] | None = seeds
        self.calibration_by_seed: dict[int, dict[str, dict[str, float]]] | None
        self.calibration, self.calibration_by_seed = self._read_calibration(calibration, seeds)
        if batch_size < 1:
            raise NegalignError(f"batch_size must be at least 1 (got {batch_size})")
        if not np.isfinite(self.lambda_bg):
            raise NegalignError(f"lambda_bg= must be a finite number (got {lambda_bg})")

        name, weights = resolve_arch(arch, pretrained)
        torch_device = resolve_device(device)
        resolve_precision(precision, torch_device)
        self.classes = _word_list(train_dataset, "class", self.reporter)
        cache_root = resolve_cache_dir(cache_dir)
        # built when something is computed (texts or images the caches lack), else known from the
        # cache's fingerprint table (modelref)
        if str(compile).strip().lower() not in COMPILE_MODES:
            raise NegalignError(f"unknown compile={compile!r}: use {', '.join(COMPILE_MODES)}")
        self.model: LazyModel = plan_model(
            name,
            weights,
            cache_root,
            str(torch_device),
            precision,
            self.reporter,
            compile=str(compile).strip().lower(),
        )
        if self.model.random_weights:
            self.reporter.warn(f"{self.model.name} has random weights: its scores mean nothing")
        self.workspace = Workspace.open(cache_root)
        self.device = torch_device
        self.clip_preprocess = _Preprocess(self.model.image_transform())
        self._texts = _Texts(self.model, self.workspace, 1024, self.reporter)
        self.negatives = self._negatives(
            negatives_split, neg_nouns, neg_adjs, load_saved_labels, lexicon, tau
        )
        check_request(self.negatives, self.config, has_cam=use_p_align)
        if use_p_align:
            self.cam_config.validate(self.model.vision_blocks)
        # encoded (or read from the per-word cache) once, as the published class does in __init__
        self.class_features = self._texts.fix_classes(self.classes.words)
        self.negative_features = self._texts.fix_negatives(self.negatives)

    # ------------------------------------------------------------------ negatives
    def _negatives(
        self,
        split_folder: str | Path | None,
        nouns: str | Path | Sequence[str] | None,
        adjs: str | Path | Sequence[str] | None,
        load_saved: bool,
        lexicon: str | Path | None,
        tau: float,
    ) -> NegativeVocab:
        if split_folder is not None:
            return negatives_from_split(split_folder)
        lists = self._negative_labels(nouns, adjs, load_saved, lexicon)
        entries = [VocabEntry(words, source) for source, words in lists.items() if words is not None]
        scores = split_scores(self.model, entries, self.workspace, reporter=self.reporter)
        split = split_vocab(scores.artifact, self.workspace, tau=tau, reporter=self.reporter).artifact
        folder = split.path
        if self.output_folder is not None:
            folder = self.output_folder / files.NEGATIVES_SPLIT_DIR
            split.export(folder)
        return negatives_from_split(folder)

    def _negative_labels(
        self,
        nouns: str | Path | Sequence[str] | None,
        adjs: str | Path | Sequence[str] | None,
        load_saved: bool,
        lexicon: str | Path | None,
    ) -> dict[str, WordList | None]:
        if nouns is not None or adjs is not None:
            return {
                source: _word_list(given, "negative", self.reporter) if given is not None else None
                for source, given in (("noun", nouns), ("adj", adjs))
            }
        saved = {
            "noun": self.output_folder / files.NEG_LABELS_NOUN if self.output_folder else None,
            "adj": self.output_folder / files.NEG_LABELS_ADJ if self.output_folder else None,
        }
        if load_saved and any(path is not None and path.is_file() for path in saved.values()):
            assert self.output_folder is not None
            self._check_saved_labels(self.output_folder)
            self.reporter.info(f"negative labels from {self.output_folder}")
            return {source: _nonempty(path, self.reporter) for source, path in saved.items()}
        self.reporter.info("mining negative labels (NegLabel's recipe) for the ID classes")
        mined = mine_negatives(
            self.model, self.classes, load_lexicon(lexicon), self.workspace, reporter=self.reporter
        ).artifact
        if self.output_folder is not None:
            mined.export(self.output_folder)
        return {
            "noun": _nonempty(mined.file(files.NEG_LABELS_NOUN), self.reporter),
            "adj": _nonempty(mined.file(files.NEG_LABELS_ADJ), self.reporter),
        }

    def _check_saved_labels(self, folder: Path) -> None:
        """Negative labels this API mined into ``folder`` for other ID classes or another model are
        refused (one of them may be a class now; mining drops those). Lists placed there by hand
        (no `mine-negatives` manifest beside them) are the user's, and taken as they are."""
        from negalign_cli.cache.store import MANIFEST
        from negalign_cli.stages.vocab import MINE_STAGE

        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(manifest, dict) or manifest.get("stage") != MINE_STAGE:
            return
        inputs = manifest.get("inputs") or {}
        other = [
            what
            for what, key, now in (
                ("other ID classes", "classes", self.classes.digest),
                ("another model", "model", self.model.fingerprint),
            )
            if inputs.get(key) not in (None, now)
        ]
        if other:
            raise NegalignError(
                f"load_saved_labels=True: the negative labels in {folder} were mined for "
                f"{' and '.join(other)}: give another output_folder=, or load_saved_labels=False"
            )

    # ------------------------------------------------------------------ calibration (M3)
    @staticmethod
    def _read_calibration(
        calibration: Mapping[str, Mapping[str, float]] | str | Path | None,
        seeds: Sequence[int] | None = None,
    ) -> tuple[dict[str, dict[str, float]] | None, dict[int, dict[str, dict[str, float]]] | None]:
        """``calibration=``'s statistics and, with group ``seeds``, each seed's (``calibration_by_seed``:
        a results.json of group-seeded scores holds them per seed; one calibration serves every seed)."""
        from negalign_cli.stages.evaluation import parse_calibration, read_calibration

        if calibration is None:
            return None, None
        what = "calibration="
        if isinstance(calibration, (str, Path)):
            what = f"calibration={str(calibration)!r}"
            data = read_calibration(Path(calibration).expanduser(), what)
        else:
            data = calibration
        by_seed = {seed: parse_calibration(data, what, seed) for seed in seeds} if seeds is not None else None
        return parse_calibration(data, what), by_seed

    @property
    def m3(self) -> bool:
        """Whether S_final z-scores S* and P_align (M3 is part of S*, so it needs use_neglabel_star)."""
        return self.use_scale_stabilization and self.use_neglabel_star

    @_api_names
    def fit_calibration(self, id_images: Any) -> dict[str, dict[str, float]]:
        """M3: fit the mean and standard deviation of S* and P_align on ID images (a batch tensor,
        PIL images, or an iterable of batches such as a DataLoader yielding ``(images, labels)``)
        and use them from now on. Rows whose S* or P_align is undefined are left out, as
        ``evaluate`` does. Returns the statistics (the ``calibration`` block of ``results.json``).
        With ``group_seeds``, each seed's S* gets its own statistics (``calibration_by_seed``, as
        ``evaluate`` fits them per seed); the ones returned are the first seed's."""
        frame = self._frame(self._batches(id_images, "id_images"), final=False)
        fitted = {}
        for seed in self.group_seeds or (None,):
            star = frame[self._seed_column(STAR, seed)].to_numpy(dtype=np.float64)
            align = frame[ALIGN].to_numpy(dtype=np.float64) if self.use_p_align else np.zeros_like(star)
            keep = np.isfinite(star) & np.isfinite(align)
            if keep.sum() < 2:
                raise NegalignError(
                    f"fit_calibration needs at least 2 ID images with finite scores, got {keep.sum()}"
                    + (f" for group seed {seed}" if seed is not None else "")
                )
            fitted[seed] = fit_statistics(star[keep], align[keep])
        self.calibration = next(iter(fitted.values()))
        self.calibration_by_seed = {seed: f for seed, f in fitted.items() if seed is not None} or None
        return self.calibration

    def _seed_column(self, name: str, seed: int | None) -> str:
        """The column of ``name`` as group seed ``seed`` scored it: ``<name>@seed<S>`` where
        ``name`` depends on the grouping, else ``name`` (one seed: ``seed`` None)."""
        if seed is not None and name in self.config.seeded_columns():
            return seed_column(name, seed)
        return name

    # ------------------------------------------------------------------ scoring
    @_api_names
    def detection_score(
        self, img_tensor: Any, orig_image: Any = None, return_details: bool = False
    ) -> float | dict[str, Any]:
        """S_final of one image (a preprocessed ``(1, 3, H, W)`` or ``(3, H, W)`` tensor; or, with
        ``img_tensor=None``, the PIL image ``orig_image``, preprocessed here; a path or a pixel
        array is read as the CLI reads files, wherever an image goes). ``orig_image`` is otherwise
        unused: the CAM is computed on the tensor. With ``return_details``: a dict of every
        score component (``s_neglabel_plain``, ``s_neglabel_star``, ``p_align``, ``s_final``, …),
        the predicted class and its cosine, ``cam_valid``, and the CAM and foreground mask (patch grid)."""
        if img_tensor is None and orig_image is None:
            raise NegalignError("detection_score needs img_tensor or orig_image")
        given, argument = (img_tensor, "img_tensor") if img_tensor is not None else (orig_image, "orig_image")
        if isinstance(given, torch.Tensor):
            batch = self._pixels(given, argument)
        else:  # a PIL image, a path or a pixel array: preprocessed here
            batch = self._pixels(self.clip_preprocess(given, argument).unsqueeze(0), argument)
        if batch.shape[0] != 1:
            raise NegalignError(
                f"detection_score takes one image, got a batch of {batch.shape[0]}: use detection_scores"
            )
        frame, maps = self._frame([batch], keep_maps=True)
        row = frame.iloc[0]
        if not return_details:
            return float(row["s_final"])
        seeded = [name for name in frame.columns if "@seed" in name]  # group_seeds: per seed
        details: dict[str, Any] = {name: float(row[name]) for name in (*SCORE_COLUMNS, "s_final", *seeded)}
        details.update(
            pred_class=int(row["pred_class"]),
            pred_name=str(row["pred_name"]),
            pred_score=float(row["pred_score"]),
            cam_valid=None if pd.isna(row["cam_valid"]) else bool(row["cam_valid"]),
            fg_fraction=float(row["fg_fraction"]),
            lambda_bg=self.lambda_bg,
            cam=maps[0][0] if maps else None,
            foreground=maps[1][0] if maps else None,
        )
        return details

    @_api_names
    def detection_scores(self, batch: Any, return_details: bool = False) -> np.ndarray | pd.DataFrame:
        """S_final of every image of ``batch`` (a ``(B, 3, H, W)`` tensor, a list of tensors or of
        PIL images, or an iterable of batches), processed ``batch_size`` images at a time. With
        ``return_details``: a DataFrame with one row per image and the columns of ``scores.parquet``
        plus ``s_final``, ``pred_score`` and ``fg_fraction`` (with ``group_seeds``, also
        ``<column>@seed<S>`` for each column that depends on the grouping, ``s_final`` included)."""
        frame = self._frame(self._batches(batch, "batch"))
        return frame if return_details else frame["s_final"].to_numpy()

    def _batches(self, images: Any, argument: str = "images") -> Iterator[torch.Tensor]:
        """Input batches, lazily: a tensor as is; one image (a PIL image, a path, a pixel array),
        or a list of (3, H, W) tensors, PIL images, paths or pixel arrays (a 4-D pixel array is a
        stack of them), stacked ``batch_size`` at a time, so that preprocessed pixels of a long list
        never sit in memory at once; any other iterable batch by batch (``(images, labels)``
        tuples of a DataLoader give their images). Every batch is checked (:meth:`_pixels`); what
        cannot be read raises NegalignError naming ``argument``."""
        if isinstance(images, torch.Tensor):
            yield self._pixels(images, argument)
            return
        if isinstance(images, (str, Path, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim < 4
        ):
            images = [images]
        elif isinstance(images, np.ndarray):
            images = list(images)
        if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            loose = [
                not isinstance(item, (tuple, list))
                and not (isinstance(item, torch.Tensor) and item.dim() == 4)
                for item in images
            ]
            if loose and all(loose):  # single images
                for start in range(0, len(images), self.batch_size):
                    chunk = images[start : start + self.batch_size]
                    pixels = [
                        x if isinstance(x, torch.Tensor) else self.clip_preprocess(x, argument) for x in chunk
                    ]
                    if len({tuple(x.shape) for x in pixels}) > 1:
                        shapes = ", ".join(sorted({str(tuple(x.shape)) for x in pixels}))
                        raise NegalignError(
                            f"{argument}= holds tensors of different shapes ({shapes}): give preprocessed "
                            f"pixels of shape {self._pixel_shape(3)} (model.clip_preprocess(image))"
                        )
                    yield self._pixels(torch.stack(pixels), argument)
                return
        try:
            batches = iter(images)
        except TypeError:
            raise NegalignError(
                f"{argument}= is an object of type {type(images).__name__}: give a tensor of "
                "preprocessed pixels, PIL images, paths or pixel arrays (or a list or DataLoader of them)"
            ) from None
        for batch in batches:
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(batch, torch.Tensor):
                raise NegalignError(
                    f"{argument}= yielded an object of type {type(batch).__name__}: each batch of an "
                    f"iterable must be a tensor of shape {self._pixel_shape(4)} (or an (images, labels) pair)"
                )
            yield self._pixels(batch, argument)

    def _input_size(self) -> tuple[int, int]:
        """(height, width) the model's preprocessing gives."""
        size = self.model.preprocess_cfg["size"]
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    def _pixel_shape(self, dims: int) -> str:
        height, width = self._input_size()
        return f"(B, 3, {height}, {width})" if dims == 4 else f"(3, {height}, {width})"

    def _pixels(self, batch: torch.Tensor, argument: str) -> torch.Tensor:
        """A batch of preprocessed pixels, checked: floating point (uint8 pixels would be read as
        values 0..255 and score nonsense), (B, 3, H, W) or (3, H, W) for the model's input size,
        finite. Raises NegalignError naming ``argument``."""
        if batch.dim() == 3:
            batch = batch.unsqueeze(0)
        if batch.dim() != 4 or batch.shape[0] < 1 or tuple(batch.shape[1:]) != (3, *self._input_size()):
            raise NegalignError(
                f"{argument}= holds a tensor of shape {tuple(batch.shape)}: give preprocessed pixels of "
                f"shape {self._pixel_shape(4)} or {self._pixel_shape(3)} (model.clip_preprocess(image)), "
                "or the PIL images"
            )
        if not batch.is_floating_point():
            raise NegalignError(
                f"{argument}= holds a {batch.dtype} tensor: give preprocessed (normalised, floating "
                "point) pixels from model.clip_preprocess(image), or the PIL images"
            )
        if not bool(torch.isfinite(batch).all()):
            raise NegalignError(f"{argument}= holds NaN or infinite pixel values")
        return batch

    def _frame(self, batches: Iterable[torch.Tensor], keep_maps: bool = False, final: bool = True) -> Any:
        """One forward per chunk of ``batch_size`` images (Grad-CAM when P_align is on), then
        every score column at once, then S_final."""
        embeddings, background, meta, cams, masks = [], [], [], [], []
        for batch in batches:
            for start in range(0, batch.shape[0], self.batch_size):
                chunk = self.model.to_input(batch[start : start + self.batch_size])
                if self.use_p_align:
                    out = self.model.tower.cam(chunk, self.class_features, self.cam_config, self.reporter)
                    embeddings.append(out.embeddings.cpu())
                    background.append(out.background.cpu())
                    meta.append(
                        torch.stack(
                            [
                                out.pred_score.cpu().float(),
                                out.valid.cpu().float(),
                                out.foreground.flatten(1).float().mean(1).cpu(),
                            ],
                            dim=1,
                        )
                    )
                    if keep_maps:
                        cams.append(out.cams.cpu().numpy())
                        masks.append(out.foreground.cpu().numpy())
                else:
                    x = self.model.tower.encode(chunk, self.reporter).cpu()
                    embeddings.append(x)
                    meta.append(
                        torch.stack(
                            [
                                (x @ self.class_features.T).max(dim=-1).values,
                                torch.full((len(x),), float("nan")),
                                torch.full((len(x),), float("nan")),
                            ],
                            dim=1,
                        )
                    )
        if not embeddings:
            raise NegalignError("no images to score")
        images = torch.cat(embeddings).numpy()
        extra = torch.cat(meta).numpy()
        cam_frame = pd.DataFrame({"cam_valid": extra[:, 1] > 0.5}) if self.use_p_align else None
        inputs = score_inputs(
            images,
            torch.cat(background).numpy() if self.use_p_align else None,
            cam_frame,
            self.classes,
            self.negatives,
            self.config,
            self._texts,
        )
        from negalign_cli.compute.scores import compute_scores  # torch

        # once per group seed, as `score --group-seeds` runs the score stage once per seed
        seeds = self.group_seeds or (self.config.group_seed,)
        pairs = self._texts.pairs if self.multimatch else None
        per_seed = {
            seed: compute_scores(inputs, replace(self.config, group_seed=seed), pairs) for seed in seeds
        }
        columns = per_seed[seeds[0]]
        frame = pd.DataFrame({name: columns[name] for name in SCORE_COLUMNS})
        frame.insert(0, "pred_class", columns["pred_class"])
        frame.insert(1, "pred_name", np.array(self.classes.words, dtype=object)[columns["pred_class"]])
        frame["pred_score"] = extra[:, 0]
        frame["cam_valid"] = cam_frame["cam_valid"].to_numpy() if cam_frame is not None else None
        frame["fg_fraction"] = extra[:, 2]
        frame["s_final"] = self._final(frame) if final else np.nan
        if self.group_seeds:  # the columns `score --group-seeds` adds, then S_final of each seed
            frame = frame.assign(**seed_columns(per_seed, self.config.seeded_columns()))
            if self._seed_column(self._base_column, seeds[0]) != self._base_column:
                for seed in seeds:
                    frame[seed_column("s_final", seed)] = self._final(frame, seed) if final else np.nan
        if keep_maps:
            return frame, (np.concatenate(cams), np.concatenate(masks)) if cams else None
        return frame

    @property
    def _base_column(self) -> str:
        """The score S_final starts from: S* or S_NegLabel plain."""
        return STAR if self.use_neglabel_star else "s_neglabel_plain"

    def _final(self, frame: pd.DataFrame, seed: int | None = None) -> np.ndarray:
        """S_final from ``frame``'s columns (group seed ``seed``'s, with its M3 statistics where
        fit_calibration fitted them per seed)."""
        base = frame[self._seed_column(self._base_column, seed)].to_numpy(dtype=np.float64)
        if not self.use_p_align:
            align, lam = np.zeros_like(base), 0.0
        else:
            align, lam = frame[ALIGN].to_numpy(dtype=np.float64), self.lambda_bg
        if self.m3 and self.calibration is None:
            raise NegalignError(
                "use_scale_stabilization (M3) needs ID statistics: call fit_calibration(id_images) "
                "first, or pass calibration= (a results.json of `evaluate --scale-stabilize`)"
            )
        calibration = None
        if self.m3:  # the seed's own statistics where fit_calibration fitted them per seed
            by_seed = self.calibration_by_seed or {}
            calibration = by_seed[seed] if seed is not None and seed in by_seed else self.calibration
        overflow = nonfinite_final(base, align, [lam], calibration) & np.isfinite(base) & np.isfinite(align)
        if overflow.any():
            raise NegalignError(
                f"S_final overflows to inf for {int(overflow.sum())} image(s): lambda_bg={lam:g}"
                + (" and the M3 statistics (calibration=)" if calibration is not None else "")
                + " scale finite scores beyond float64; use a smaller lambda_bg or check calibration="
            )
        return final_score(base, align, lam, calibration)

    # ------------------------------------------------------------------ housekeeping
    def settings(self) -> dict[str, Any]:
        """Everything that decides the scores, as JSON-ready values (for provenance)."""
        from dataclasses import asdict

        return {
            "model": self.model.describe(),
            "fingerprint": self.model.fingerprint,
            "classes": self.classes.source,
            "negatives": self.negatives.origin,
            "score": asdict(self.config),
            "group_seeds": list(self.group_seeds) if self.group_seeds else None,
            "cam": asdict(self.cam_config),
            "use_neglabel_star": self.use_neglabel_star,
            "use_scale_stabilization": self.use_scale_stabilization,
            "use_p_align": self.use_p_align,
            "lambda_bg": self.lambda_bg,
            "calibration": json.loads(json.dumps(self.calibration)) if self.calibration else None,
        }

    def close(self) -> None:
        self.workspace.close()

    def __enter__(self) -> CLIPNegAlign:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Texts(TextEncoder):
    """The ``score`` stage's text encoder (per-word cache, noun templates), holding the class and
    negative features after their first use and each "p and n" text once encoded: a facade that
    scores one image at a time must not look every word up again per image."""

    classes: tuple[tuple[str, ...], torch.Tensor] | None = None
    negative_rows: tuple[NegativeVocab, torch.Tensor] | None = None
    pair_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def fix_classes(self, words: Sequence[str]) -> torch.Tensor:
        self.classes = (tuple(words), super().words(words))
        return self.classes[1]

    def fix_negatives(self, negatives: NegativeVocab) -> torch.Tensor:
        self.negative_rows = (negatives, super().negatives(negatives))
        return self.negative_rows[1]

    def words(self, words: Sequence[str]) -> torch.Tensor:
        if self.classes is not None and tuple(words) == self.classes[0]:
            return self.classes[1]
        return super().words(words)

    def negatives(self, negatives: NegativeVocab) -> torch.Tensor:
        if self.negative_rows is not None and negatives == self.negative_rows[0]:
            return self.negative_rows[1]
        return super().negatives(negatives)

    def pairs(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.pair_rows]
        if missing:
            self.pair_rows.update(zip(missing, super().pairs(missing), strict=True))
        return torch.stack([self.pair_rows[t] for t in texts])


class _Preprocess:
    """The CLI's preprocessing of one image: 8-bit RGB by the conversion ``embed images`` applies
    to files (:func:`negalign_cli.inputs.datasets.to_rgb`: alpha dropped, grayscale expanded,
    16-bit scaled), then open_clip's evaluation transform. Takes a PIL image, a path or a pixel
    array (``np.asarray(pil_image)``); anything else raises NegalignError naming ``argument``."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    @_api_names
    def __call__(self, image: Any, argument: str = "image") -> torch.Tensor:
        if isinstance(image, (str, Path)):
            try:
                rgb = load_rgb(str(Path(image).expanduser()))
            except FileNotFoundError:
                raise NegalignError(f"{argument}=: image file {str(image)!r} not found") from None
            except (OSError, ValueError, SyntaxError, TooLarge, Image.DecompressionBombError) as exc:
                raise NegalignError(
                    f"{argument}=: cannot read image {str(image)!r}: {str(exc).splitlines()[0][:120]}"
                ) from None
        elif isinstance(image, (Image.Image, np.ndarray)):
            try:
                rgb = to_rgb(image)
            except ValueError as exc:
                raise NegalignError(f"{argument}= holds {exc}") from None
        else:
            raise NegalignError(
                f"{argument}= holds an object of type {type(image).__name__}: give a PIL image, a path, "
                f"a pixel array ({PIXEL_ARRAYS}) or a tensor of preprocessed pixels"
            )
        return self.transform(rgb)


def _nonempty(path: Path | None, reporter: Reporter) -> WordList | None:
    """A negative-label file, or None when it is absent or empty (mining can keep no adjectives)."""
    if path is None or not path.is_file() or not path.read_text(encoding="utf-8").strip():
        return None
    return load_negatives(path, reporter)
