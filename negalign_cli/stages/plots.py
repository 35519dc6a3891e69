"""Figures of ``evaluate``, ``cam --viz``, ``report`` and the demo, in one place (matplotlib, no display):
ROC curves, score histograms, the λ curve, CAM overlays and CAM grids.

Every figure is drawn at :data:`FIGURE_DPI` and ``report.html`` shows it at its own pixel width (one
PNG pixel = one CSS pixel, never scaled down: a figure wider than the screen scrolls in its box), so
a font of ``p`` points reads as ``p · FIGURE_DPI / 72`` CSS px. The report's figures are at most
:data:`PAGE_WIDTH_IN` wide (the report's column) and use no font under :data:`MIN_TEXT_PT`: no text
under 11 px at 100% zoom."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from negalign_cli.lazy import lazy_module

if TYPE_CHECKING:
    import pandas as pd
else:  # `evaluate` imports this module to draw a figure the cache may already hold
    pd = lazy_module("pandas")

FIGURE_DPI = 100  # one PNG pixel per CSS pixel in report.html
PAGE_WIDTH_IN = 10.0  # 1000 px: the report's column (report.html.j2 gives figures this width)
MIN_TEXT_PT = 8.0  # 8 pt at 100 dpi, shown 1:1 = 11.1 px
CAM_COLORMAP = "inferno"  # perceptually uniform, and never drawn over the image's own colours
PANELS_PER_ROW = 3  # ROC curves and histograms: at most 3 panels across the page

STYLE = {
    "figure.dpi": FIGURE_DPI,
    "savefig.dpi": FIGURE_DPI,
    "font.size": 9.0,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9.0,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "legend.title_fontsize": 8.5,
    "figure.titlesize": 10.0,
}


def text_px(points: float, width_in: float, shown_px: float) -> float:
    """The CSS px a font of ``points`` takes in a figure ``width_in`` inches wide that a page shows
    ``shown_px`` CSS px wide (whatever its dpi: the dpi sets the PNG's pixels, the page rescales)."""
    return points / 72 * shown_px / width_in


@contextmanager
def _style() -> Iterator[None]:
    plt = _pyplot()
    with plt.rc_context(STYLE):
        yield


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(panels: int) -> tuple[int, int]:
    """(rows, columns) of a figure of ``panels`` panels, at most :data:`PANELS_PER_ROW` across."""
    columns = max(1, min(PANELS_PER_ROW, panels))
    return max(1, -(-panels // columns)), columns


def _panel_grid(
    rows: int,
    columns: int,
    *,
    axes_w: float,
    axes_h: float,
    left: float,
    right: float,
    top: float,
    bottom: float,
    row_gap: float,
    column_gap: float,
):
    """A figure of ``rows`` × ``columns`` axes laid out in inches (each axes ``axes_w`` × ``axes_h``;
    margins and gaps hold the labels): the geometry is fixed before drawing, so no layout engine
    measures every label of a many-panel figure again at save time."""
    plt = _pyplot()
    width = left + right + columns * axes_w + (columns - 1) * column_gap
    height = top + bottom + rows * axes_h + (rows - 1) * row_gap
    figure = plt.figure(figsize=(width, height))
    grid = figure.add_gridspec(
        rows,
        columns,
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=column_gap / axes_w,
        hspace=row_gap / axes_h,
    )
    return figure, grid.subplots(squeeze=False)


def _outlined(width: float = 2.6):
    """A black halo under a line: a white or cyan outline stays visible over any colour."""
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=width, foreground="black"), patheffects.Normal()]


def cam_rgb(pixels: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A CAM over an image, legible whatever the image's colours: the image as dimmed grey (its
    luminance, so a red and a blue object of equal brightness look alike), the CAM / max CAM (NaN
    as 0, bilinear to the image's size) in :data:`CAM_COLORMAP` over it, opaque where it is high.
    Float RGB in [0, 1]."""
    from matplotlib import colormaps
    from PIL import Image

    height, width = pixels.shape[:2]
    rgb = pixels[..., :3].astype(np.float32) / 255 if pixels.ndim == 3 else pixels[..., None] / 255.0
    grey = (rgb * np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)).sum(axis=-1)
    base = 0.2 + 0.5 * grey  # dimmed: the heat's colours stay the brightest thing in the picture
    heat = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0)
    heat = np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    peak = float(heat.max()) if heat.size else 0.0
    heat = np.clip(heat / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heat)
    colour = colormaps[CAM_COLORMAP](heat)[..., :3]
    alpha = (0.85 * heat)[..., None]
    return np.clip(base[..., None] * (1 - alpha) + colour * alpha, 0.0, 1.0)


def _heat(axis, pixels: np.ndarray, cam: np.ndarray, extent: tuple[int, int, int, int]):
    """:func:`cam_rgb` drawn on ``axis``, with the CAM's half-maximum contour (white on black):
    one look for every overlay (the demo's, `cam --viz`'s and the report's grid). Returns a
    mappable for a colour bar."""
    from matplotlib import cm, colors

    axis.imshow(cam_rgb(pixels, cam), extent=extent)
    return cm.ScalarMappable(norm=colors.Normalize(0.0, 1.0), cmap=CAM_COLORMAP)


def plot_roc(path: Path, curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """ROC curves of every method, one panel per OOD set: ``curves[set][method label]`` holds
    that method's (ID scores, OOD scores); ID is the positive class. The false positive rate is on
    a log scale (the low-FPR end, where good detectors differ, gets most of the width); an FPR of
    0 is drawn at 1/(2·n_OOD), half the smallest one the set can show, and the TPR axis starts a
    little under the lowest TPR drawn. One legend under the panels names what each line plots
    (NegAlign's λ among it); the AUROCs are the table's."""
    from negalign_cli.compute.metrics import roc_points  # scikit-learn's roc_curve points

    plt = _pyplot()
    rows, columns = _grid(len(curves))
    styles: tuple[Literal["-", "--", "-.", ":"], ...] = ("-", "--", "-.", ":")
    labels: dict[int, list[str]] = {}  # line index -> its label in each panel (NegAlign's λ may differ)
    methods_drawn = max((len(m) for m in curves.values()), default=1)
    legend_in = 0.25 * -(-methods_drawn // 4) + 0.15
    with _style():
        figure, axes = plt.subplots(
            rows,
            columns,
            figsize=(PAGE_WIDTH_IN, 0.9 * PAGE_WIDTH_IN / columns * rows + legend_in),
            squeeze=False,
            layout="constrained",
        )
        for axis in axes.flat[len(curves) :]:
            axis.axis("off")
        for axis, (name, methods) in zip(axes.flat, curves.items(), strict=False):
            floor, lowest = 1.0, 1.0
            for index, (label, (id_scores, ood_scores)) in enumerate(methods.items()):
                fpr, tpr = roc_points(id_scores, ood_scores)
                keep = fpr > 0
                keep[np.flatnonzero(fpr == 0)[-1:]] = True  # at FPR 0: only the highest TPR reached
                fpr, tpr = fpr[keep], tpr[keep]
                floor = 0.5 / max(1, len(ood_scores))
                lowest = min(lowest, float(tpr[0]))
                style = styles[index % len(styles)]  # equal curves (NegLabel*, NegAlign at λ=0) stay visible
                axis.plot(np.maximum(fpr, floor), tpr, linewidth=1.4, linestyle=style, color=f"C{index}")
                labels.setdefault(index, [])
                if label not in labels[index]:
                    labels[index].append(label)
            chance = np.geomspace(floor, 1, 50)
            axis.plot(chance, chance, color="grey", linestyle=":", linewidth=1)
            axis.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
            axis.set_xscale("log")
            bottom = max(0.0, np.floor(min(lowest, 0.9) * 20) / 20 - 0.05)
            axis.set(
                xlabel=f"FPR: share of OOD accepted (log scale;\nFPR 0 drawn at 1/(2·n_OOD) = {floor:.2g})",
                ylabel="TPR: share of ID kept",
                title=f"ROC: ID against {name}",
                xlim=(floor * 0.8, 1.0),
                ylim=(bottom, 1.0 + (1.0 - bottom) * 0.02),
            )
            axis.grid(alpha=0.25, which="major")
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=f"C{i}", linestyle=styles[i % len(styles)], linewidth=1.4) for i in labels
        ]
        figure.legend(
            handles, [" | ".join(names) for names in labels.values()], loc="outside lower center", ncols=4
        )
        figure.savefig(path)
        plt.close(figure)


def display_scale(values: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    """The values a histogram bins, and the axis's name for them. Scores that saturate (more than
    half of them in the 2 fullest of 200 equal bins: NegLabel's and NegRefine's sigmoids near 0
    and 1, or a few far outliers) hide their ranking on a linear axis, so they are shown as
    log-odds ln(s/(1−s)) when every score lies in [0, 1] and that spreads them, else as their
    percentile rank among the values of the panel. Otherwise: the scores as they are."""
    both = np.concatenate(values) if values else np.empty(0)
    if not _crushed(both):
        return values, "score"
    if both.size and both.min() >= 0 and both.max() <= 1:
        below_one = np.finfo(np.float64).eps / 2  # 1 − s of the largest float64 below 1
        tiny = np.finfo(np.float64).tiny  # a score of exactly 0 stays below every positive one
        odds = [np.log(np.clip(v, tiny, None)) - np.log(np.clip(1 - v, below_one, None)) for v in values]
        if not _crushed(np.concatenate(odds)):
            return odds, "log-odds ln(s/(1−s))"
    ranks = pd.Series(both).rank(method="average", pct=True).to_numpy() * 100
    edges = np.cumsum([0, *(len(v) for v in values)])
    return [ranks[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)], "percentile rank of the score"


def _crushed(values: np.ndarray) -> bool:
    """Whether a linear histogram hides the order of ``values``: over half in 2 of 200 bins."""
    if values.size < 2 or not values.max() > values.min():
        return False
    counts, _ = np.histogram(values, bins=200)
    return bool(np.sort(counts)[-2:].sum() > values.size / 2)


def plot_histograms(
    path: Path,
    id_frame: pd.DataFrame,
    ood_frames: dict[str, pd.DataFrame],
    columns: list[str],
    labels: dict[str, str] | None = None,
) -> None:
    """ID against each OOD set for each score component, with axis labels: one panel per
    (component, OOD set), at most 3 across (a single set wraps its components). A saturated score
    is binned on the scale :func:`display_scale` picks, named on its axis."""
    from negalign_cli.compute.score_columns import score_column

    plt = _pyplot()
    panels = [(name, frame, column) for column in columns for name, frame in ood_frames.items()]
    rows, width = _grid(len(panels))
    left, right, gap = 0.75, 0.15, 0.8  # gap: the next panel's tick labels and y label
    with _style():
        figure, axes = _panel_grid(
            rows,
            width,
            axes_w=(PAGE_WIDTH_IN - left - right - (PANELS_PER_ROW - 1) * gap) / PANELS_PER_ROW,
            axes_h=1.75,
            left=left,
            right=right,
            top=0.6,  # the title and the legend over the axes
            bottom=0.5,  # the tick labels and the x label
            row_gap=1.15,
            column_gap=gap,
        )
        for axis in axes.flat[len(panels) :]:
            axis.axis("off")
        for axis, (name, frame, column) in zip(axes.flat, panels, strict=False):
            id_values, ood_values = (_finite(f[column]) for f in (id_frame, frame))
            both = np.r_[id_values, ood_values]
            known = score_column(column)
            label = (labels or {}).get(column) or (known.label if known else column)
            axis.set_title(f"{label}: ID against {name}", pad=20)
            if both.size and both.max() / 4 - both.min() / 4 > np.finfo(np.float64).max / 8:
                # an axis (with its margins) cannot span them: scores near ±1e308
                axis.text(0.5, 0.5, "not drawn: the scores span\nmore than float64 holds", ha="center")
                axis.set_axis_off()
                continue
            (id_values, ood_values), scale = display_scale([id_values, ood_values])
            both = np.r_[id_values, ood_values]
            bins = np.linspace(both.min(), both.max(), 40) if both.size and both.max() > both.min() else 20
            # one filled outline per histogram, not a patch per bar: the same picture, drawn faster
            axis.hist(id_values, bins=bins, alpha=0.55, density=True, label="ID", histtype="stepfilled")
            axis.hist(ood_values, bins=bins, alpha=0.55, density=True, label=name, histtype="stepfilled")
            axis.set_xlabel(f"{scale} ({column})" if label == column else f"{label}: {scale}")
            axis.set_ylabel("density")
            # over the axes, under the title: never over the bars ("best" is slow on large sets)
            axis.legend(
                loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False, borderaxespad=0.1
            )
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
    with _style():
        figure, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 3.9), layout="constrained")
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
        for axis, title in zip(
            axes, ("AUROC % (higher is better)", "FPR@95 % (lower is better)"), strict=True
        ):
            axis.set_xticks(range(len(lambdas)), [f"{lam:g}" for lam in lambdas])
            axis.set(
                xlabel="λ (S_final = S* + λ·P_align)", ylabel=title, title=f"{title}, {convention} convention"
            )
            axis.grid(alpha=0.3)
        axes[0].legend(title="★ = λ used")
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
    """A grid of CAM overlays (:func:`cam_rgb`): one row per (set, most/least ID-like) with its
    cells, each CAM scaled to its own maximum (one colour bar for all); the true mask, where known,
    is outlined in cyan on black. Four cells fill the report's column (more make it wider)."""
    plt = _pyplot()
    columns = max((len(cells) for _, cells in rows), default=1)
    left, right = 0.4, 0.85  # the row titles; the colour bar
    with _style():
        figure, axes = _panel_grid(
            max(1, len(rows)),
            columns,
            axes_w=2.1,
            axes_h=2.1,
            left=left,
            right=right,
            top=0.4,  # the title
            bottom=0.62,  # the caption under each image (up to 4 lines)
            row_gap=0.62,
            column_gap=0.1,
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
                shown = cells[c]
                image = _heat(axis, shown.pixels, shown.cam, extent)
                if shown.mask is not None and shown.mask.any():
                    masks = True
                    contour = axis.contour(
                        shown.mask.astype(np.float32), levels=[0.5], colors="#3ff0ff", linewidths=1.3
                    )
                    contour.set_path_effects(_outlined())
                axis.set_xlim(0, size)
                axis.set_ylim(size, 0)
                axis.set_xlabel(shown.caption, fontsize=MIN_TEXT_PT, linespacing=1.15, labelpad=3)
                if c == 0:
                    axis.set_ylabel(title)
        note = f"CAM / max CAM of each image ({CAM_COLORMAP}) over the image in dimmed grey"
        if masks:
            note += "; cyan outline: the true object mask"
        figure.suptitle(note, y=1 - 0.12 / figure.get_figheight())
        if image is not None:
            width, height = figure.get_size_inches()
            bar = figure.add_axes((1 - 0.68 / width, 0.25, 0.14 / width, 0.5))
            figure.colorbar(image, cax=bar, label="CAM / max CAM")
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
    """One PNG per image: the image as the model sees it (its centre square), the CAM on it (with
    a colour bar), and the foreground outline on it (with the true mask, where known)."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    masks = masks if masks is not None else [None] * len(paths)
    for index, (path, cam, fg, title, mask_path) in enumerate(
        zip(paths, cams, foreground, titles, masks, strict=True)
    ):
        pixels = centre_square(path, size)
        extent = (0, size, size, 0)
        with _style():
            figure, axes = plt.subplots(1, 3, figsize=(PAGE_WIDTH_IN, 3.6), layout="constrained")
            axes[0].imshow(pixels)
            axes[0].set_title("image (the model's centre crop)")
            heat = _heat(axes[1], pixels, cam, extent)
            figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02, label="CAM / max CAM")
            axes[1].set_title(f"CAM ({CAM_COLORMAP}, image in grey)")
            grid = np.kron(fg.astype(np.float32), np.ones((size // fg.shape[0], size // fg.shape[1])))
            dimmed = (pixels * (0.35 + 0.65 * grid[..., None])).astype(np.uint8)  # background darkened
            axes[2].imshow(dimmed)
            axes[2].contour(grid, levels=[0.5], colors="lime", linewidths=1.5).set_path_effects(
                _outlined(3.0)
            )
            label = "foreground (lime; background dimmed)"
            if mask_path is not None:
                truth = centre_square(mask_path, size, "L") > 127
                if truth.any():
                    outline = axes[2].contour(
                        truth.astype(np.float32), levels=[0.5], colors="#3ff0ff", linewidths=1.3
                    )
                    outline.set_path_effects(_outlined())
                    label += "\ntrue object mask (cyan)"
            axes[2].set_title(label)
            for axis in axes:
                axis.axis("off")
            figure.suptitle(title)
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
