"""What the ``embed images`` and ``cam`` stages write per image list, without torch: the stage names
and versions, an image list with its digests (:class:`Listing`), the row order of distinct contents,
``images.parquet`` and the files holding one row per distinct image. ``stages/images.py`` computes
the rows; ``negalign merge`` (``stages/shards.py``) assembles shards' rows with this module alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from negalign_cli.hashing import printable_paths, sha256_json
from negalign_cli.inputs.listing import ImageList
from negalign_cli.stages import files

if TYPE_CHECKING:
    import pandas as pd

EMBED_IMAGES_STAGE, EMBED_IMAGES_VERSION = "embed-images", 2  # 2: counts duplicate paths
CAM_STAGE, CAM_VERSION = "cam", 2  # 2: exact foreground percentile, whole-image fallback background


@dataclass
class Listing:
    """An image list with content digests: what the artifact key and the cache lookups use."""

    images: ImageList
    digests: list[str | None]
    reasons: list[str]

    @property
    def key(self) -> str:
        return sha256_json(
            [self.images.paths, self.images.labels, self.images.extra, self.digests, self.reasons]
        )

    def unique_valid(self) -> dict[str, int]:
        """digest -> index of the first image with that content."""
        first: dict[str, int] = {}
        for index, digest in enumerate(self.digests):
            if digest is not None and digest not in first:
                first[digest] = index
        return first


def image_table(listing: Listing, found: dict[str, int], failures: dict[str, str]) -> pd.DataFrame:
    import pandas as pd  # here: a cache hit writes no table and needs no pandas

    rows, status, reasons = [], [], []
    for digest, reason in zip(listing.digests, listing.reasons, strict=True):
        if digest is not None and digest in found:
            rows.append(found[digest])
            status.append("ok")
            reasons.append("")
        else:
            rows.append(-1)
            status.append("skipped")
            reasons.append(reason or failures.get(digest or "", "not processed"))
    frame = pd.DataFrame(
        {
            "row": np.array(rows, dtype=np.int64),
            "path": printable_paths(listing.images.paths),
            "label": listing.images.labels,
            "digest": [d or "" for d in listing.digests],
            "status": status,
            "reason": reasons,
        }
    )
    for name, values in listing.images.extra.items():
        frame[name] = values
    return frame


def row_order(listing: Listing, ok: set[str]) -> dict[str, int]:
    """Embedding row of each distinct, successfully processed digest, in list order."""
    rows: dict[str, int] = {}
    for digest in listing.digests:
        if digest is not None and digest in ok and digest not in rows:
            rows[digest] = len(rows)
    return rows


# The files of each image stage that hold one row per distinct image, in row order (what
# `negalign merge` assembles from shards); ``images.parquet`` is rebuilt from the image list.
ROW_FILES: dict[str, tuple[str, ...]] = {
    EMBED_IMAGES_STAGE: (files.IMAGE_EMBEDDINGS,),
    CAM_STAGE: (
        files.IMAGE_EMBEDDINGS,
        files.BACKGROUND_EMBEDDINGS,
        files.CAMS,
        files.FOREGROUND,
        files.CAM_TABLE,
    ),
}
