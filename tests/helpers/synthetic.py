"""Synthetic `embed images` / `cam` output folders, for score and evaluate tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_image_set(
    folder: Path,
    n: int,
    dim: int,
    seed: int,
    shift: np.ndarray | None = None,
    cam: bool = True,
    skipped: int = 1,
) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = rng.normal(size=(n, dim))
    if shift is not None:
        vectors = vectors + shift
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(folder / "image_embeddings.npy", vectors.astype(np.float16))
    rows = list(range(n)) + [-1] * skipped
    pd.DataFrame(
        {
            "row": rows,
            "path": [f"img_{i}.png" for i in range(n + skipped)],
            "label": ["a"] * (n + skipped),
            "digest": [f"{i:064x}" for i in range(n + skipped)],
            "status": ["ok"] * n + ["skipped"] * skipped,
            "reason": [""] * n + ["corrupt"] * skipped,
        }
    ).to_parquet(folder / "images.parquet", index=False)
    if cam:
        background = rng.normal(size=(n, dim))
        background /= np.linalg.norm(background, axis=1, keepdims=True)
        np.save(folder / "background_embeddings.npy", background.astype(np.float16))
        valid = np.ones(n, dtype=bool)
        valid[::7] = False
        pd.DataFrame(
            {
                "pred_class": np.zeros(n, dtype=int),
                "pred_score": np.zeros(n),
                "cam_valid": valid,
                "fg_fraction": np.full(n, 0.2),
            }
        ).to_parquet(folder / "cam.parquet", index=False)
    write_manifest(folder)
    return folder


def write_manifest(folder: Path, model: str | None = None) -> None:
    """A manifest.json listing every file's size and digest, as an `--out` export has."""
    import json

    from negalign_cli.hashing import sha256_file

    outputs = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {"key": "synthetic", "stage": "embed-images", "outputs": outputs, "inputs": {"model": model}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def score_frame(n: int, seed: int, shift: float, invalid: float = 0.1) -> pd.DataFrame:
    """Every score column of scores.parquet for ``n`` images: random, separable by ``shift``; about
    ``invalid`` of the rows without a valid CAM."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "s_mcm": rng.uniform(0, 1, n) + shift * 0.1,
            "s_energy": rng.normal(30 + 5 * shift, 2, n),
            "s_maxlogit": rng.normal(28 + 5 * shift, 2, n),
            "s_neglabel_plain": rng.normal(0.5 + shift, 0.2, n),
            "s_neglabel_star": rng.normal(0.5 + shift, 0.2, n),
            "s_multimatch": rng.uniform(0, 1, n),
            "p_align": rng.normal(shift, 0.1, n),
            "cam_valid": rng.uniform(size=n) > invalid,
        }
    )
    frame["s_negrefine"] = frame["s_neglabel_plain"] + 2 * frame["s_multimatch"]
    return frame


def write_scores(path: Path, n: int, seed: int, shift: float, **extra_columns) -> Path:
    frame = score_frame(n, seed, shift)
    for name, values in extra_columns.items():
        frame[name] = values
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path
