"""CLIP models: open_clip architectures plus the project's own tiny ones.

A model is an open_clip architecture name and a weights source (``--pretrained``): an open_clip
tag (downloaded by open_clip, needs the network once), a local checkpoint file (open_clip state
dict, training checkpoint with ``state_dict``, ``.safetensors``, ``.bin``, or an OpenAI TorchScript
archive), or ``random`` (seeded random init, for speed tests). Project models such as
``negalign-tiny-test`` need no ``--pretrained``.

Every loaded model carries a fingerprint: sha256 over its configuration, its preprocessing and
the bytes of every weight, taken before any precision cast. Cache keys use it, so a changed weight
never reuses a stale embedding.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from negalign_cli.assets import model_config_dir
from negalign_cli.defaults import COMPILE_MODES, DEFAULT_COMPILE, DEFAULT_MODEL, DEFAULT_PRETRAINED
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import canonical_json
from negalign_cli.lazy import lazy_module
from negalign_cli.model_names import resolve_model_name  # names, checked without torch
from negalign_cli.modelref import (  # noqa: F401  (re-exported: the torch-free half lives there)
    CHECKPOINT_SUFFIXES,
    DEFAULT_RANDOM_SEED,
    PROJECT_MODELS,
    RANDOM,
    ProjectModel,
    WeightsSource,
    bundled_checkpoint,
    looks_like_path,
    resolve_source,
    weights_hint,
)
from negalign_cli.reporting import NullReporter, Reporter

if TYPE_CHECKING:
    import torch

    from negalign_cli.compute.vision import CamBatch, CamConfig, TowerPasses
else:  # imported when a model is built or run: importing this module (the API's) stays light
    torch = lazy_module("torch", live=True)

_T = TypeVar("_T")


@dataclass(frozen=True)
class ArchInfo:
    name: str
    source: str  # "negalign" or "open_clip"
    needs_weights: bool
    tags: tuple[str, ...]
    description: str = ""


@dataclass
class LoadedModel:
    """A model ready for inference, with what cache keys need to know about it."""

    name: str
    pretrained: str | None
    weights: str  # human-readable weights source
    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    preprocess_cfg: dict[str, Any]
    config: dict[str, Any]
    fingerprint: str
    device: torch.device
    precision: str
    random_weights: bool = False  # a seeded random init: numbers mean nothing (tests, speed)
    compile: str = DEFAULT_COMPILE  # `--compile`: auto (on for CUDA), on, off (see ImageTower)
    compile_cache: Path | None = None  # where torch inductor keeps compiled artifacts (the cache's)
    _tower: ImageTower | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def tower(self) -> ImageTower:
        """The image tower's passes, compiled or eager as ``compile`` and the device say (made once,
        so compiled code is reused for every batch)."""
        if self._tower is None:
            self._tower = ImageTower(
                self.model, compile_wanted(self.compile, self.device), self.compile_cache
            )
        return self._tower

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(
            getattr(self.tokenizer, "context_length", self.config["text_cfg"].get("context_length", 77))
        )

    @property
    def image_size(self) -> int:
        """The side of the square the preprocessing crops to."""
        size = self.preprocess_cfg["size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the image tower takes its pixels in: that of its first convolution or linear
        layer (under fp16/bf16 open_clip casts those, but keeps the class and position embeddings,
        which come first among the parameters, in float32)."""
        visual = getattr(self.model, "visual", self.model)
        for module in visual.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                return module.weight.dtype
        return next(self.model.parameters()).dtype

    def to_input(self, pixels: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Preprocessed pixels moved to the model's device, then cast to its ``input_dtype``
        (on the device, so an fp16 model's batch crosses the bus once, as it is)."""
        return pixels.to(self.device, non_blocking=non_blocking).to(self.input_dtype)

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:16]

    @property
    def vision_blocks(self) -> int:
        """The number of transformer blocks of the ViT image tower (a one-line error otherwise)."""
        from negalign_cli.compute.vision import vision_tower

        return len(vision_tower(self.model).blocks)

    @property
    def grid(self) -> tuple[int, int]:
        """The ViT image tower's patch grid (a one-line error for a tower Grad-CAM cannot use)."""
        from negalign_cli.compute.vision import vision_tower

        return vision_tower(self.model).grid

    def image_transform(self):
        """open_clip's evaluation preprocessing for this model (resize, centre crop, normalise)."""
        return preprocess_transform(self.preprocess_cfg)

    def describe(self) -> str:
        where = f"{self.device}, {self.precision}"
        return f"{self.name} ({self.weights}; fingerprint {self.short_fingerprint}; {where})"


# --------------------------------------------------------------------------- torch.compile
def check_compile(mode: str) -> str:
    """The normalised ``--compile`` value, or a one-line error naming the valid ones."""
    key = str(mode).strip().lower()
    if key not in COMPILE_MODES:
        raise NegalignError(f"unknown --compile {mode!r}: use {', '.join(COMPILE_MODES)}")
    return key


def compile_wanted(mode: str, device: torch.device | str) -> bool:
    """Whether the image tower is compiled: ``on``, or ``auto`` on a CUDA device."""
    key = check_compile(mode)
    return key == "on" or (key == "auto" and torch.device(str(device)).type == "cuda")


_OUR_INDUCTOR_CACHES: set[str] = set()


def use_compile_cache(folder: Path | None) -> None:
    """torch inductor's cache (FX and autograd graphs, generated kernels; Triton's kernels go below
    it) in ``folder``, so a compiled tower is reused by the next process; a
    ``TORCHINDUCTOR_CACHE_DIR`` the user set is kept."""
    if folder is None:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    theirs = current is not None and current not in _OUR_INDUCTOR_CACHES
    if theirs and os.path.abspath(str(current)) != os.path.abspath(default_cache_dir()):
        return  # the user's choice (inductor itself writes its default there once it has run)
    folder = folder.expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    _OUR_INDUCTOR_CACHES.add(str(folder))


class ImageTower:
    """The image tower of one model, run as :class:`compute.vision.TowerPasses`: each pass
    compiled with ``torch.compile`` (on first use, kept in the inductor cache under ``cache``) when
    ``compiled``, eager otherwise. A compile that fails (no C compiler, no Triton, a graph dynamo
    cannot trace) falls back to the eager passes for the rest of the process, with one warning.
    Compiled and eager outputs agree within float rounding (docs/performance.md), so the setting is
    not part of any cache key."""

    def __init__(self, module: torch.nn.Module, compiled: bool, cache: Path | None = None) -> None:
        self.module = module
        self.requested = compiled
        self.failure: str | None = None  # why compiling failed, once it has
        self._cache = cache
        self._compiled: TowerPasses | None = None

    @property
    def compiled(self) -> bool:
        """Whether the compiled passes are in use (asked for, and not failed)."""
        return self.requested and self.failure is None

    def passes(self) -> TowerPasses:
        from negalign_cli.compute.vision import EAGER_PASSES, TowerPasses, back_pass, encode_pass, front_pass

        if not self.compiled:
            return EAGER_PASSES
        if self._compiled is None:
            use_compile_cache(self._cache)
            self._compiled = TowerPasses(
                encode=torch.compile(encode_pass),
                front=torch.compile(front_pass),
                back=torch.compile(back_pass),
            )
        return self._compiled

    def run(self, step: Callable[[TowerPasses], _T], reporter: Reporter | None = None) -> _T:
        """``step`` with the compiled passes, or with the eager ones where compiling is off or fails
        (then once more with them: the passes are pure)."""
        from negalign_cli.compute.vision import EAGER_PASSES

        passes = self.passes()
        if passes is EAGER_PASSES:
            return step(passes)
        try:
            return step(passes)
        except (NegalignError, torch.OutOfMemoryError):
            raise  # not the compiler's: the eager passes would fail alike
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {_first_line(exc, 160)}"
            (reporter or NullReporter()).warn(
                f"torch.compile of the image tower failed ({self.failure}); running it eagerly from now "
                "on (--compile off skips compiling)"
            )
            return step(EAGER_PASSES)

    def encode(self, images: torch.Tensor, reporter: Reporter | None = None) -> torch.Tensor:
        """:func:`compute.vision.encode_images` through these passes."""
        from negalign_cli.compute.vision import encode_images

        return self.run(lambda passes: encode_images(self.module, images, passes), reporter)

    def cam(
        self,
        images: torch.Tensor,
        class_features: torch.Tensor,
        config: CamConfig,
        reporter: Reporter | None = None,
    ) -> CamBatch:
        """:func:`compute.vision.cam_batch` through these passes."""
        from negalign_cli.compute.vision import cam_batch

        return self.run(
            lambda passes: cam_batch(self.module, images, class_features, config, passes), reporter
        )


def preprocess_transform(cfg: dict[str, Any]):
    """open_clip's evaluation preprocessing (resize, centre crop, normalise) of a preprocessing
    config: no model is needed."""
    import open_clip

    return open_clip.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
        fill_color=cfg.get("fill_color", 0),
    )


