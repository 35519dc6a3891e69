"""Defaults that the CLI shows and the stages use, in one light module (no torch import).

Each default is the published setting or the safe choice; the docs say why.
"""

from __future__ import annotations

# Where things live, and how the environment overrides a flag's default.
CACHE_ENV = "NEGALIGN_CACHE"
DEVICE_ENV = "NEGALIGN_DEVICE"
DEBUG_ENV = "NEGALIGN_DEBUG"
DEFAULT_CACHE_DIR = ".negalign-cache"

# Model precisions (fp16 needs CUDA).
PRECISIONS = ("fp32", "fp16", "bf16")
# `--compile`: torch.compile of the image tower; auto = on for CUDA only (models.ImageTower)
COMPILE_MODES = ("auto", "on", "off")
DEFAULT_COMPILE = "auto"
COMPILED_DIR = "compiled"  # the folder of compiled artifacts in the cache (torch inductor's cache)

# The field's standard model: OpenAI's ViT-B/16, what MCM, NegLabel, CSP and NegRefine report first.
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"

# Per-image vectors and the .npy outputs: float32. float16 is an opt-in (docs/maths.md gives its error).
STORE_DTYPES = ("float32", "float16")
DEFAULT_STORE_DTYPE = "float32"

# What P_align does where the CAM is invalid (all zero, non-finite, or no background left).
INVALID_CAM_POLICIES = ("fallback", "zero", "exclude")
DEFAULT_INVALID_CAM = "fallback"

# Grad-CAM and background pooling (docs/maths.md).
CAM_METHODS = ("gradcam", "gradxact")
BG_POOLS = ("tokens", "maskclip", "clearclip", "mask")

# NegAlign's final score S* + λ·P_align is a method of evaluate's table under this name.
NEGALIGN = "NegAlign"

# NegAlign's λ grid (the method's published sweep).
DEFAULT_LAMBDAS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)

# Metric conventions (docs/maths.md, "Metrics").
METRIC_CONVENTIONS = ("neglabel", "openood")

# Negative vocabulary: NegLabel's mining excludes these lexicon files; NegAlign's split threshold.
DEFAULT_EXCLUDE = ("noun.person", "noun.quantity", "noun.group", "adj.pert")
DEFAULT_TOP_P = 0.15
DEFAULT_TAU = 0.05
# The roles a split gives each negative (compute/vocab.py assigns them; here for torch-free readers).
ROLE_OBJECT, ROLE_BACKGROUND, ROLE_AMBIGUOUS = "obj", "bg", "ambiguous"
ROLES = (ROLE_OBJECT, ROLE_BACKGROUND, ROLE_AMBIGUOUS)

# Images with more pixels than this are skipped, never decoded (PIL's decompression-bomb limit).
DEFAULT_MAX_PIXELS = 89_478_485

# Where the word goes in a prompt template.
PLACEHOLDER = "{}"

# The template set of the class prompts: `cam` aims its CAM at them, `score` encodes the classes with
# them (and `score` refuses a CAM made with other classes or templates).
CLASS_TEMPLATES = "noun"

# `negalign report`: CAM overlays of the most and of the least ID-like images, per set.
DEFAULT_REPORT_CELLS = 4
