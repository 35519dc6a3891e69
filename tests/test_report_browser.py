"""The report as a browser shows it (issue 22, item 5): the paper table first, then the
`--id-group` table; figures drawn for the page's column and shown at their own pixel width, so no
figure text is under 11 px at 100% zoom; ROC curves on a log FPR axis; saturated scores binned
where their ranking shows; CAM overlays that read the same over any object colour; tables and
figures scrolling inside their own boxes, never the page, at 390 px (a phone) as at 1280 px.

The browser checks load the page in a real headless Chromium inside an iframe of the width under
test (headless Chromium does not lay a window out narrower than 500 px: `--window-size=390,...`
still gives the page 500 px), with a script that writes what it measured into the DOM."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from negalign_cli.stages import plots
from negalign_cli.stages.report import _md
from tests.faults.helpers import cli
from tests.helpers import in_process
from tests.test_figures_cached import cam_world, report
from tests.test_small_fixes import _card_auroc, _readme_demo_paragraph, _readme_neglabel

MIN_TEXT_PX = 11.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
)


# --- what matplotlib drew: each figure's size and the fonts of the text it drew -------------------


class Drawn:
    """Records, for every figure saved while active, its width in inches, dpi and the font sizes
    (points) of every text matplotlib actually drew in it (hidden and empty texts are not drawn)."""

    def __init__(self) -> None:
        self.fonts: dict[int, list[float]] = defaultdict(list)
        self.figures: dict[str, dict] = {}  # file name -> {"width_in", "dpi", "fonts", "figure"}

    def __enter__(self) -> Drawn:
        from matplotlib.figure import Figure
        from matplotlib.text import Text

        self.patch = pytest.MonkeyPatch()
        draw, savefig = Text.draw, Figure.savefig
        fonts = self.fonts

        def drawing(text, renderer, *args, **kwargs):
            if text.get_visible() and text.get_text().strip():
                fonts[id(text.get_figure(root=True))].append(float(text.get_fontsize()))
            return draw(text, renderer, *args, **kwargs)

        def saving(figure, fname, *args, **kwargs):
            fonts.pop(id(figure), None)  # only what the saved picture holds
            result = savefig(figure, fname, *args, **kwargs)
            self.figures[Path(fname).name] = {
                "width_in": float(figure.get_size_inches()[0]),
                "dpi": float(figure.dpi),
                "fonts": list(fonts[id(figure)]),
                "figure": figure,
            }
            return result

        self.patch.setattr(Text, "draw", drawing)
        self.patch.setattr(Figure, "savefig", saving)
        return self

    def __exit__(self, *exc) -> None:
        self.patch.undo()


# --- a small report with every figure and an --id-group --------------------------------------------


@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> tuple[Path, dict, Drawn]:
    """`evaluate --id-group` and `report` (every figure, the CAM grid on real images) on a few
    dozen rows: (report folder, results.json, what matplotlib drew)."""
    tmp_path = tmp_path_factory.mktemp("small-report")
    world = cam_world(tmp_path)
    images = sorted((tmp_path / "cam-id" / "images").glob("*.png"))
    group = tmp_path / "minority.csv"
    group.write_text("path\n" + "".join(f"cam-id/images/{p.name}\n" for p in images[::3]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEGALIGN_CACHE", str(tmp_path / "env-cache"))
        with Drawn() as drawn:
            args = ["evaluate", "--id", str(world["id"]), f"--ood=ood={world['ood']}", "--compare"]
            args += ["--lambda", "0,1", "--id-group", f"minority={group}"]
            done = cli(*args, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "results"))
            assert done.exit_code == 0, done.output
            out = report(tmp_path, "results", "report", "--cams", "2")
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    return out, results, drawn


def figure_images(html: str) -> list[tuple[int, int, str]]:
    """(width, height, alt) of every figure <img> of report.html, in page order."""
    found = re.findall(
        r'<img src="data:image/png;base64,[^"]+" width="(\d+)" height="(\d+)" alt="([^"]+)"', html
    )
    return [(int(w), int(h), alt) for w, h, alt in found]


def figure_rule(html: str) -> str:
    rule = re.search(r"figure img \{([^}]*)\}", html)
    assert rule, "report.html has no `figure img` rule"
    return rule.group(1)


def test_figure_text_is_at_least_11_px_where_the_page_shows_it(small_report):
    """Each figure is shown at its own pixel width (its <img> carries the PNG's size and the CSS
    never scales it), so a font of p points in a figure w inches wide reads p/72 · px/w CSS px:
    computed for every text matplotlib drew in every figure of the report, all ≥ 11 px."""
    from PIL import Image

    out, _, drawn = small_report
    html = (out / "report.html").read_text()
    rule = figure_rule(html)
    assert "max-width: none" in rule and not re.search(r"(?<!max-)width\s*:", rule), rule
    images = figure_images(html)
    files = sorted((out / "figures").glob("*.png"))
    assert len(images) == len(files) == 4
    sizes = {Image.open(f).size: f.name for f in files}
    column = 1000  # the page's column at 1280 px (1064 px less its padding), rounded down
    for width, height, alt in images:
        name = sizes[(width, height)]  # the page shows the PNG at its own size
        geometry = drawn.figures[name]
        assert round(geometry["width_in"] * geometry["dpi"]) == width, (name, geometry["width_in"], width)
        assert width <= column, (name, width)  # fits the page's column at 1280 px: nothing to scroll
        smallest = min(geometry["fonts"])
        shown_px = smallest / 72 * width / geometry["width_in"]  # points → inches → shown px
        assert shown_px >= MIN_TEXT_PX, (alt, smallest, shown_px)
    assert {"roc.png", "score_hist.png", "lambda_curve.png", "cam_grid.png"} <= set(drawn.figures)


def test_tables_scroll_in_their_own_box_and_the_paper_table_leads(small_report):
    out, _, _ = small_report
    html = (out / "report.html").read_text()
    body = html.split("<body>", 1)[1]
    tables = [m.start() for m in re.finditer(r"<table", body)]
    assert len(tables) >= 8
    for start in tables:  # every table is the only thing in a box that scrolls sideways
        assert body[:start].rstrip().endswith('<div class="scroll">'), body[max(0, start - 80) : start]
    scroll = re.search(r"\.scroll \{([^}]*)\}", html)
    assert scroll and "overflow-x: auto" in scroll.group(1) and "max-width: 100%" in scroll.group(1)
    assert "white-space: nowrap" in re.search(r"td\.num, th\.num \{([^}]*)\}", html).group(1)
    # the paper table first, then the ID subgroups, the figures, and the long per-set table last
    order = [
        body.index(m)
        for m in ('<table class="paper"', '<table class="groups"', "<figure", '<table class="methods"')
    ]
    assert order == sorted(order)


def test_id_group_table_in_every_rendering(small_report):
    """`evaluate --id-group`'s rejection shares (results.json) are in report.html, .md and .tex."""
    out, results, _ = small_report
    group = results["id_groups"]["minority"]
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    latex = (out / "report.tex").read_text()
    table = html.split('<table class="groups">', 1)[1].split("</table>", 1)[0]
    cells = dict(re.findall(r"<tr[^>]*><td>([^<]+)</td><td class=\"num\">([^<]+)</td></tr>", table))
    assert cells["all ID images"] == f"{100 * (1 - group['keep']):.1f}"
    lam = results["mean"]["methods"]["NegAlign"]["lambda"]
    for method, share in group["rejected"].items():
        label = f"NegAlign (λ={lam:g})" if method == "NegAlign" else method
        assert cells[label] == f"{100 * share:.1f}", method
    for value, share in group["negalign_sweep"].items():
        assert cells[f"NegAlign at λ={float(value):g} (sweep)"] == f"{100 * share:.1f}"
    assert f"minority ({group['n']} images)" in table
    section = markdown.split("## ID subgroups rejected", 1)[1].split("\n## ", 1)[0]
    for method, share in group["rejected"].items():
        assert re.search(rf"\| {re.escape(_md(method))}[^|]* \| {100 * share:.1f} \|", section), method
    assert "minority ({} images)".format(group["n"]) in latex and "all ID images" in latex


