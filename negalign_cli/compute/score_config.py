"""The switches of the ``score`` stage (``ScoreConfig``), apart from the maths in ``compute/scores.py``
so that planning a score run (its cache key, its checks) imports no torch. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from negalign_cli.compute.score_columns import SCORES
from negalign_cli.defaults import DEFAULT_INVALID_CAM


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

    def seeded_columns(self) -> tuple[str, ...]:
        """The score columns whose values depend on ``group_seed``: the grouped ones of the
        registry, NegLabel* only while it is grouped (M1's top-k takes no groups), and none with
        one group (every seed gives the same single group)."""
        if self.groups == 1:
            return ()
        return tuple(
            column.name
            for column in SCORES
            if column.grouped and not (column.name == "s_neglabel_star" and self.neg_topk is not None)
        )
