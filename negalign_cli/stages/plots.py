"""Figures written by ``evaluate``: ROC curves and score histograms (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, id_scores: np.ndarray, ood_scores: dict[str, np.ndarray], title: str) -> None:
    """ROC of ID (positive) against each OOD set for one score."""
    from sklearn.metrics import roc_curve

    from negalign_cli.compute.metrics import ood_metrics

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 5), dpi=120)
    for name, scores in ood_scores.items():
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(scores))]
        values = np.r_[id_scores, scores]
        fpr, tpr, _ = roc_curve(labels, values)
        axis.plot(fpr, tpr, label=f"{name} (AUROC {100 * ood_metrics(id_scores, scores).auroc:.2f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    axis.set(
        xlabel="false positive rate (OOD accepted)",
        ylabel="true positive rate (ID kept)",
        title=f"ROC: {title}",
    )
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_histograms(
    path: Path, id_frame: pd.DataFrame, ood_frames: dict[str, pd.DataFrame], columns: list[str]
) -> None:
    """One row per OOD set, one column per score component: ID against OOD."""
    plt = _pyplot()
    rows, cols = max(1, len(ood_frames)), max(1, len(columns))
    figure, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), dpi=110, squeeze=False)
    for r, (name, frame) in enumerate(ood_frames.items()):
        for c, column in enumerate(columns):
            axis = axes[r][c]
            id_values = pd.to_numeric(id_frame[column], errors="coerce").dropna().to_numpy()
            ood_values = pd.to_numeric(frame[column], errors="coerce").dropna().to_numpy()
            both = np.r_[id_values, ood_values]
            bins = np.linspace(both.min(), both.max(), 40) if both.size and np.ptp(both) > 0 else 20
            axis.hist(id_values, bins=bins, alpha=0.55, density=True, label="ID")
            axis.hist(ood_values, bins=bins, alpha=0.55, density=True, label=name)
            axis.set_title(column, fontsize=8)
            axis.tick_params(labelsize=7)
            if c == 0:
                axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def cam_overlays(
    folder: Path, paths: list[str], cams: np.ndarray, foreground: np.ndarray, size: int, titles: list[str]
) -> list[Path]:
    """One PNG per image: the image as the model sees it (resize + centre crop), the CAM heatmap on
    it, and the foreground outline on it."""
    from PIL import Image

    from negalign_cli.inputs.datasets import load_rgb
    from negalign_cli.inputs.tars import locate

    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (path, cam, fg, title) in enumerate(zip(paths, cams, foreground, titles, strict=True)):
        image = load_rgb(locate(path))  # a file, or an image inside a tar shard
        scale = size / min(image.size)
        image = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (image.width - size) // 2, (image.height - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)))
        extent = (0, size, size, 0)
        figure, axes = plt.subplots(1, 3, figsize=(9, 3.2), dpi=100)
        axes[0].imshow(pixels)
        axes[0].set_title("image", fontsize=9)
        axes[1].imshow(pixels)
        axes[1].imshow(cam.astype(np.float32), cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear")
        axes[1].set_title("CAM", fontsize=9)
        grid = np.kron(fg.astype(np.float32), np.ones((size // fg.shape[0], size // fg.shape[1])))
        dimmed = (pixels * (0.35 + 0.65 * grid[..., None])).astype(np.uint8)  # background patches darkened
        axes[2].imshow(dimmed)
        axes[2].contour(grid, levels=[0.5], colors="lime", linewidths=1.5)
        axes[2].set_title("foreground (background dimmed)", fontsize=9)
        for axis in axes:
            axis.axis("off")
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        target = folder / f"cam_{index:03d}.png"
        figure.savefig(target)
        plt.close(figure)
        written.append(target)
    return written


def write_cam_overlays(cam_folder: Path, count: int, out: Path, size: int) -> list[Path]:
    """Overlays of the first ``count`` embedded images of a ``cam`` artifact (or its ``--out``
    folder), drawn from the stored CAMs and foreground masks."""
    from negalign_cli.stages import files

    table = pd.read_parquet(cam_folder / files.IMAGE_TABLE)
    table = table[table["row"] >= 0].drop_duplicates("row").sort_values("row").head(count)
    meta = pd.read_parquet(cam_folder / files.CAM_TABLE)
    rows = table["row"].to_numpy()
    cams = np.load(cam_folder / files.CAMS)[rows].astype(np.float32)
    foreground = np.load(cam_folder / files.FOREGROUND)[rows]
    titles = [
        f"{Path(p).name}: predicted {meta['pred_name'].iloc[r]} (cosine {meta['pred_score'].iloc[r]:.3f})"
        + ("" if meta["cam_valid"].iloc[r] else " — CAM invalid")
        for p, r in zip(table["path"], rows, strict=True)
    ]
    return cam_overlays(out, table["path"].tolist(), cams, foreground, size, titles)