# --------------------------------------------------------------------------- registry
_REGISTERED = False


def _open_clip():
    global _REGISTERED
    import open_clip

    if not _REGISTERED:
        open_clip.add_model_config(model_config_dir())
        _REGISTERED = True
    return open_clip


def list_architectures() -> list[ArchInfo]:
    """The project's models first, then every open_clip architecture with its weight tags."""
    open_clip = _open_clip()
    tags: dict[str, list[str]] = {}
    for arch, tag in open_clip.list_pretrained():
        tags.setdefault(arch, []).append(tag)
    infos = [
        ArchInfo(m.name, "negalign", needs_weights=m.seed is None, tags=(), description=m.description)
        for m in PROJECT_MODELS.values()
    ]
    for arch in open_clip.list_models():
        if arch in PROJECT_MODELS:
            continue
        infos.append(ArchInfo(arch, "open_clip", needs_weights=True, tags=tuple(tags.get(arch, ()))))
    return infos


# --------------------------------------------------------------------------- fingerprint
def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, config: dict[str, Any], preprocess_cfg: dict[str, Any]) -> str:
    described = canonical_json({"config": config, "preprocess": preprocess_cfg})
    return hashlib.sha256(f"{described}|{weights_digest(model)}".encode()).hexdigest()


# --------------------------------------------------------------------------- loading
@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _NotFromOpenClip(logging.Filter):
    """Drops the records open_clip's own code logs (through the root logger's functions)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.folder)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs 'initialized randomly' and download errors itself with ``logging.info`` and
    ``logging.warning`` on the root logger; we report our own. Only records from open_clip's files
    are dropped, only while a model is built: every other logger keeps its level."""
    import open_clip

    quiet = _NotFromOpenClip(os.path.dirname(open_clip.__file__))
    root = logging.getLogger()
    root.addFilter(quiet)
    # logging.info() on a root logger without handlers installs one (basicConfig) for good, and every
    # library logger then prints twice (huggingface_hub's retries: its own line, then the root's)
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        if placeholder is not None:
            root.removeHandler(placeholder)


