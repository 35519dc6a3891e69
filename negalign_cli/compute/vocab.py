"""Negative vocabulary: NegLabel/CSP mining and the NegAlign object/background word split. Pure."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from negalign_cli.defaults import ROLE_AMBIGUOUS as ROLE_AMBIGUOUS
from negalign_cli.defaults import ROLE_BACKGROUND as ROLE_BACKGROUND
from negalign_cli.defaults import ROLE_OBJECT as ROLE_OBJECT
from negalign_cli.defaults import ROLES as ROLES

if TYPE_CHECKING:
    import torch

# torch is imported by the two functions on tensors (mining), not here: thresholding r-scores
# (`assign_roles`, what `split-vocab` computes when only --tau changed) and the r-scores themselves
# are numpy, so a process that only re-splits never imports torch.


# ----------------------------------------------------------------------------- mining
@dataclass(frozen=True)
class Candidates:
    """Mining candidates in lexicon order: nouns, and adjectives turned into CSP phrases."""

    nouns: list[str]
    noun_sources: list[str]
    phrases: list[str]
    adjectives: list[str]
    adjective_sources: list[str]
    dropped_as_class: int
    duplicates: int


def build_candidates(
    lexicon: Mapping[str, Sequence[str]],
    class_names: Sequence[str],
    exclude: Sequence[str],
    suffixes: Sequence[str],
    seed: int,
) -> Candidates:
    """NegLabel/CSP candidate lists, as NegRefine's ``create_initial_negative_labels`` builds them.

    Files are read in sorted name order (NegRefine reads them in ``os.listdir`` order, which
    depends on the file system), excluded files skipped. One set de-duplicates across all files
    (the first occurrence wins, nouns and adjectives alike); a noun equal to an ID class name is
    dropped; each adjective becomes ``random.choice(suffixes).format(adjective)`` with Python's
    ``random`` seeded once with ``seed``, drawn in reading order.
    """
    rng = random.Random(seed)
    classes = set(class_names)
    excluded = set(exclude)
    seen: set[str] = set()
    nouns, noun_sources, phrases, adjectives, adjective_sources = [], [], [], [], []
    dropped = duplicates = 0
    for name in sorted(lexicon):
        kind = name.split(".")[0]
        if name in excluded or kind not in ("noun", "adj"):
            continue
        for word in lexicon[name]:
            if word in seen:
                duplicates += 1
                continue
            seen.add(word)
            if kind == "noun":
                if word in classes:
                    dropped += 1
                    continue
                nouns.append(word)
                noun_sources.append(name)
            else:
                phrases.append(rng.choice(list(suffixes)).format(word))
                adjectives.append(word)
                adjective_sources.append(name)
    return Candidates(nouns, noun_sources, phrases, adjectives, adjective_sources, dropped, duplicates)


def class_similarity(
    word_features: torch.Tensor,
    class_features: torch.Tensor,
    quantile: float = 1.0,
    saturate_above: float = 0.95,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per word: the ``quantile`` of its cosines to the ID classes; 1.0 where the max cosine
    exceeds ``saturate_above`` (NegLabel's rule for near-synonyms of a class). Chunked."""
    import torch

    from negalign_cli.compute.quantile import quantile as exact_quantile

    out = []
    for start in range(0, word_features.shape[0], chunk_size):
        cos = word_features[start : start + chunk_size].float() @ class_features.float().T
        similarity = exact_quantile(cos, quantile, dim=-1)
        similarity[cos.max(dim=-1).values > saturate_above] = 1.0
        out.append(similarity)
    if not out:
        return torch.zeros(0)
    return torch.cat(out)


def least_similar(similarity: torch.Tensor, top_p: float) -> torch.Tensor:
    """Indices of the ``floor(top_p · n)`` least similar words, least similar first (stable)."""
    import torch

    keep = int(similarity.shape[0] * top_p)
    return torch.argsort(similarity, stable=True)[:keep]


# ----------------------------------------------------------------------------- split
def role_scores(
    bare: np.ndarray, object_features: np.ndarray, background_features: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """r(w) = cos(e, E_obj) − cos(e, E_bg), with the two affinities; rows are words."""

    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64)
        b = b.astype(np.float64)
        dots: np.ndarray = np.einsum("nd,nd->n", a, b)
        norms: np.ndarray = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines: np.ndarray = dots / norms
        return cosines

    object_affinity = cosine(bare, object_features)
    background_affinity = cosine(bare, background_features)
    return object_affinity - background_affinity, object_affinity, background_affinity


def assign_roles(r_score: np.ndarray, tau: float) -> np.ndarray:
    """obj if r ≥ tau, bg if r ≤ −tau, else ambiguous (tau ≥ 0)."""
    if tau < 0:
        raise ValueError("tau must be non-negative")
    roles = np.full(r_score.shape, ROLE_AMBIGUOUS, dtype=object)
    roles[r_score <= -tau] = ROLE_BACKGROUND
    roles[r_score >= tau] = ROLE_OBJECT
    return roles