# --- the figures themselves -----------------------------------------------------------------------


def test_roc_fpr_axis_is_log_scaled(tmp_path):
    """The low-FPR end, where good detectors differ, gets most of the width; an FPR of 0 (an
    empty log axis otherwise) is drawn at 1/(2·n_OOD) and the axis says so."""
    rng = np.random.default_rng(0)
    good = (rng.normal(3, 1, 400), rng.normal(0, 1, 300))
    perfect = (rng.normal(9, 0.1, 400), rng.normal(0, 1, 300))
    with Drawn() as drawn:
        plots.plot_roc(tmp_path / "roc.png", {"far": {"A": good, "B": perfect}})
    (axis, *_) = drawn.figures["roc.png"]["figure"].axes
    assert axis.get_xscale() == "log"
    floor = 0.5 / 300
    assert axis.get_xlim()[0] <= floor and "1/(2·n_OOD)" in axis.get_xlabel()
    lines = [line.get_xdata() for line in axis.get_lines()[:2]]
    assert all(np.min(x) == pytest.approx(floor) for x in lines)
    # the perfect detector keeps all ID at FPR 0: its first point is (floor, 1), not a drop to 0
    assert axis.get_lines()[1].get_ydata()[0] == 1.0


def test_saturated_scores_are_binned_where_their_ranking_shows(tmp_path):
    """NegLabel-style scores (all within 1e-6 of 0 or 1) fill 2 of 40 linear bins; shown as
    log-odds (scores in [0, 1]) or percentile ranks (others) they spread over many, in the same
    order, and the axis names the scale. Unsaturated scores stay as they are."""
    rng = np.random.default_rng(1)
    id_scores = 1 - 10 ** -rng.uniform(6, 14, 300)
    ood_scores = 10 ** -rng.uniform(6, 30, 200)
    frames = [
        pd.DataFrame({"s_neglabel_plain": v, "s_negrefine": 3 * v, "s_mcm": rng.uniform(0.2, 0.9, len(v))})
        for v in (id_scores, ood_scores)
    ]
    with Drawn() as drawn:
        plots.plot_histograms(tmp_path / "h.png", frames[0], {"ood": frames[1]}, list(frames[0].columns))
    axes = drawn.figures["h.png"]["figure"].axes
    for axis, scale in zip(axes, ("log-odds", "percentile rank", "score"), strict=False):
        assert scale in axis.get_xlabel(), axis.get_xlabel()
        # each histogram is one filled outline: a bin of height h > 0 puts two corners at h
        tops = np.concatenate([patch.get_xy()[:, 1] for patch in axis.patches])
        filled = int((tops > 0).sum()) // 2
        assert filled >= 16, (axis.get_title(), filled)  # was 2
    values, name = plots.display_scale([id_scores, ood_scores])
    assert name.startswith("log-odds")
    both, shown = np.r_[id_scores, ood_scores], np.r_[values[0], values[1]]
    assert np.array_equal(np.argsort(both, kind="stable"), np.argsort(shown, kind="stable"))