def is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --------------------------------------------------------------------------- open_clip tags, offline
HUB_PROBE_TIMEOUT = 5.0  # seconds one request may take to tell whether the hub answers
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it once,
    when imported): HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    from negalign_cli.settings import user_cache_home

    env = os.environ
    home = env.get("HF_HOME") or os.path.join(user_cache_home(), "huggingface")
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def _hub_files(open_clip, name: str, tag: str) -> tuple[str, tuple[str, ...]] | None:
    """(repo id, the file names open_clip tries in turn) of a tag's weights on the Hugging Face
    hub, or None where open_clip fetches them otherwise (a URL of their own)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    if not hub or "file" in cfg or not open_clip.pretrained.has_hf_hub():
        return None
    repo_id, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return repo_id, (HF_SAFE_WEIGHTS_NAME, filename)
    if filename.endswith((".bin", ".pth")):
        return repo_id, (filename[:-4] + ".safetensors", filename)
    return repo_id, (filename,)


def _hub_unreachable(repo_id: str, filename: str) -> str | None:
    """Why the hub cannot give ``filename`` now (offline mode, no network, no answer), or None
    when it answers. One request, no retries: huggingface_hub's own download retries five times
    per file, with back-off, before it gives up (about a minute for a tag)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if offline.strip().upper() in _TRUE or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        url = hf_hub_url(repo_id, filename, endpoint=endpoint)
        get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT, endpoint=endpoint)
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status in (408, 429) or status >= 500:
            return f"the hub at {endpoint} does not answer (HTTP {status})"
        return None  # the hub answered (a missing file, a gated repository): the download says what
    except Exception as exc:  # no network, no name resolution, a proxy that refuses
        return f"the hub at {endpoint} cannot be reached ({type(exc).__name__}: {_first_line(exc, 80)})"
    return None


def _hub_weights_cached(open_clip, name: str, tag: str) -> bool:
    """Whether the weights of an open_clip tag are in the Hugging Face cache (then they are loaded
    with no request at all). When they are not and the hub cannot be reached, a one-line
    :class:`NegalignError` now, in a second or so, instead of a minute of retries."""
    files = _hub_files(open_clip, name, tag)
    if files is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo_id, names = files
    cache = hub_cache_dir()
    if any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache), str) for f in names):
        return True
    reason = _hub_unreachable(repo_id, names[-1])
    if reason is not None:
        raise NegalignError(
            f"could not get the weights {name}/{tag}: they are not in the Hugging Face cache ({cache}) and "
            f"{reason}; {_no_download_hint(name, repo_id)}"
        )
    return False


