"""The switches of the ``score`` stage (``ScoreConfig``), apart from the maths in ``compute/scores.py``
so that planning a score run (its cache key, its checks) imports no torch. Pure."""

from __future__ import annotations

from dataclasses import dataclass

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