def test_cam_overlay_reads_the_same_over_any_colour(tmp_path):
    """The same CAM over a red and over a blue object of equal luminance gives the same picture
    (the image is shown in grey under a perceptual colormap), and the colour bar is not jet."""
    from PIL import Image

    rng = np.random.default_rng(2)
    cam = rng.random((7, 7))
    red, blue = np.zeros((2, 128, 128, 3), dtype=np.uint8)
    blue[..., 2], red[..., 0] = 250, round(250 * 0.0722 / 0.2126)  # equal luminance (Rec. 709)
    cells = [("row", [plots.CamCell(red, cam, None, "red"), plots.CamCell(blue, cam, None, "blue")])]
    with Drawn() as drawn:
        plots.plot_cam_grid(tmp_path / "grid.png", cells)
    figure = drawn.figures["grid.png"]["figure"]
    picture = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"), dtype=np.float32)
    height = picture.shape[0]
    crops = []
    for axis in figure.axes[:2]:
        box = axis.get_window_extent()
        x0, x1 = int(box.x0) + 3, int(box.x1) - 3
        y0, y1 = height - int(box.y1) + 3, height - int(box.y0) - 3
        crops.append(picture[y0:y1, x0:x1])
    assert crops[0].shape == crops[1].shape
    assert np.abs(crops[0] - crops[1]).mean() < 2.0  # the heat does not depend on the object's hue
    bar = figure.axes[-1]._colorbar  # the colour bar says which colormap the heat is in
    assert bar.cmap.name == plots.CAM_COLORMAP != "jet"