def _no_download_hint(name: str, repo_id: str | None = None) -> str:
    fill = f"`hf download {repo_id}`" if repo_id else "a first run"
    return (
        f"pass --pretrained PATH (a {name} checkpoint file), or fill the cache where there is a network "
        f"({fill}, then copy HF_HOME here), or try the bundled toy model with --model negalign-toy"
    )


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub in offline mode while open_clip fetches weights that are in the cache: the
    cached file, with no request (and no retries where there is no network)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def open_clip_tags(name: str) -> list[str]:
    """open_clip's weight tags of architecture ``name`` (imports open_clip)."""
    return list(_open_clip().list_pretrained_tags_by_model(name))


def resolve_weights(name: str, pretrained: str | None) -> WeightsSource:
    """Check ``name`` and ``pretrained`` and say where the weights come from (no model is built):
    :func:`negalign_cli.modelref.resolve_source`, plus what needs open_clip: an open_clip tag is
    checked against the architecture's tags, and whether its weights are cached (or can be
    downloaded now).

    Raises :class:`NegalignError` with a one-line explanation for anything the user can fix."""
    source = resolve_source(name, pretrained)
    if source.tag is None:
        return source
    open_clip = _open_clip()
    tags = open_clip_tags(name)
    if source.tag in tags:
        return WeightsSource(
            source.description, tag=source.tag, hub_cached=_hub_weights_cached(open_clip, name, source.tag)
        )
    if Path(source.tag).expanduser().exists():
        raise NegalignError(f"--pretrained {source.tag} is a folder, not a checkpoint file")
    raise NegalignError(
        f"--pretrained {source.tag!r} is neither a file nor a tag of {name}: {weights_hint(name, tags)}"
    )


def tag_weights_file(name: str, tag: str) -> str | None:
    """The file of an open_clip tag's weights in the Hugging Face cache, if it is there."""
    open_clip = _open_clip()
    files = _hub_files(open_clip, name, tag)
    if files is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, names = files
    for filename in names:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir())
        if isinstance(found, str):
            return found
    return None


def vision_summary(model: torch.nn.Module) -> dict[str, Any]:
    """The image tower's sizes Grad-CAM needs (blocks, patch grid), or the one-line error
    :func:`compute.vision.vision_tower` gives for a tower it cannot use (kept in the fingerprint
    table, so a planning step knows them without the model)."""
    from negalign_cli.compute.vision import vision_tower

    try:
        tower = vision_tower(model)
    except NegalignError as exc:
        return {"error": str(exc)}
    return {"blocks": len(tower.blocks), "grid": list(tower.grid), "patch": list(tower.patch)}


def check_weights(name: str, pretrained: str | None = None) -> tuple[str, str | None, WeightsSource]:
    """``(architecture, weights, where they come from)`` for ``--model``/``--pretrained`` as given,
    without building the model: commands call it before they read any image, so a wrong name,
    a missing file or weights that cannot be downloaded fail at once. OpenAI's names
    (``ViT-B/16``) are open_clip's (``ViT-B-16``) with OpenAI's weights; so is ``ViT-B-16`` alone
    (the field's standard)."""
    name, pretrained = resolve_model_name(name, pretrained)
    if name == DEFAULT_MODEL and not pretrained:
        pretrained = DEFAULT_PRETRAINED
    return name, pretrained, resolve_weights(name, pretrained)


def _build(name: str, source: WeightsSource, random_quick_gelu: bool = False) -> tuple[torch.nn.Module, bool]:
    """The open_clip model with its weights on the CPU, and whether it uses QuickGELU (for random
    weights: ``random_quick_gelu``)."""
    open_clip = _open_clip()
    quick_gelu = random_quick_gelu and source.random
    if source.tag is not None:
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, source.tag).get("quick_gelu", False))
    if source.checkpoint is not None and is_torchscript_archive(source.checkpoint):
        quick_gelu = True  # OpenAI's released CLIP models all use QuickGELU
    with _quiet_open_clip():
        try:
            if source.local_dir:
                model = open_clip.create_model(name, device="cpu")
            elif source.tag is not None:
                with _hub_offline(source.hub_cached):
                    model = open_clip.create_model(
                        name,
                        pretrained=source.tag,
                        device="cpu",
                        force_quick_gelu=quick_gelu,
                        # the cache looked in (a tag fetched from a URL keeps open_clip's own folder)
                        cache_dir=str(hub_cache_dir()) if _hub_files(open_clip, name, source.tag) else None,
                    )
            else:
                with _seeded(source.seed if source.seed is not None else DEFAULT_RANDOM_SEED):
                    model = open_clip.create_model(
                        name, pretrained=None, device="cpu", force_quick_gelu=quick_gelu
                    )
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for a failed download
            if source.tag is not None:
                raise NegalignError(
                    f"could not get the weights {name}/{source.tag} ({_first_line(exc, 120)}): "
                    f"{_no_download_hint(name)}"
                ) from exc
            raise NegalignError(f"could not build model {name}: {_first_line(exc)}") from exc
        if source.checkpoint is not None:
            _load_checkpoint(open_clip, model, source.checkpoint, name)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, quick_gelu


