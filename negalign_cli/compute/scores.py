"""OOD scores on cached embeddings: MCM, NegLabel (grouped, top-k), NegRefine multi-matching,
P_align. Pure, vectorised, chunked over images. Higher score = more in-distribution.

Notation (docs/maths.md): x = L2-normalised image embedding, P = ID class features (K×D),
N = negative features (M×D); logits are 100·cos.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from negalign_cli.compute.score_columns import SCORE_COLUMNS, pair_text  # the registry, torch-free
from negalign_cli.defaults import DEFAULT_INVALID_CAM

LOGIT_SCALE = 100.0
MEMORY_BUDGET_FLOATS = 1 << 25  # ~128 MiB of float32 per chunk of logits
MULTIMATCH_CHUNK = 16384  # images whose distinct "p and n" pairs are encoded together


def chunk_rows(n_columns: int, budget: int = MEMORY_BUDGET_FLOATS) -> int:
    """Images per chunk so that one chunk's logits stay within the budget."""
    return max(1, budget // max(1, n_columns))


# ----------------------------------------------------------------------------- MCM
def mcm(cosines: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MCM: max_k softmax(x·P / T)_k on raw cosines (T = 1, MCM's default), in float64."""
    return torch.softmax(cosines.double() / temperature, dim=-1).max(dim=-1).values


def energy(pos_logits: torch.Tensor) -> torch.Tensor:
    """Energy score (negative free energy) at T = 1: logsumexp_k of the class logits 100·x·P_k."""
    return torch.logsumexp(pos_logits.double(), dim=-1)


def max_logit(pos_logits: torch.Tensor) -> torch.Tensor:
    """MaxLogit: the largest class logit 100·x·P_k."""
    return pos_logits.double().max(dim=-1).values


# ----------------------------------------------------------------------------- NegLabel
def group_order(n_negatives: int, groups: int, seed: int = 0) -> torch.Tensor:
    """Column order of NegRefine's grouping: drop the last ``n mod G`` negatives, then permute the
    rest with ``torch.randperm`` seeded with ``seed`` (a CPU generator); group g is the g-th
    contiguous block of ``n // G`` columns of that order."""
    if groups < 1:
        raise ValueError("groups must be at least 1")
    if n_negatives < groups:
        raise ValueError(f"{n_negatives} negatives cannot fill {groups} groups")
    kept = n_negatives - n_negatives % groups
    if groups == 1:
        return torch.arange(kept)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(kept, generator=generator)


def sigmoid_of_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sigmoid(a − b) in float64. With logits at 100·cos, |a − b| stays below ~250, far from
    float64's underflow (~745), while float32 returns exactly 0 below −104 (or 1 above 17): distinct
    images would tie, and ties change AUROC and FPR@95."""
    return torch.sigmoid(a.double() - b.double())


def _blocks(columns: torch.Tensor, groups: int) -> torch.Tensor:
    """The last dimension split into ``groups`` contiguous blocks: a view, also of a column slice."""
    return columns.view(*columns.shape[:-1], groups, -1)


def group_logsumexp(
    grouped_neg_logits: torch.Tensor, groups: int, overwrite: bool = False, maxes: torch.Tensor | None = None
) -> torch.Tensor:
    """LSE over each of the ``groups`` contiguous column blocks: (n, groups). The same operations as
    ``torch.logsumexp`` (max, subtract, exp, sum, log, add the max back), so the same values; with
    ``overwrite`` they run in place on the caller's buffer, whose values are destroyed (no n×M
    temporaries: the memory traffic that made scoring slower than its matrix product). ``maxes``:
    the blocks' maxima (n, groups) if the caller has them already."""
    blocks = _blocks(grouped_neg_logits, groups)
    if not overwrite:
        return torch.logsumexp(blocks, dim=-1)
    shift = (blocks.amax(dim=-1) if maxes is None else maxes.clone()).unsqueeze(-1)
    shift.masked_fill_(shift.abs() == float("inf"), 0.0)
    lse: torch.Tensor = blocks.sub_(shift).exp_().sum(dim=-1).log_().add_(shift.squeeze(-1))
    return lse


def top_columns(
    logits: torch.Tensor, k: int, kept: int, groups: int, maxes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(logits, k)`` (values, column indices) without sorting whole rows: the k largest
    values lie in the k column blocks (of the first ``kept`` columns, ``groups`` blocks) with the
    largest maxima, or among the columns after ``kept``; only those candidates are ranked. The
    values equal a full top-k exactly; among exactly tied values the chosen columns may differ."""
    if groups <= k or kept == 0:
        return torch.topk(logits, k, dim=-1)
    blocks = _blocks(logits[:, :kept], groups)
    width = blocks.shape[-1]
    best_blocks = (blocks.amax(dim=-1) if maxes is None else maxes).topk(k, dim=-1).indices  # (n, k)
    candidates = torch.gather(blocks, 1, best_blocks.unsqueeze(-1).expand(-1, -1, width)).flatten(1)
    columns = (best_blocks.unsqueeze(-1) * width + torch.arange(width, device=logits.device)).flatten(1)
    if kept < logits.shape[1]:
        rest = logits[:, kept:]
        candidates = torch.cat([candidates, rest], dim=1)
        tail = torch.arange(kept, logits.shape[1], device=logits.device)
        columns = torch.cat([columns, tail.expand(rest.shape[0], -1)], dim=1)
    values, order = torch.topk(candidates, k, dim=-1)
    return values, torch.gather(columns, 1, order)


def neglabel_grouped(
    pos_logits: torch.Tensor,
    grouped_neg_logits: torch.Tensor,
    groups: int,
    overwrite: bool = False,
    maxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over groups of Σ_{k∈pos} softmax([pos, neg_g])_k = sigmoid(LSE(pos) − LSE(neg_g)).

    ``grouped_neg_logits`` holds the negatives already in group order (``group_order``). The
    log-sum-exps are taken in the logits' dtype, the sigmoid and the mean in float64. With
    ``overwrite`` the negative logits are used as scratch space (see :func:`group_logsumexp`)."""
    pos_lse = torch.logsumexp(pos_logits, dim=-1, keepdim=True)
    neg_lse = group_logsumexp(grouped_neg_logits, groups, overwrite, maxes)
    return sigmoid_of_difference(pos_lse, neg_lse).mean(dim=-1)


def neglabel_topk(pos_logits: torch.Tensor, neg_logits: torch.Tensor, k: int) -> torch.Tensor:
    """NegLabel* M1: only the k largest negative logits of each image enter the softmax."""
    k = min(k, neg_logits.shape[-1])
    top = torch.topk(neg_logits, k, dim=-1).values
    return sigmoid_of_difference(torch.logsumexp(pos_logits, dim=-1), torch.logsumexp(top, dim=-1))


# ----------------------------------------------------------------------------- NegRefine
def multimatch(
    images: torch.Tensor, pair_features: torch.Tensor, pair_negative_logits: torch.Tensor
) -> torch.Tensor:
    """NegRefine's multi-matching score: max over an image's pairs of
    exp(100·x·f(p and n)) / (exp(100·x·f(p and n)) + exp(100·x·f(n))) = sigmoid(difference).

    ``pair_features``: (n, pairs, D) features of the image's "p and n" texts;
    ``pair_negative_logits``: (n, pairs) the logit 100·x·f(n) of each pair's negative."""
    pair_logits = LOGIT_SCALE * torch.einsum("nd,npd->np", images, pair_features)
    return sigmoid_of_difference(pair_logits, pair_negative_logits).max(dim=-1).values


# ----------------------------------------------------------------------------- P_align
def p_align(
    background: torch.Tensor,
    predicted_class_features: torch.Tensor,
    background_negatives: torch.Tensor,
    k: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P_align = b·P_{c_hat} − mean(top-k of b·N_bg); returns (p_align, s_bg_pos, s_bg_neg)."""
    s_bg_pos = (background * predicted_class_features).sum(dim=-1)
    k = min(k, background_negatives.shape[0])
    s_bg_neg = torch.topk(background @ background_negatives.T, k, dim=-1).values.mean(dim=-1)
    return s_bg_pos - s_bg_neg, s_bg_pos, s_bg_neg


# ----------------------------------------------------------------------------- all at once
@dataclass(frozen=True)
class ScoreConfig:
    groups: int = 100
    group_seed: int = 0
    mcm_temperature: float = 1.0
    neg_topk: int | None = None  # M1
    role_aware: bool = False  # M2
    include_ambiguous: bool = False  # M2 + ambiguous words
    multimatch_pos: int = 5
    multimatch_neg: int = 5
    multimatch_weight: float = 2.0
    align_topk: int = 5
    invalid_cam: str = DEFAULT_INVALID_CAM  # fallback | zero | exclude: P_align where the CAM is invalid

    @property
    def star_is_plain(self) -> bool:
        return self.neg_topk is None and not self.role_aware


Rows = torch.Tensor | np.ndarray  # numpy arrays may be memory-mapped: rows are read chunk by chunk


def unit_rows(array: Rows, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as L2-normalised float32 (reads only those rows of a memory map)."""
    block = array[start:stop]
    if isinstance(block, np.ndarray):
        rows = np.asarray(block, dtype=np.float32)
        tensor = torch.from_numpy(rows if rows.flags.writeable else rows.copy())  # a read-only memory map
    else:
        tensor = block.float()
    return torch.nn.functional.normalize(tensor, dim=-1)


@dataclass
class ScoreInputs:
    images: Rows  # (N, D) image embeddings (normalised here, chunk by chunk)
    classes: torch.Tensor  # (K, D)
    negatives: torch.Tensor  # (M, D), nouns then adjective phrases (NegRefine's order)
    class_names: Sequence[str]
    negative_names: Sequence[str]
    star_indices: torch.Tensor | None = None  # rows of ``negatives`` forming N_obj (+ N_amb), for M2
    background: Rows | None = None  # (N, D) background embeddings (normalised here), or None
    background_valid: torch.Tensor | None = None  # (N,) bool
    background_indices: torch.Tensor | None = None  # rows of ``negatives`` forming N_bg


@dataclass(frozen=True)
class NegativeLayout:
    """The columns of one matmul's negative logits, laid out as [grouped order | dropped]: the
    grouped NegLabel reads the first ``kept`` columns as a view, top-k (M1, multi-matching) reads
    all of them, M2 gathers ``star_columns`` (already in its own group order unless M1 is on)."""

    layout: torch.Tensor  # column j of the logits is negative layout[j]
    weights: torch.Tensor  # (D, M) the negatives in that order, transposed for the matmul
    kept: int  # negatives that fill the G groups
    star_columns: torch.Tensor | None  # M2's columns

    @classmethod
    def build(
        cls, negatives: torch.Tensor, star_indices: torch.Tensor | None, config: ScoreConfig
    ) -> NegativeLayout:
        n_neg = negatives.shape[0]
        order = group_order(n_neg, config.groups, config.group_seed)
        dropped = torch.arange(order.shape[0], n_neg)  # group_order permutes the first n − (n mod G)
        layout = torch.cat([order, dropped])
        position = torch.empty_like(layout)
        position[layout] = torch.arange(n_neg)
        star_columns = None
        if config.role_aware:
            if star_indices is None or star_indices.numel() == 0:
                raise ValueError("role-aware scoring needs object-leaning negatives (N_obj)")
            star_columns = position[star_indices]
            if config.neg_topk is None:
                star_columns = star_columns[
                    group_order(star_columns.shape[0], config.groups, config.group_seed)
                ]
        return cls(layout, negatives[layout].T.contiguous(), order.shape[0], star_columns)


@dataclass
class _TopMatches:
    """Per image, what multi-matching needs: its top classes and top negatives (with logits)."""

    classes: np.ndarray  # (n, k_pos) class indices
    negatives: np.ndarray  # (n, k_neg) negative indices
    negative_logits: np.ndarray  # (n, k_neg)


def compute_scores(
    inputs: ScoreInputs,
    config: ScoreConfig,
    encode_pairs: Callable[[list[str]], torch.Tensor] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Every score column of the registry for every image, in chunks of images (no N×M matrix is
    ever whole; one matmul per chunk gives all negative logits, see :class:`NegativeLayout`).

    ``encode_pairs`` turns NegRefine's "p and n" texts into features (noun templates); each
    distinct pair is encoded once per chunk of images. Without it the multi-matching columns are
    NaN; without background embeddings the P_align columns are NaN. With ``device`` (e.g. a GPU)
    each chunk is scored there and only its per-image results come back.
    """
    device = torch.device(device or "cpu")
    classes = inputs.classes.float().to(device)
    negatives = inputs.negatives.float().to(device)
    n_images = inputs.images.shape[0]
    layout = NegativeLayout.build(negatives, inputs.star_indices, config)
    background_negatives = None
    if inputs.background is not None and inputs.background_indices is not None:
        if inputs.background_indices.numel() == 0:
            raise ValueError("P_align needs background-leaning negatives (N_bg)")
        background_negatives = negatives[inputs.background_indices]
    k_pos = min(config.multimatch_pos, classes.shape[0])
    k_neg = min(config.multimatch_neg, negatives.shape[0])
    out: dict[str, np.ndarray] = {name: np.full(n_images, np.nan) for name in SCORE_COLUMNS}
    out["pred_class"] = np.empty(n_images, dtype=np.int64)
    top = _TopMatches(
        np.empty((n_images, k_pos), dtype=np.int64),
        np.empty((n_images, k_neg), dtype=np.int64),
        np.empty((n_images, k_neg), dtype=np.float32),
    )
    step = min(chunk_rows(negatives.shape[0] + classes.shape[0]), max(1, n_images))
    buffer = torch.empty(step, negatives.shape[0], device=device)  # one chunk's negative logits, reused
    for start in range(0, n_images, step):
        rows = slice(start, min(start + step, n_images))
        _score_chunk(inputs, config, classes, layout, background_negatives, rows, out, top, buffer)
        if on_chunk is not None:
            on_chunk(rows.stop - rows.start)
    if encode_pairs is not None:
        out["s_multimatch"] = _multimatch_column(inputs, classes.shape[1], top, encode_pairs, device)
    if background_negatives is not None and inputs.background_valid is not None:
        apply_invalid_cam_policy(out, ~inputs.background_valid.cpu().numpy(), config.invalid_cam)
    out["s_negrefine"] = out["s_neglabel_plain"] + config.multimatch_weight * out["s_multimatch"]
    return out


def _score_chunk(
    inputs: ScoreInputs,
    config: ScoreConfig,
    classes: torch.Tensor,
    layout: NegativeLayout,
    background_negatives: torch.Tensor | None,
    rows: slice,
    out: dict[str, np.ndarray],
    top: _TopMatches,
    buffer: torch.Tensor,
) -> None:
    """The scores of one chunk of images, written into ``out`` (and ``top``) at ``rows``. The
    negative logits go into ``buffer``; everything that reads them runs before the grouped
    NegLabel, which uses the buffer as scratch space."""
    x = unit_rows(inputs.images, rows.start, rows.stop).to(buffer.device, non_blocking=True)
    cos_pos = x @ classes.T
    pos_logits = LOGIT_SCALE * cos_pos
    logits = buffer[: x.shape[0]]
    torch.matmul(LOGIT_SCALE * x, layout.weights, out=logits)  # scaling the rows first saves a pass over n×M
    largest, predicted = pos_logits.max(dim=-1)  # the first of tied maxima, as argmax
    out["pred_class"][rows] = predicted.cpu().numpy()
    out["s_mcm"][rows] = mcm(cos_pos, config.mcm_temperature).cpu().numpy()
    out["s_energy"][rows] = energy(pos_logits).cpu().numpy()
    out["s_maxlogit"][rows] = largest.double().cpu().numpy()  # = max_logit(): the max is exact in any dtype
    maxes = _blocks(logits[:, : layout.kept], config.groups).amax(dim=-1)  # one pass, used twice
    values, columns = top_columns(logits, top.negatives.shape[1], layout.kept, config.groups, maxes)
    top.negatives[rows] = layout.layout[columns.cpu()].numpy()
    top.negative_logits[rows] = values.cpu().numpy()
    top.classes[rows] = torch.topk(pos_logits, top.classes.shape[1], dim=-1).indices.cpu().numpy()
    star = None
    if config.star_is_plain:
        pass
    elif config.neg_topk is not None:
        star_logits = logits if layout.star_columns is None else logits[:, layout.star_columns]
        star = neglabel_topk(pos_logits, star_logits, config.neg_topk)
    else:  # M2's columns, gathered (a copy) in their own group order
        star = neglabel_grouped(pos_logits, logits[:, layout.star_columns], config.groups, overwrite=True)
    plain = neglabel_grouped(pos_logits, logits[:, : layout.kept], config.groups, overwrite=True, maxes=maxes)
    out["s_neglabel_plain"][rows] = plain.cpu().numpy()
    out["s_neglabel_star"][rows] = (plain if star is None else star).cpu().numpy()
    if background_negatives is not None and inputs.background is not None:
        background = unit_rows(inputs.background, rows.start, rows.stop).to(buffer.device, non_blocking=True)
        aligned, pos, neg = p_align(background, classes[predicted], background_negatives, config.align_topk)
        out["p_align"][rows] = aligned.cpu().numpy()
        out["s_bg_pos"][rows] = pos.cpu().numpy()
        out["s_bg_neg"][rows] = neg.cpu().numpy()


def _multimatch_column(
    inputs: ScoreInputs,
    dim: int,
    top: _TopMatches,
    encode_pairs: Callable[[list[str]], torch.Tensor],
    device: torch.device | None = None,
) -> np.ndarray:
    """NegRefine's multi-matching score of every image; the distinct "p and n" texts of a chunk of
    images are encoded once (chunks keep the pair features' memory bounded)."""
    n_images, k_pos = top.classes.shape
    k_neg = top.negatives.shape[1]
    # pairs are positive-major (p0n0, p0n1, ...): pair (i, j) meets negative j
    pair_negative_logits = torch.from_numpy(np.tile(top.negative_logits, (1, k_pos)))
    device = device or torch.device("cpu")
    column = np.full(n_images, np.nan)
    rows = min(MULTIMATCH_CHUNK, chunk_rows(k_pos * k_neg * dim))
    for start in range(0, n_images, rows):
        stop = min(start + rows, n_images)
        pair_ids, pair_texts = distinct_pairs(
            top.classes[start:stop], top.negatives[start:stop], inputs.class_names, inputs.negative_names
        )
        features = encode_pairs(pair_texts).float().to(device)[torch.from_numpy(pair_ids).to(device)]
        column[start:stop] = (
            multimatch(
                unit_rows(inputs.images, start, stop).to(device),
                features,
                pair_negative_logits[start:stop].to(device),
            )
            .cpu()
            .numpy()
        )
    return column


def apply_invalid_cam_policy(columns: dict[str, np.ndarray], invalid: np.ndarray, policy: str) -> None:
    """P_align of the rows whose CAM is invalid, in place. ``fallback``: keep the value computed
    from the whole-image background; ``zero``: 0 (the published code's value, which rewards such rows
    since valid P_align is usually negative); ``exclude``: NaN, so S_final is undefined there. Under
    ``zero`` and ``exclude`` the rows' background similarities are undefined (NaN) as well."""
    if policy == "fallback" or not invalid.any():
        return
    if policy not in ("zero", "exclude"):
        raise ValueError(f"unknown invalid-CAM policy {policy!r}")
    columns["p_align"][invalid] = 0.0 if policy == "zero" else np.nan
    columns["s_bg_pos"][invalid] = np.nan
    columns["s_bg_neg"][invalid] = np.nan


def distinct_pairs(
    top_pos: np.ndarray, top_neg: np.ndarray, class_names: Sequence[str], negative_names: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """Pair ids per image ((n, k_pos·k_neg), positive-major as NegRefine lists them) into the list
    of distinct "p and n" texts."""
    n_neg = len(negative_names)
    codes = (top_pos[:, :, None] * n_neg + top_neg[:, None, :]).reshape(top_pos.shape[0], -1)
    unique, inverse = np.unique(codes, return_inverse=True)
    texts = [pair_text(class_names[c // n_neg], negative_names[c % n_neg]) for c in unique.tolist()]
    return inverse.reshape(codes.shape), texts
