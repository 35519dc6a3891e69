"""Figures of ``evaluate``, ``cam --viz``, ``report`` and the demo, in one place (matplotlib, no display):
ROC curves, score histograms, the λ curve, CAM overlays and CAM grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


def _heat(axis, cam: np.ndarray, extent: tuple[int, int, int, int], alpha: float):
    """A CAM drawn over an image as CAM / max CAM (NaN as 0), jet, bilinear: one look for every
    overlay (the demo's, `cam --viz`'s and the report's grid). Returns the image for a colour bar."""
    cam = np.nan_to_num(cam.astype(np.float32), nan=0.0)
    peak = float(cam.max()) if cam.size else 0.0
    return axis.imshow(
        cam / peak if peak > 0 else cam,
        cmap="jet",
        alpha=alpha,
        vmin=0.0,
        vmax=1.0,
        extent=extent,
        interpolation="bilinear",
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """ROC curves of every method on one plot per OOD set: ``curves[set][method label]`` holds
    that method's (ID scores, OOD scores); ID is the positive class. The labels carry what was
    plotted (NegAlign's λ among them), so the figure says which score each curve is."""
    from negalign_cli.compute.metrics import ood_metrics, roc_points

    plt = _pyplot()
    panels = max(1, len(curves))
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.6), dpi=110, squeeze=False)
    styles = ("-", "--", "-.", ":")
    for axis, (name, methods) in zip(axes[0], curves.items(), strict=False):
        for index, (label, (id_scores, ood_scores)) in enumerate(methods.items()):
            fpr, tpr = roc_points(id_scores, ood_scores)
            auroc = 100 * ood_metrics(id_scores, ood_scores).auroc
            style = styles[index % len(styles)]  # equal curves (NegLabel*, NegAlign at λ=0) stay visible
            axis.plot(fpr, tpr, linewidth=1.3, linestyle=style, label=f"{label} (AUROC {auroc:.2f})")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axis.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
        axis.set(
            xlabel="false positive rate (share of OOD accepted)",
            ylabel="true positive rate (share of ID kept)",
            title=f"ROC: ID against {name}",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_histograms(
    path: Path,
    id_frame: pd.DataFrame,
    ood_frames: dict[str, pd.DataFrame],
    columns: list[str],
    labels: dict[str, str] | None = None,
) -> None:
    """ID against each OOD set for each score component, with axis labels: one row per component
    and one column per OOD set (a single set wraps its components four to a row)."""
    from negalign_cli.compute.score_columns import score_column

    plt = _pyplot()
    panels = [(name, frame, column) for column in columns for name, frame in ood_frames.items()]
    width = len(ood_frames) if len(ood_frames) > 1 else min(4, max(1, len(columns)))
    height = max(1, -(-len(panels) // width))
    figure, axes = plt.subplots(height, width, figsize=(3.6 * width, 2.9 * height), dpi=110, squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.axis("off")
    for axis, (name, frame, column) in zip(axes.flat, panels, strict=False):
        id_values, ood_values = (_finite(f[column]) for f in (id_frame, frame))
        both = np.r_[id_values, ood_values]
        known = score_column(column)
        label = (labels or {}).get(column) or (known.label if known else column)
        axis.set_title(f"{label}: ID against {name}", fontsize=8)
        if both.size and both.max() / 4 - both.min() / 4 > np.finfo(np.float64).max / 8:
            # an axis (with its margins) cannot span them: scores near ±1e308
            axis.text(0.5, 0.5, "not drawn: the scores span\nmore than float64 holds", ha="center")
            axis.set_axis_off()
            continue
        bins = np.linspace(both.min(), both.max(), 40) if both.size and both.max() > both.min() else 20
        axis.hist(id_values, bins=bins, alpha=0.55, density=True, label="ID")
        axis.hist(ood_values, bins=bins, alpha=0.55, density=True, label=name)
        axis.set_xlabel(f"score ({column})" if label == column else f"{label} score ({column})", fontsize=7)
        axis.set_ylabel("density (share of the set per unit score)", fontsize=7)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=7, loc="upper right")  # "best" is slow on large sets
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _finite(values: pd.Series) -> np.ndarray:
    """A column's finite values (a histogram of a column other than the evaluated ones may hold
    NaN or inf)."""
    array = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return array[np.isfinite(array)]


def plot_lambda_curve(
    path: Path,
    sweeps: dict[str, dict[float, dict[str, dict[str, float]]]],
    chosen: dict[str, float | None],
    convention: str,
) -> None:
    """NegAlign's λ sweep: AUROC and FPR@95 (``convention``) against λ, one line per OOD set (and
    group, and the mean), the λ each uses marked."""
    plt = _pyplot()
    lambdas = sorted({lam for sweep in sweeps.values() for lam in sweep})
    position = {lam: i for i, lam in enumerate(lambdas)}
    figure, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=110)
    for name, sweep in sweeps.items():
        xs = [position[lam] for lam in sorted(sweep)]
        for axis, metric in zip(axes, ("auroc", "fpr95"), strict=True):
            ys = [100 * sweep[lam][convention][metric] for lam in sorted(sweep)]
            (line,) = axis.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name)
            lam = chosen.get(name)
            if lam is not None and lam in sweep:
                axis.plot(
                    [position[lam]],
                    [100 * sweep[lam][convention][metric]],
                    marker="*",
                    markersize=12,
                    color=line.get_color(),
                )
    for axis, title in zip(axes, ("AUROC % (higher is better)", "FPR@95 % (lower is better)"), strict=True):
        axis.set_xticks(range(len(lambdas)), [f"{lam:g}" for lam in lambdas])
        axis.set(
            xlabel="λ (S_final = S* + λ·P_align)", ylabel=title, title=f"{title}, {convention} convention"
        )
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="★ = λ used", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@dataclass
class CamCell:
    """One image of a CAM grid: the pixels (the model's centre crop), its CAM on the patch grid,
    the true object mask (or None) and the caption."""

    pixels: np.ndarray
    cam: np.ndarray
    mask: np.ndarray | None
    caption: str


def centre_square(path: str | Path, size: int, mode: str = "RGB") -> np.ndarray:
    """The centre square of an image at ``size`` px: what open_clip's resize + centre crop keeps,
    whatever the model's input size (the crop is a square of the shorter side before resizing)."""
    from PIL import Image

    from negalign_cli.inputs.datasets import load_rgb
    from negalign_cli.inputs.tars import locate

    if mode == "RGB":
        image = load_rgb(locate(str(path)))  # a file, or an image inside a tar shard
    else:
        with Image.open(path) as opened:
            image = opened.convert(mode)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


def plot_cam_grid(path: Path, rows: list[tuple[str, list[CamCell]]], size: int = 128) -> None:
    """A grid of CAM overlays: one row per (set, most/least ID-like) with its cells; each CAM is
    scaled to its own maximum (one colour bar for all); the true mask, where known, is outlined."""
    plt = _pyplot()
    columns = max((len(cells) for _, cells in rows), default=1)
    figure, axes = plt.subplots(
        max(1, len(rows)),
        columns,
        figsize=(2.3 * columns + 1.2, 2.75 * max(1, len(rows))),
        dpi=100,
        squeeze=False,
    )
    extent = (0, size, size, 0)
    image = None
    masks = False
    for r, (title, cells) in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c >= len(cells):
                axis.axis("off")
                continue
            cell = cells[c]
            axis.imshow(cell.pixels, extent=extent)
            image = _heat(axis, cell.cam, extent, alpha=0.45)
            if cell.mask is not None and cell.mask.any():
                masks = True
                axis.contour(cell.mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.2)
            axis.set_xlim(0, size)
            axis.set_ylim(size, 0)
            axis.set_xlabel(cell.caption, fontsize=7)
            if c == 0:
                axis.set_ylabel(title, fontsize=8)
    note = "CAM overlay (jet, scaled to each image's maximum)"
    if masks:
        note += "; white outline: the true object mask"
    figure.suptitle(note, fontsize=9)
    figure.tight_layout(rect=(0, 0, 0.92, 0.97))
    if image is not None:
        bar = figure.add_axes((0.935, 0.15, 0.015, 0.7))
        figure.colorbar(image, cax=bar, label="CAM / max CAM of the image")
    figure.savefig(path)
    plt.close(figure)


def cam_overlays(
    folder: Path,
    paths: list[str],
    cams: np.ndarray,
    foreground: np.ndarray,
    size: int,
    titles: list[str],
    masks: list[Path | None] | None = None,
) -> list[Path]:
    """One PNG per image: the image as the model sees it (its centre square), the CAM heatmap on
    it (with a colour bar), and the foreground outline on it (with the true mask, where known)."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    masks = masks if masks is not None else [None] * len(paths)
    for index, (path, cam, fg, title, mask_path) in enumerate(
        zip(paths, cams, foreground, titles, masks, strict=True)
    ):
        pixels = centre_square(path, size)
        extent = (0, size, size, 0)
        figure, axes = plt.subplots(1, 3, figsize=(9.6, 3.4), dpi=100)
        axes[0].imshow(pixels)
        axes[0].set_title("image (the model's centre crop)", fontsize=9)
        axes[1].imshow(pixels)
        heat = _heat(axes[1], cam, extent, alpha=0.5)
        figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02, label="CAM / max CAM")
        axes[1].set_title("CAM", fontsize=9)
        grid = np.kron(fg.astype(np.float32), np.ones((size // fg.shape[0], size // fg.shape[1])))
        dimmed = (pixels * (0.35 + 0.65 * grid[..., None])).astype(np.uint8)  # background patches darkened
        axes[2].imshow(dimmed)
        axes[2].contour(grid, levels=[0.5], colors="lime", linewidths=1.5)
        label = "foreground (lime; background dimmed)"
        if mask_path is not None:
            truth = centre_square(mask_path, size, "L") > 127
            if truth.any():
                axes[2].contour(truth.astype(np.float32), levels=[0.5], colors="white", linewidths=1.2)
                label += "\ntrue object mask (white)"
        axes[2].set_title(label, fontsize=8)
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
    from negalign_cli.inputs.masks import find_mask

    titles = [
        f"{Path(p).name}: predicted class {meta['pred_name'].iloc[r]}, "
        f"cosine to it {meta['pred_score'].iloc[r]:.3f}"
        + ("" if meta["cam_valid"].iloc[r] else " — CAM invalid")
        for p, r in zip(table["path"], rows, strict=True)
    ]
    paths = table["path"].tolist()
    masks = [find_mask(p) for p in paths]
    return cam_overlays(out, paths, cams, foreground, size, titles, masks)