def load_model(
    name: str,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    random_quick_gelu: bool = False,
    compile: str = DEFAULT_COMPILE,
    compile_cache: Path | None = None,
) -> LoadedModel:
    """Build ``name`` with weights from ``pretrained`` and put it in eval mode on ``device``.
    ``ViT-B-16`` without ``pretrained`` means OpenAI's weights (the field's standard); OpenAI's names
    (``ViT-B/16``) are open_clip's with OpenAI's weights (:func:`check_weights`). Random weights
    build open_clip's GELU config unless ``random_quick_gelu`` (the architecture OpenAI's weights
    run: :func:`openai_quick_gelu`). ``compile`` (auto, on, off) says whether ``tower`` runs the
    image tower through ``torch.compile`` (auto: on CUDA only), keeping its artifacts in
    ``compile_cache``.

    Raises :class:`NegalignError` with a one-line explanation for anything the user can fix.
    """
    from negalign_cli.settings import check_precision, torch_dtype

    precision = check_precision(precision)
    compile = check_compile(compile)
    name, pretrained, source = check_weights(name, pretrained)
    model, quick_gelu = _build(name, source, random_quick_gelu)
    open_clip = _open_clip()
    config = _resolved_config(open_clip, name, quick_gelu)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    fingerprint = model_fingerprint(model, config, preprocess_cfg)
    device = torch.device(device)
    model.to(device)
    if precision != "fp32":
        to_low_precision(model, torch_dtype(precision))
    with _quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(
        name=name,
        pretrained=pretrained,
        weights=source.description,
        model=model,
        tokenizer=tokenizer,
        preprocess_cfg=preprocess_cfg,
        config=config,
        fingerprint=fingerprint,
        device=device,
        precision=precision,
        random_weights=source.random,
        compile=compile,
        compile_cache=compile_cache,
    )


def openai_quick_gelu(name: str) -> bool:
    """Whether ``name``'s OpenAI weights (the default ``--pretrained`` of ViT-B-16) run QuickGELU:
    the activation a speed test with random weights should use to time what users run."""
    open_clip = _open_clip()
    if (
        name not in open_clip.list_models()
        or DEFAULT_PRETRAINED not in open_clip.list_pretrained_tags_by_model(name)
    ):
        return False
    return bool(open_clip.get_pretrained_cfg(name, DEFAULT_PRETRAINED).get("quick_gelu", False))


def to_low_precision(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """fp16/bf16 weights the way open_clip's own ``create_model(precision=...)`` makes them: the
    matrices cast (``convert_weights_to_lp``), the layer norms kept in float32 and run on float32
    inputs (``LayerNormFp32``). Casting the matrices alone leaves layer norms whose float32 weights
    meet fp16 inputs, which the CPU kernels accept and the CUDA kernels refuse."""
    import open_clip
    from open_clip.transformer import LayerNorm, LayerNormFp32

    open_clip.model.convert_weights_to_lp(model, dtype=dtype)
    for module in model.modules():
        if type(module) in (LayerNorm, torch.nn.LayerNorm):
            module.__class__ = LayerNormFp32


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened at a word boundary."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,:;") + " …"


def _resolved_config(open_clip, name: str, quick_gelu: bool) -> dict[str, Any]:
    config = open_clip.get_model_config(name) or {}
    if quick_gelu:
        config["quick_gelu"] = True
    return config


def _load_checkpoint(open_clip, model: torch.nn.Module, path: Path, name: str) -> None:
    try:
        if is_torchscript_archive(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            # scalars OpenAI's archives carry, and the causal mask (a non-persistent buffer here)
            for extra in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                state.pop(extra, None)
            model.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True)
    except Exception as exc:
        raise NegalignError(
            f"could not load {path} as {name} weights ({type(exc).__name__}: {_first_line(exc)}): it is "
            "not an open_clip state dict, a training checkpoint, a .safetensors file or an OpenAI archive "
            f"of {name}"
        ) from exc
