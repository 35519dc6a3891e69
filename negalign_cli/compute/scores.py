"""OOD scores on cached embeddings: MCM, NegLabel (grouped, top-k), NegRefine multi-matching,
P_align. Pure, vectorised, chunked over images. Higher score = more in-distribution.

Notation (docs/maths.md): x = L2-normalised image embedding, P = ID class features (K×D),
N = negative features (M×D); logits are 100·cos.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from negalign_cli.compute.native import ScorePasses
from negalign_cli.compute.native import load as native_passes
from negalign_cli.compute.score_columns import SCORE_COLUMNS, pair_text  # the registry, torch-free
from negalign_cli.compute.score_config import ScoreConfig as ScoreConfig  # torch-free: planning reads it

LOGIT_SCALE = 100.0
MEMORY_BUDGET_FLOATS = 1 << 25  # ~128 MiB of float32 per chunk of logits
PAIR_TABLE_FLOATS = 1 << 27  # ~512 MiB of float32: the pair table starts afresh beyond this
# Multi-matching's working sets: pairs encoded per call of the encoder, and the gathered pair
# features of a slice of images (16 MiB each at D = 512). Blocks this small are recycled by the
# allocator; larger ones are fresh pages every time, and first touching them cost more than the
# arithmetic (a CPU measurement).
PAIR_ENCODE_ROWS = 8192
PAIR_GATHER_FLOATS = 1 << 22


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
    return torch.sub(a.double(), b).sigmoid_()  # b in float32 is promoted exactly


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
    if maxes is None:
        maxes = _blocks(logits[:, :kept], groups).amax(dim=-1)
    best_blocks, candidates = column_candidates(logits, k, kept, groups, maxes)
    return rank_candidates(candidates, best_blocks, kept // groups, logits, kept)


def column_candidates(
    logits: torch.Tensor,
    k: int,
    kept: int,
    groups: int,
    maxes: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_columns`' candidates: the k blocks of largest maxima (n, k) and their columns
    (n, k·width), written into ``out`` (best blocks, candidates, an (n, k) float scratch) when
    given (``starts``: see :func:`copy_blocks`). The columns after ``kept`` are candidates too
    (:func:`rank_candidates` reads them)."""
    n, width = logits.shape[0], kept // groups
    if out is None:
        out = (
            torch.empty(n, k, dtype=torch.int64, device=logits.device),
            logits.new_empty(n, k * width),
            logits.new_empty(n, k),
        )
    best_blocks, candidates, scratch = out
    torch.topk(maxes, k, dim=-1, out=(scratch, best_blocks))
    copy_blocks(logits, best_blocks, width, candidates, starts)
    return best_blocks, candidates


def copy_blocks(
    rows: torch.Tensor,
    blocks: torch.Tensor,
    width: int,
    out: torch.Tensor,
    starts: torch.Tensor | None = None,
) -> None:
    """``out[i, j·width : (j+1)·width] = rows[i, b·width : (b+1)·width]`` for b = ``blocks[i, j]``:
    one ``index_select`` of whole blocks from a view in which every offset of ``rows``' storage
    starts a row of ``width`` (a memory copy per block; ``torch.gather`` indexes every element, ten
    times slower on a CPU). ``rows`` (n, M) has unit column stride; ``out`` is contiguous;
    ``starts``: the rows' offsets ``i · rows.stride(0)`` (n, 1), if the caller keeps them."""
    n, k = blocks.shape
    stride = rows.stride(0)
    windows = rows.as_strided(((n - 1) * stride + rows.shape[1] - width + 1, width), (1, 1))
    if starts is None:
        starts = torch.arange(0, n * stride, stride, device=rows.device).unsqueeze(1)
    offsets = torch.add(starts[:n], blocks, alpha=width)
    torch.index_select(windows, 0, offsets.view(-1), out=out.view(n * k, width))


