"""The score registry: every column of ``scores.parquet`` (its label, description, what it needs and
its version), and the "p and n" text of NegRefine's pairs. No torch: `evaluate`, `report` and the
`score` stage's cache key read it; the maths is ``compute/scores.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


def pair_text(positive: str, negative: str) -> str:
    return f"{positive} and {negative}"


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class ScoreColumn:
    """One column of ``scores.parquet``. Every table, plot and statistic derives from this list."""

    name: str  # the column
    label: str  # how tables and plots call it (a method's name when ``method``)
    description: str
    needs_cam: bool = False  # empty without `cam` outputs (background embeddings)
    needs_pairs: bool = False  # needs NegRefine's "p and n" texts (multi-matching)
    method: bool = False  # a row of `evaluate --compare`'s table
    reference: str = ""  # where the score was published
    version: int = 1  # bump when the column's formula changes: the `score` stage's cache key follows it
    grouped: bool = False  # depends on NegLabel's random grouping (`score --group-seed`)


SCORES: tuple[ScoreColumn, ...] = (
    ScoreColumn("s_mcm", "MCM", "max_k softmax(x·P/T)_k", method=True, reference="Ming et al., NeurIPS 2022"),
    ScoreColumn(
        "s_energy",
        "Energy",
        "logsumexp_k 100·x·P_k (T = 1 on CLIP's logits)",
        method=True,
        reference="Liu et al., NeurIPS 2020",
    ),
    ScoreColumn(
        "s_maxlogit",
        "MaxLogit",
        "max_k 100·x·P_k",
        method=True,
        reference="Hendrycks et al., ICML 2022",
    ),
    ScoreColumn(
        "s_neglabel_plain",
        "NegLabel",
        "mean over groups of the ID share of softmax([pos, neg_g])",
        method=True,
        grouped=True,
        reference="Jiang et al., ICLR 2024",
    ),
    ScoreColumn("s_multimatch", "multi-matching", "NegRefine's best 'p and n' pair", needs_pairs=True),
    ScoreColumn(
        "s_negrefine",
        "NegRefine",
        "S_NegLabel + 2·s_multimatch",
        needs_pairs=True,
        method=True,
        grouped=True,
        reference="Ansari et al., ICCV 2025",
    ),
    ScoreColumn(
        "s_neglabel_star",
        "NegLabel*",
        "NegLabel with M1 (top-k) and M2 (role-aware)",
        method=True,
        grouped=True,  # unless M1 (top-k) replaces the groups: ScoreConfig.seeded_columns
    ),
    ScoreColumn("s_bg_pos", "s_bg_pos", "b·P_ĉ", needs_cam=True),
    ScoreColumn("s_bg_neg", "s_bg_neg", "mean of the 5 largest b·N_bg", needs_cam=True),
    ScoreColumn("p_align", "P_align", "s_bg_pos − s_bg_neg", needs_cam=True),
)
SCORE_COLUMNS = tuple(column.name for column in SCORES)


def registry_key() -> list[tuple[str, int]]:
    """What the `score` stage's cache key holds of the registry: each column's name and version, in
    order. Adding, removing or re-versioning a column changes the key, so a stored score artifact
    made without it is never reused."""
    return [(column.name, column.version) for column in SCORES]


def method_columns() -> dict[str, str]:
    """Method label → column, in table order (NegAlign, S* + λ·P_align, is added by `evaluate`)."""
    return {column.label: column.name for column in SCORES if column.method}


def seed_column(name: str, seed: int) -> str:
    """The column of ``name`` scored with group seed ``seed`` in a file of ``score --group-seeds``."""
    return f"{name}@seed{seed}"


def cam_columns() -> tuple[str, ...]:
    """The columns that stay empty when there are no CAM outputs."""
    return tuple(column.name for column in SCORES if column.needs_cam)


def score_column(name: str) -> ScoreColumn | None:
    return next((column for column in SCORES if column.name == name), None)
