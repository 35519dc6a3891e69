"""The name of every file an artifact holds, in one place (the formats are in docs/architecture.md).

Stages write and read these names; the CLI, the toy world and the tests refer to them here. A
stage's folder also holds the store's ``manifest.json`` (:data:`negalign_cli.cache.store.MANIFEST`).
"""

from __future__ import annotations

# embed texts
CLASS_EMBEDDINGS = "class_embeddings.npy"
CLASS_LIST = "classes.txt"
NEGATIVE_EMBEDDINGS = "negative_embeddings.npy"
NEGATIVE_LIST = "negatives.txt"

# mine-negatives
NEG_LABELS_NOUN = "neg_labels_noun.txt"
NEG_LABELS_ADJ = "neg_labels_adj.txt"
MINING_SCORES = "mining_scores.csv"

# split-scores (the cached r-scores) and split-vocab
R_SCORES = "r_scores.parquet"
SPLIT_SCORES = "split_scores.csv"
NEG_OBJECT = "neg_obj.txt"
NEG_BACKGROUND = "neg_bg.txt"
NEG_AMBIGUOUS = "neg_ambiguous.txt"

# embed images and cam
IMAGE_EMBEDDINGS = "image_embeddings.npy"
IMAGE_TABLE = "images.parquet"
BACKGROUND_EMBEDDINGS = "background_embeddings.npy"
CAMS = "cams.npy"
FOREGROUND = "foreground.npy"
CAM_TABLE = "cam.parquet"

# score
SCORES = "scores.parquet"

# evaluate
RESULTS = "results.json"
METRICS = "metrics.csv"
TABLE = "table.csv"  # the paper-style table: one row per method, "<set> AUROC", "<set> FPR@95", ...
ROC_PLOT = "roc.png"
HISTOGRAM_PLOT = "score_hist.png"

# report (`negalign report RESULTS_DIR --out DIR`; default DIR = RESULTS_DIR/report)
REPORT_DIR = "report"
REPORT_HTML = "report.html"
REPORT_MARKDOWN = "report.md"
REPORT_LATEX = "report.tex"
REPORT_FIGURES = "figures"  # the PNGs report.md and report.tex include (report.html embeds them)
LAMBDA_PLOT = "lambda_curve.png"
CAM_GRID_PLOT = "cam_grid.png"

# the Python API (CLIPNegAlign): where it exports the split under its output_folder (NegAlign's layout)
NEGATIVES_SPLIT_DIR = "negatives_split"

# `cam --viz` without --viz-dir: the overlays go to --out/viz
VIZ_DIR = "viz"

# Every file a stage's artifact holds. `--out` keeps only the current artifact's: an export removes
# these names (and whatever the folder's old manifest.json listed) when the new artifact lacks them.
ARTIFACT_FILES = frozenset(
    {
        CLASS_EMBEDDINGS,
        CLASS_LIST,
        NEGATIVE_EMBEDDINGS,
        NEGATIVE_LIST,
        NEG_LABELS_NOUN,
        NEG_LABELS_ADJ,
        MINING_SCORES,
        R_SCORES,
        SPLIT_SCORES,
        NEG_OBJECT,
        NEG_BACKGROUND,
        NEG_AMBIGUOUS,
        IMAGE_EMBEDDINGS,
        IMAGE_TABLE,
        BACKGROUND_EMBEDDINGS,
        CAMS,
        FOREGROUND,
        CAM_TABLE,
        SCORES,
        RESULTS,
        METRICS,
        TABLE,
        ROC_PLOT,
        HISTOGRAM_PLOT,
    }
)
# What commands draw from an artifact beside it (report, cam --viz, the API's split): never deleted
# by an export, but named in a warning when the artifact in the folder changes under them.
RENDERED = frozenset(
    {
        REPORT_DIR,
        REPORT_HTML,
        REPORT_MARKDOWN,
        REPORT_LATEX,
        REPORT_FIGURES,
        LAMBDA_PLOT,
        CAM_GRID_PLOT,
        NEGATIVES_SPLIT_DIR,
        VIZ_DIR,
    }
)