def rank_candidates(
    candidates: torch.Tensor, best_blocks: torch.Tensor, width: int, logits: torch.Tensor, kept: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k (values, columns) among :func:`column_candidates`' candidates and the columns of
    ``logits`` after ``kept``; k = the blocks taken."""
    k = best_blocks.shape[1]
    if kept < logits.shape[1]:
        candidates = torch.cat([candidates, logits[:, kept:]], dim=1)
    values, order = torch.topk(candidates, k, dim=-1)
    # candidate j is column best_blocks[j // width]·width + j % width, or kept + j − k·width after them
    from_block = torch.gather(best_blocks, 1, (order // width).clamp_(max=k - 1)) * width + order % width
    return values, torch.where(order < k * width, from_block, order + (kept - k * width))


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


def neglabel_topk(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, k: int, pos_lse: torch.Tensor | None = None
) -> torch.Tensor:
    """NegLabel* M1: only the k largest negative logits of each image enter the softmax.
    ``pos_lse``: the classes' log-sum-exp (n,) if the caller has it (Energy, in float64)."""
    k = min(k, neg_logits.shape[-1])
    top = torch.topk(neg_logits, k, dim=-1).values
    lse = torch.logsumexp(pos_logits, dim=-1) if pos_lse is None else pos_lse
    return sigmoid_of_difference(lse, torch.logsumexp(top, dim=-1))


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
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P_align = b·P_{c_hat} − mean(top-k of b·N_bg); returns (p_align, s_bg_pos, s_bg_neg).
    ``out``: a buffer for b·N_bg (n × |N_bg|)."""
    s_bg_pos = (background * predicted_class_features).sum(dim=-1)
    k = min(k, background_negatives.shape[0])
    similarities = torch.matmul(background, background_negatives.T, out=out)
    s_bg_neg = torch.topk(similarities, k, dim=-1).values.mean(dim=-1)
    return s_bg_pos - s_bg_neg, s_bg_pos, s_bg_neg


# ----------------------------------------------------------------------------- all at once
Rows = torch.Tensor | np.ndarray  # numpy arrays may be memory-mapped: rows are read chunk by chunk


def unit_rows(array: Rows, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start:stop`` as L2-normalised float32 (reads only those rows of a memory map), into
    ``out`` (a CPU buffer of at least ``stop − start`` rows) when given."""
    block = array[start:stop]
    if isinstance(block, np.ndarray):
        rows = np.asarray(block, dtype=np.float32)
        tensor = torch.from_numpy(rows if rows.flags.writeable else rows.copy())  # a read-only memory map
    else:
        tensor = block.float()
    if out is None or tensor.device != out.device:
        return torch.nn.functional.normalize(tensor, dim=-1)
    return torch.nn.functional.normalize(tensor, dim=-1, out=out[: tensor.shape[0]])


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
    """One chunk's top classes and top negatives (with logits), on the scoring device: what
    multi-matching reads."""

    classes: torch.Tensor  # (n, k_pos) class indices
    negatives: torch.Tensor  # (n, k_neg) negative indices
    negative_logits: torch.Tensor  # (n, k_neg)


PairEncoder = Callable[[np.ndarray, np.ndarray], torch.Tensor]
"""Features (n, D) of the "p and n" texts of n pairs given as (class indices, negative indices)."""


class PairTable:
    """NegRefine's pair features in a table on the scoring device, addressed by pair id
    ``class · n_negatives + negative``: ``codes`` (sorted pair ids) and ``rows`` map an id to its row
    of ``features``. Looking a chunk's ids up is a ``searchsorted`` on the device; only ids never
    seen go to ``encode`` (once per chunk, batched), the one host round trip of a chunk. The table
    outlives a chunk (and a call, if the caller keeps it), so a pair is encoded once; beyond
    ``max_floats`` of features it starts afresh, keeping memory bounded."""

    def __init__(self, encode: PairEncoder, n_negatives: int, max_floats: int = PAIR_TABLE_FLOATS) -> None:
        self.encode = encode
        self.n_negatives = n_negatives
        self.max_floats = max_floats
        self.encoded = 0  # pairs sent to ``encode`` so far
        self.resets = 0  # times the table started afresh (memory bound)
        self._codes: torch.Tensor | None = None  # (U,) sorted pair ids
        self._rows: torch.Tensor | None = None  # (U,) their rows in _features
        self._features: torch.Tensor | None = None  # (capacity, D) float32, the first U rows filled

    def __len__(self) -> int:
        return 0 if self._codes is None else int(self._codes.shape[0])

    def pair_ids(self, classes: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """(n, k_pos·k_neg) pair ids, positive-major as NegRefine lists them (p0n0, p0n1, ...)."""
        ids = classes.unsqueeze(-1) * self.n_negatives + negatives.unsqueeze(-2)
        return ids.flatten(1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The table rows (``ids.shape``) of every pair id, encoding the ids never seen (at once:
        one host round trip); valid until the next call, read with :meth:`features`."""
        flat = ids.reshape(-1)
        with one_thread(flat.device):  # n·k² ids: small operations (the encoder keeps every thread)
            rows, found = self._find(flat)
            missing, unseen = self._unseen(flat, found)
        if unseen.size:
            if (
                self._features is not None
                and (len(self) + unseen.size) * self._features.shape[1] > self.max_floats
            ):
                self._codes = self._rows = self._features = None  # start afresh: the chunk's pairs alone
                self.resets += 1
                missing, unseen = self._unseen(flat, torch.zeros_like(found))
            self._add(missing, unseen)
            with one_thread(flat.device):
                rows, found = self._find(flat)
        assert rows is not None
        return rows.view(ids.shape)

    def features(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The features (``rows.shape`` × D, float32) of table rows from :meth:`rows`, gathered
        into ``out`` (a flat buffer of at least ``rows.numel()`` × D) when given."""
        assert self._features is not None
        if out is None:
            return self._features[rows]
        flat = out[: rows.numel()]
        torch.index_select(self._features, 0, rows.reshape(-1), out=flat)
        return flat.view(*rows.shape, -1)

    @staticmethod
    def _unseen(flat: torch.Tensor, found: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """The distinct ids not ``found`` (sorted), on the device and on the host: the one host
        round trip of a lookup (ids are ≥ 0, so −1 marks the found ones without a boolean mask)."""
        missing = torch.unique(torch.where(found, -1, flat))
        unseen = missing.cpu().numpy()
        if unseen.size and unseen[0] == -1:
            return missing[1:], unseen[1:]
        return missing, unseen

    def _find(self, flat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self._codes is None or self._rows is None:
            return None, torch.zeros_like(flat, dtype=torch.bool)
        at = torch.searchsorted(self._codes, flat).clamp_(max=self._codes.shape[0] - 1)
        return self._rows[at], self._codes[at] == flat

    def _add(self, missing: torch.Tensor, unseen: np.ndarray) -> None:
        used, count = len(self), int(unseen.size)
        for start in range(0, count, PAIR_ENCODE_ROWS):  # batches of the encoder, written in place
            part = unseen[start : start + PAIR_ENCODE_ROWS]
            features = self.encode(part // self.n_negatives, part % self.n_negatives)
            features = features.to(device=missing.device, dtype=torch.float32)
            if self._features is None or used + count > self._features.shape[0]:
                grown = torch.empty(max(2 * (used + count), 1024), features.shape[1], device=missing.device)
                if self._features is not None:
                    grown[:used] = self._features[:used]
                self._features = grown
            self._features[used + start : used + start + part.size] = features
        self.encoded += count
        new_rows = torch.arange(used, used + count, device=missing.device)
        if self._codes is None or self._rows is None:
            self._codes, self._rows = missing, new_rows
            return
        codes, order = torch.sort(torch.cat([self._codes, missing]))
        self._codes, self._rows = codes, torch.cat([self._rows, new_rows])[order]


def pairs_by_text(
    encode_texts: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    negative_names: Sequence[str],
) -> PairEncoder:
    """A :data:`PairEncoder` over a text encoder: the "p and n" texts are written only for the
    pairs a :class:`PairTable` has never seen."""

    def encode(classes: np.ndarray, negatives: np.ndarray) -> torch.Tensor:
        texts = [
            pair_text(class_names[c], negative_names[n])
            for c, n in zip(classes.tolist(), negatives.tolist(), strict=True)
        ]
        return encode_texts(texts)

    return encode


def compute_scores(
    inputs: ScoreInputs,
    config: ScoreConfig,
    encode_pairs: Callable[[list[str]], torch.Tensor] | PairTable | None = None,
    on_chunk: Callable[[int], None] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """Every score column of the registry for every image, in chunks of images (no N×M matrix is
    ever whole; one matmul per chunk gives all negative logits, see :class:`NegativeLayout`).

    ``encode_pairs`` gives NegRefine's "p and n" features: a text encoder (noun templates), whose
    texts are written only for pairs never seen before in this call, or a :class:`PairTable` (kept
    by the caller, addressed by class and negative index). Each distinct pair is encoded once.
    Without it the multi-matching columns are NaN; without background embeddings the P_align
    columns are NaN. With ``device`` (e.g. a GPU) each chunk is scored there and only its
    per-image results come back.
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
    table = encode_pairs
    if encode_pairs is not None and not isinstance(encode_pairs, PairTable):
        names = pairs_by_text(encode_pairs, inputs.class_names, inputs.negative_names)
        table = PairTable(names, negatives.shape[0])
    out: dict[str, np.ndarray] = {name: np.full(n_images, np.nan) for name in SCORE_COLUMNS}
    out["pred_class"] = np.empty(n_images, dtype=np.int64)
    matched = torch.full((n_images,), float("nan"), dtype=torch.float64, device=device)
    step = min(chunk_rows(negatives.shape[0] + classes.shape[0]), max(1, n_images))
    work = _Workspace.allocate(step, classes, layout, config, background_negatives, (k_pos, k_neg))
    columns_to_negatives = layout.layout.to(device)
    for start in range(0, n_images, step):
        rows = slice(start, min(start + step, n_images))
        x, top = _score_chunk(
            inputs, config, classes, layout, background_negatives, rows, out, (k_pos, k_neg), work
        )
        if isinstance(table, PairTable):
            negative_ids = columns_to_negatives[top.negatives]
            _multimatch_chunk(x, top, negative_ids, table, matched[rows], classes.shape[1], work)
        if on_chunk is not None:
            on_chunk(rows.stop - rows.start)
    if table is not None:
        out["s_multimatch"] = matched.cpu().numpy()
    if background_negatives is not None and inputs.background_valid is not None:
        apply_invalid_cam_policy(out, ~inputs.background_valid.cpu().numpy(), config.invalid_cam)
    out["s_negrefine"] = out["s_neglabel_plain"] + config.multimatch_weight * out["s_multimatch"]
    return out


# The passes after a chunk's matmuls run on blocks of its rows small enough to stay in cache while
# every pass reads them (``BLOCK_FLOATS`` floats of a block's negative logits, exp and class
# terms): the logits are read from memory once, and their exp goes to a block-sized buffer, never
# written back. Over whole chunks each pass went to memory (about 120 MB per chunk at 10,000
# negatives) and the exp wrote it back. On a GPU a chunk is one block (launches, not caches, cost).
BLOCK_FLOATS = 1 << 20


def block_rows(floats_per_row: int, device: torch.device, rows: int, budget: int | None = None) -> int:
    """Rows per block of the passes after a chunk's matmuls (``budget`` floats, by default
    ``BLOCK_FLOATS``); a chunk's ``rows`` on a GPU."""
    if device.type != "cpu":
        return max(1, rows)
    budget = BLOCK_FLOATS if budget is None else budget
    return max(1, min(rows, budget // max(1, floats_per_row)))


@dataclass
class _Workspace:
    """The buffers every chunk reuses: large fresh blocks are fresh pages every time, and touching
    them first cost more than the arithmetic on them (a CPU measurement). Per-row results span a
    chunk (``step`` rows); scratch space spans a block (``block`` rows, see ``block_rows``)."""

    x: torch.Tensor  # (step, D) unit image rows
    scaled: torch.Tensor  # (step, D) 100·x
    classes: torch.Tensor  # (step, 2, K) float32: cosines x·P, logits 100·cos
    class_maxima: torch.Tensor  # (step, 2, 1) float32: each row's largest cosine and logit
    classes64: torch.Tensor  # (block, 2, K) float64: MCM's and Energy's exp, one pass for both
    class_sums: torch.Tensor  # (step, 2) float64: their sums
    scales: torch.Tensor  # (2, 1) float64: their factors before exp2 (``exp2_scales``)
    largest: torch.Tensor  # (step,) float32: the largest class logit (MaxLogit)
    predicted: torch.Tensor  # (step,) int64: its class, the first of tied maxima
    top_classes: tuple[torch.Tensor, torch.Tensor]  # (step, k_pos) the top classes' logits, indices
    negatives: torch.Tensor  # (step, M) negative logits (they stay: top-k and M1 read them)
    exps: torch.Tensor  # (block, M) a block's exp of them
    maxes: torch.Tensor  # (step, G) block maxima of the grouped columns
    sums: torch.Tensor  # (step, G) block sums of exp
    candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # the top-k negatives' candidates
    starts: torch.Tensor  # (block, 1) the offsets of a block's rows of negative logits
    star_columns: torch.Tensor | None  # M2's columns, on the device
    star: torch.Tensor | None  # (block, |M2 columns|) their exp, gathered
    star_sums: torch.Tensor | None  # (step, G)
    background: torch.Tensor | None  # (step, D) unit background rows
    background_logits: torch.Tensor | None  # (step, |N_bg|) b·N_bg
    block: int  # rows per block
    gathered: torch.Tensor | None = None  # multi-matching's pair features of a slice of images
    native: ScorePasses | None = None  # the fused C passes (CPU), which replace the block passes
    top_negatives: tuple[torch.Tensor, torch.Tensor] | None = None  # (step, k) their top-k negatives

    @classmethod
    def allocate(
        cls,
        step: int,
        classes: torch.Tensor,
        layout: NegativeLayout,
        config: ScoreConfig,
        background_negatives: torch.Tensor | None,
        top_k: tuple[int, int] = (1, 1),
    ) -> _Workspace:
        device, (n_classes, dim) = classes.device, classes.shape
        grouped_star = layout.star_columns is not None and config.neg_topk is None
        n_negatives = layout.weights.shape[1]
        # per row of a block: the negative logits and their exp, 2K float32 and 2K float64 class terms
        block = block_rows(2 * n_negatives + 6 * n_classes, device, step)
        k_neg = top_k[1]
        width = layout.kept // config.groups

        def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        star_columns = layout.star_columns.to(device) if layout.star_columns is not None else None
        native = native_passes() if device.type == "cpu" and top_k[0] >= 1 else None
        return cls(
            native=native,
            top_negatives=None
            if native is None or k_neg < 1
            else (empty(step, k_neg), empty(step, k_neg, dtype=torch.int64)),
            x=empty(step, dim),
            scaled=empty(step, dim),
            classes=empty(step, 2, n_classes),
            class_maxima=empty(step, 2, 1),
            classes64=empty(block, 2, n_classes, dtype=torch.float64),
            class_sums=empty(step, 2, dtype=torch.float64),
            scales=exp2_scales(config.mcm_temperature, device),
            largest=empty(step),
            predicted=empty(step, dtype=torch.int64),
            top_classes=(empty(step, top_k[0]), empty(step, top_k[0], dtype=torch.int64)),
            negatives=empty(step, n_negatives),
            exps=empty(block, n_negatives),
            maxes=empty(step, config.groups),
            sums=empty(step, config.groups),
            candidates=None
            if native is not None or config.groups <= k_neg or layout.kept == 0
            else (
                empty(step, k_neg, dtype=torch.int64),
                empty(step, k_neg * width),
                empty(block, k_neg),
            ),
            starts=torch.arange(0, block * n_negatives, n_negatives, device=device).unsqueeze(1),
            star_columns=star_columns,
            star=empty(block, star_columns.shape[0]) if grouped_star and star_columns is not None else None,
            star_sums=empty(step, config.groups) if grouped_star else None,
            background=None if background_negatives is None else empty(step, dim),
            background_logits=None
            if background_negatives is None
            else empty(step, background_negatives.shape[0]),
            block=block,
        )


# A block's log Σ exp(logit) is taken without subtracting the block's maximum (one pass fewer over
# the n×M logits) where that is as exact: the sum is finite (no term or sum overflowed) and at least
# e^-60, so its largest term is ≥ e^-60 / width and terms lost to underflow (< e^-87) weigh less
# than 1e-8 of the sum. Other rows take the shifted log-sum-exp (torch.logsumexp's operations).
EXP_SUM_MIN = math.exp(-60.0)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def log_of_block_sums(sums: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """log of each block's Σ exp(logit), in place on ``sums`` (n, G); the rows where a sum left the
    safe range (see ``EXP_SUM_MIN``; NaN included) are replaced by ``exact(rows)`` (their
    log-sum-exps with the maximum subtracted)."""
    # one pass and one host sync for the common case: every row safe
    low, high = torch.stack(torch.aminmax(sums)).tolist()
    if low >= EXP_SUM_MIN and high <= FLOAT32_MAX:
        return sums.log_()
    safe = ((sums >= EXP_SUM_MIN) & (sums <= FLOAT32_MAX)).all(dim=-1)
    lse = sums.log_()
    rows = (~safe).nonzero().squeeze(1)
    lse[rows] = exact(rows).to(lse.dtype)
    return lse


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """CPU operations on per-image or per-group results (n × G and smaller) on one thread: each
    parallel operation is a rendezvous of every thread, and on a busy machine waiting for a
    descheduled thread costs more than such an operation (a measurement: the mean time of a log
    over 3,000 × 100 values was 4× lower on one of 2 threads, at a load of 9 on 2 cores). Matmuls
    and the passes over n×K and n×M keep every thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


LOG2_E = 1.0 / math.log(2.0)


def mcm_and_energy_sums(
    cosines_and_logits: torch.Tensor,
    scratch: torch.Tensor,
    maxima: torch.Tensor,
    sums: torch.Tensor,
    temperature: float = 1.0,
    scales: torch.Tensor | None = None,
) -> None:
    """MCM's and Energy's float64 sums of exp for (n, 2, K) [cosines, logits], with one conversion,
    one subtraction, one multiplication, one exp and one sum for both: ``maxima`` (n, 2, 1) gets
    each row's largest cosine and logit, ``sums`` (n, 2) Σ_k exp((c_k − max c) / T) and
    Σ_k exp(l_k − max l); ``scratch`` is (n, 2, K) float64. exp(d) is taken as 2^(d·log₂e): torch's
    exp2 is several times faster than its exp, and in float64 the product's rounding moves a term
    by ~1e-16 of itself."""
    torch.amax(cosines_and_logits, dim=-1, keepdim=True, out=maxima)
    both = scratch.copy_(cosines_and_logits).sub_(maxima)  # exact: as in float64 throughout
    scales = exp2_scales(temperature, scratch.device) if scales is None else scales
    torch.sum(both.mul_(scales).exp2_(), dim=-1, out=sums)


def exp2_scales(temperature: float, device: torch.device | None = None) -> torch.Tensor:
    """(2, 1) float64 [log₂e / T, log₂e]: the factors of the cosine and the logit terms before exp2."""
    return torch.tensor([[LOG2_E / temperature], [LOG2_E]], dtype=torch.float64, device=device)


def mcm_and_energy(
    cosines_and_logits: torch.Tensor, scratch: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """MCM and Energy of (n, 2, K) [cosines, logits] in float64 (:func:`mcm_and_energy_sums`):
    max_k softmax(c / T)_k = 1 / Σ_k exp((c_k − max c) / T) and LSE(l) = max l + log Σ exp(l_k − max l),
    :func:`mcm` and :func:`energy` up to the order of the float64 sums and ~1e-16 per term."""
    n = cosines_and_logits.shape[0]
    maxima = cosines_and_logits.new_empty(n, 2, 1)
    sums = scratch.new_empty(n, 2)
    mcm_and_energy_sums(cosines_and_logits, scratch, maxima, sums, temperature)
    return sums[:, 0].reciprocal(), sums[:, 1].log().add_(maxima[:, 1, 0])


def _score_chunk(
    inputs: ScoreInputs,
    config: ScoreConfig,
    classes: torch.Tensor,
    layout: NegativeLayout,
    background_negatives: torch.Tensor | None,
    rows: slice,
    out: dict[str, np.ndarray],
    top_k: tuple[int, int],
    work: _Workspace,
) -> tuple[torch.Tensor, _TopMatches]:
    """The scores of one chunk of images, written into ``out`` at ``rows``; returns the chunk's
    unit embeddings and its top ``top_k`` (classes, negatives) for multi-matching, on the device
    (negatives as columns of the layout). Two matmuls (classes, negatives) into ``work``'s buffers,
    then every pass over their results block by block (:func:`_block_passes`), one exp of the
    negative logits giving every grouped log-sum-exp (plain and M2)."""
    n = rows.stop - rows.start
    device = work.negatives.device
    with one_thread(device):  # n × D: too small for a rendezvous of both threads to pay
        x = unit_rows(inputs.images, rows.start, rows.stop, work.x).to(device, non_blocking=True)
        scaled = torch.mul(
            x, LOGIT_SCALE, out=work.scaled[:n]
        )  # scaling the rows first saves a pass over n×M
    pair = work.classes[:n]
    torch.matmul(x, classes.T, out=pair[:, 0])
    logits = work.negatives[:n]
    torch.matmul(scaled, layout.weights, out=logits)
    grouped_star = config.neg_topk is None and work.star is not None
    # the C passes where they load (compute/native.py: every pass in one loop per row, the rows on
    # torch's OpenMP threads); else the torch passes block by block, on one thread: each pass over
    # a block takes tens of microseconds, and a parallel operator that
    # short is mostly the rendezvous of both threads, which on a busy machine waits for a
    # descheduled thread (measured on 2 loaded cores: a chunk's block passes took 55 ms on 2 threads
    # when both ran, 0.8–4 s when the machine was loaded, and 60 ms on 1 thread either way)
    if work.native is not None:
        _native_passes(work, work.native, pair, logits, layout.kept, config, grouped_star)
    else:
        with one_thread(device):
            for start in range(0, n, work.block):
                part = slice(start, min(start + work.block, n))
                _block_passes(work, pair, logits, part, layout.kept, config, grouped_star)
    pos_logits = pair[:, 1]
    predicted = work.predicted[:n]
    out["pred_class"][rows] = predicted.cpu().numpy()
    sums64 = work.class_sums[:n]
    s_mcm = sums64[:, 0].reciprocal()  # max_k softmax(c / T)_k = 1 / Σ_k exp((c_k − max c) / T)
    pos_lse = sums64[:, 1].log().add_(work.class_maxima[:n, 1, 0])  # max l + log Σ exp(l − max l)
    out["s_mcm"][rows] = s_mcm.cpu().numpy()
    out["s_energy"][rows] = pos_lse.cpu().numpy()  # Energy is the classes' log-sum-exp NegLabel needs
    out["s_maxlogit"][rows] = work.largest[:n].double().cpu().numpy()  # the max is exact in any dtype
    with one_thread(device):
        if work.top_negatives is not None:
            values, columns = work.top_negatives[0][:n], work.top_negatives[1][:n]
        elif work.candidates is None:
            values, columns = top_columns(logits, top_k[1], layout.kept, config.groups, work.maxes[:n])
        else:
            best, candidates, _ = work.candidates
            values, columns = rank_candidates(
                candidates[:n], best[:n], layout.kept // config.groups, logits, layout.kept
            )
    top = _TopMatches(work.top_classes[1][:n], columns, values)
    star = None
    if config.neg_topk is not None and not config.star_is_plain:  # M1 reads the logits themselves
        star_logits = logits if layout.star_columns is None else logits[:, layout.star_columns]
        star = neglabel_topk(pos_logits, star_logits, config.neg_topk, pos_lse)

    def exact(columns: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        def recompute(bad: torch.Tensor) -> torch.Tensor:  # rows outside exp's safe range (rare)
            grouped = logits[bad][:, : layout.kept] if columns is None else logits[bad][:, columns]
            return group_logsumexp(grouped, config.groups)

        return recompute

    sums = work.sums[:n]
    star_sums = work.star_sums[:n] if grouped_star and work.star_sums is not None else None
    classes_lse = pos_lse.unsqueeze(-1)
    with one_thread(device):
        plain = sigmoid_of_difference(classes_lse, log_of_block_sums(sums, exact(None))).mean(dim=-1)
        if star_sums is not None:
            star_lse = log_of_block_sums(star_sums, exact(work.star_columns))
            star = sigmoid_of_difference(classes_lse, star_lse).mean(dim=-1)
    out["s_neglabel_plain"][rows] = plain.cpu().numpy()
    out["s_neglabel_star"][rows] = (plain if star is None else star).cpu().numpy()
    if background_negatives is not None and inputs.background is not None:
        background = unit_rows(inputs.background, rows.start, rows.stop, work.background)
        background = background.to(device, non_blocking=True)
        bg_out = None if work.background_logits is None else work.background_logits[:n]
        aligned, s_pos, s_neg = p_align(
            background, classes[predicted], background_negatives, config.align_topk, bg_out
        )
        out["p_align"][rows] = aligned.cpu().numpy()
        out["s_bg_pos"][rows] = s_pos.cpu().numpy()
        out["s_bg_neg"][rows] = s_neg.cpu().numpy()
    return x, top


def _native_passes(
    work: _Workspace,
    native: ScorePasses,
    pair: torch.Tensor,
    logits: torch.Tensor,
    kept: int,
    config: ScoreConfig,
    grouped_star: bool,
) -> None:
    """:func:`_block_passes`' results from the fused C passes (``compute/native.py``), each row
    read once, the rows split over the CPU threads: the class logits, MCM's and Energy's float64
    sums, the top classes (MaxLogit and ``pred_class``: the first of them, the smallest class of
    the tied largest), the negative logits' group maxima and sums of exp (M2's too) and the top-k
    negatives."""
    n = pair.shape[0]
    native.class_pass(
        pair,
        LOGIT_SCALE,
        (LOG2_E / config.mcm_temperature, LOG2_E),
        work.class_maxima[:n].view(n, 2),
        work.class_sums[:n],
        (work.top_classes[0][:n], work.top_classes[1][:n]),
    )
    star = None
    if grouped_star and work.star_columns is not None and work.star_sums is not None:
        star = (work.star_columns, work.star_sums[:n])
    top = None
    if work.top_negatives is not None:
        top = (work.top_negatives[0][:n], work.top_negatives[1][:n])
    native.negative_pass(logits, kept, config.groups, LOG2_E, work.maxes[:n], work.sums[:n], star, top)
    work.largest[:n].copy_(work.top_classes[0][:n, 0])
    work.predicted[:n].copy_(work.top_classes[1][:n, 0])


def _block_passes(
    work: _Workspace,
    pair: torch.Tensor,
    logits: torch.Tensor,
    rows: slice,
    kept: int,
    config: ScoreConfig,
    grouped_star: bool,
) -> None:
    """Everything that reads a chunk's matmul results, on the block ``rows`` of them (in cache
    while these run; see ``BLOCK_FLOATS``), into ``work``'s per-row buffers: the class logits
    100·cos beside the cosines, MCM's and Energy's sums of exp (:func:`mcm_and_energy_sums`), the
    largest class logit and its class, the top classes, the negative logits' block maxima and the
    top-k negatives' candidates, their exp into a block buffer (the logits stay), its block sums and
    M2's."""
    n = rows.stop - rows.start
    block_pair = pair[rows]
    torch.mul(block_pair[:, 0], LOGIT_SCALE, out=block_pair[:, 1])
    mcm_and_energy_sums(
        block_pair,
        work.classes64[:n],
        work.class_maxima[rows],
        work.class_sums[rows],
        config.mcm_temperature,
        work.scales,
    )
    pos_logits = block_pair[:, 1]
    values, indices = work.top_classes
    top, columns = values[rows], indices[rows]
    torch.topk(pos_logits, values.shape[1], dim=-1, out=(top, columns))
    # MaxLogit and pred_class (the first of tied maxima) from the top classes: every class tied
    # with the largest logit is among them unless the last is tied too (or NaN); those blocks, and
    # every block on a GPU (no host sync there), take torch.max
    if pos_logits.device.type == "cpu" and bool((top[:, -1] < top[:, 0]).all()):
        work.largest[rows] = top[:, 0]
        torch.amin(
            torch.where(top == top[:, :1], columns, pos_logits.shape[1]), dim=-1, out=work.predicted[rows]
        )
    else:
        torch.max(pos_logits, dim=-1, out=(work.largest[rows], work.predicted[rows]))
    block = logits[rows]
    maxes = torch.amax(_blocks(block[:, :kept], config.groups), dim=-1, out=work.maxes[rows])
    if work.candidates is not None:
        best, candidates, scratch = work.candidates
        k = best.shape[1]
        column_candidates(
            block, k, kept, config.groups, maxes, (best[rows], candidates[rows], scratch[:n]), work.starts
        )
    # exp(l) as 2^(l·log₂e): several times faster; rounding the float32 product (and log₂e) moves a
    # term by at most ~7e-6 of itself at |l| = 100, ~2e-6 at 20–40 (docs/maths.md)
    exps = torch.mul(block, LOG2_E, out=work.exps[:n]).exp2_()
    torch.sum(_blocks(exps[:, :kept], config.groups), dim=-1, out=work.sums[rows])
    if grouped_star and work.star is not None and work.star_sums is not None:
        assert work.star_columns is not None
        gathered = torch.index_select(exps, 1, work.star_columns, out=work.star[:n])  # in M2's group order
        torch.sum(_blocks(gathered, config.groups), dim=-1, out=work.star_sums[rows])


def _multimatch_chunk(
    x: torch.Tensor,
    top: _TopMatches,
    negative_ids: torch.Tensor,
    table: PairTable,
    out: torch.Tensor,
    dim: int,
    work: _Workspace,
) -> None:
    """NegRefine's multi-matching score of one chunk's images into ``out`` (on the device): the
    pair features come from ``table`` by index, gathered per image in slices that keep them within
    the memory budget."""
    k_pos, k_neg = top.classes.shape[1], top.negatives.shape[1]
    ids = table.pair_ids(top.classes, negative_ids)  # (n, k_pos·k_neg), positive-major
    # pair (i, j) meets negative j
    pair_negative_logits = top.negative_logits.repeat(1, k_pos)
    rows = table.rows(ids)
    step = chunk_rows(k_pos * k_neg * dim, min(MEMORY_BUDGET_FLOATS, PAIR_GATHER_FLOATS))
    size = min(step, x.shape[0]) * k_pos * k_neg
    if work.gathered is None or work.gathered.shape[0] < size:  # one buffer per call, reused
        work.gathered = torch.empty(size, dim, device=x.device)
    gathered = work.gathered
    for start in range(0, x.shape[0], step):
        part = slice(start, start + step)
        out[part] = multimatch(x[part], table.features(rows[part], gathered), pair_negative_logits[part])


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
