"""``scores.parquet``'s own metadata (the model fingerprint, the score configuration, the inputs),
written by the ``score`` stage and read by ``evaluate`` and ``report``. No torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # written by `score`; `evaluate` reads the metadata without pandas
    import pandas as pd

METADATA_KEY = b"negalign"


def write_scores(frame: pd.DataFrame, path: Path, metadata: dict) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    merged = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()}
    pq.write_table(table.replace_schema_metadata(merged), path)


def read_score_metadata(path: Path) -> dict:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return {}
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else {}