# --- the real browser ------------------------------------------------------------------------------

MEASURE = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement, all = [...document.body.querySelectorAll("*")];
  const texts = all.filter(e => [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()));
  parent.postMessage(JSON.stringify({
    width: window.innerWidth,
    scrollWidth: root.scrollWidth,
    outside: all.filter(e => !e.closest(".scroll") && e.getBoundingClientRect().right > window.innerWidth + 0.5)
                .map(e => e.tagName + "." + e.className),
    images: [...document.querySelectorAll("figure img")].map(i => ({
      natural: i.naturalWidth, shown: i.getBoundingClientRect().width,
      box: i.parentElement.clientWidth, scrolls: i.parentElement.scrollWidth > i.parentElement.clientWidth})),
    smallestFont: Math.min(...texts.map(e => parseFloat(getComputedStyle(e).fontSize))),
  }), "*");
});
</script>"""


def frame_page(page: Path, folder: Path, width: int, height: int = 2000) -> Path:
    """A copy of ``page`` (with the measuring script) inside an iframe ``width`` px wide."""
    folder.mkdir(parents=True, exist_ok=True)
    html = page.read_text(encoding="utf-8")
    (folder / "page.html").write_text(html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    frame = folder / f"frame-{width}.html"
    frame.write_text(
        '<!DOCTYPE html><html><body style="margin:0"><script>window.addEventListener("message", e => {'
        'const p = document.createElement("pre"); p.id = "measure"; p.textContent = e.data;'
        "document.body.appendChild(p); });</script>"
        f'<iframe src="page.html" style="width:{width}px;height:{height}px;border:0;display:block">'
        "</iframe></body></html>",
        encoding="utf-8",
    )
    return frame


def chromium(page: Path, *action: str, window: tuple[int, int] = (1300, 2000)) -> str:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    command += ["--force-device-scale-factor=1", f"--window-size={window[0]},{window[1]}", "--no-first-run"]
    command += ["--disable-extensions", "--virtual-time-budget=10000", *action, page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def measure(page: Path, folder: Path, width: int) -> dict:
    """What the page measures of itself in Chromium, laid out ``width`` px wide."""
    dom = chromium(frame_page(page, folder, width), "--dump-dom")
    found = re.search(r'<pre id="measure">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    import html

    return json.loads(html.unescape(found.group(1)))


def check_layout(measured: dict, width: int) -> None:
    assert measured["width"] == width
    assert measured["scrollWidth"] <= width and not measured["outside"], measured  # no sideways page scroll
    assert measured["images"] and all(i["shown"] == i["natural"] for i in measured["images"])  # never scaled
    assert measured["smallestFont"] >= MIN_TEXT_PX


@pytest.mark.slow
@needs_chromium
def test_demo_report_at_390_px_in_chromium(toy_demo, tmp_path):
    """The demo's report on a phone: the page never scrolls sideways (its tables and figures
    scroll in their own boxes), each figure keeps its own pixel width, no page text under 11 px."""
    demo, done = toy_demo
    assert done.returncode == 0, done.stderr[-3000:]
    measured = measure(demo / "report" / "report.html", tmp_path, 390)
    check_layout(measured, 390)
    assert all(i["scrolls"] for i in measured["images"])  # wider than a phone: they scroll, unscaled


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory) -> Path:
    """`negalign demo` at its defaults, in-process: the ci set's one demo run (the README's figures
    below, the report at 1280 px)."""
    root = tmp_path_factory.mktemp("full-demo")
    with in_process(NEGALIGN_CACHE=str(root / "cache")):
        result = cli("demo", "--out", str(root / "demo"))
    assert result.exit_code == 0, result.output[-3000:]
    return root / "demo"


@pytest.mark.ci
def test_the_full_demo_prints_what_the_readme_and_the_model_card_say(full_demo):
    """The long real run: `negalign demo` at its defaults; the README's and the model card's
    figures are what it measures (to the printed two decimals), and its best λ is 0 on every set."""
    results = json.loads((full_demo / "results" / "results.json").read_text())
    assert results["id"]["n"] == int(re.search(r"\((\d+) ID images", _readme_demo_paragraph()).group(1))
    measured = {
        name: 100 * block["methods"]["NegLabel"]["metrics"]["neglabel"]["auroc"]
        for name, block in results["ood"].items()
    }
    quoted = _readme_neglabel(_readme_demo_paragraph())
    for name, value in measured.items():
        assert round(value, 2) == quoted[name] == _card_auroc("NegLabel")[name], name
    assert round(sum(measured.values()) / len(measured), 2) == quoted["mean"]
    assert all(float(block["best_lambda"]) == 0 for block in results["ood"].values())


@pytest.mark.ci
@needs_chromium
def test_demo_report_at_1280_px_in_chromium(full_demo, tmp_path):
    """On a laptop every figure fits its column: nothing scrolls, nothing is scaled (the full demo's
    report: the same page as the small demo's, with more images behind it)."""
    demo = full_demo
    measured = measure(demo / "report" / "report.html", tmp_path, 1280)
    check_layout(measured, 1280)
    assert not any(i["scrolls"] for i in measured["images"]), measured["images"]
    # the screenshots README.md shows (docs/images/report-*.png) are taken this way
    from PIL import Image

    for width in (1280, 390):
        screenshot(demo / "report" / "report.html", tmp_path / f"report-{width}.png", width, 1400)
        pixels = np.asarray(Image.open(tmp_path / f"report-{width}.png").convert("L"), dtype=np.float32)
        assert pixels.shape == (1400, width)
        assert (pixels < 100).mean() > 0.005 and pixels.std() > 10  # text and tables drawn


def screenshot(page: Path, target: Path, width: int, height: int) -> None:
    """A PNG of the top ``height`` px of ``page`` laid out ``width`` px wide (a palette PNG: small).
    README.md's docs/images/report-1280.png and report-390.png: ``screenshot(page, target, 1280,
    2200)`` and ``screenshot(page, target, 390, 2200)`` of a `negalign demo --n-id 80 --n-ood 40`
    report."""
    from PIL import Image

    shot = target.with_suffix(".full.png")
    chromium(
        frame_page(page, target.parent / f".frame-{width}", width, height),
        f"--screenshot={shot}",
        window=(max(width, 520), height),
    )
    with Image.open(shot) as full:
        full.convert("RGB").crop((0, 0, width, height)).quantize(256).save(target, optimize=True)
    shot.unlink()
    shutil.rmtree(target.parent / f".frame-{width}")
