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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from negalign_cli.assets import model_config_dir
from negalign_cli.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import canonical_json

RANDOM = "random"
DEFAULT_RANDOM_SEED = 0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class ProjectModel:
    """An architecture the project defines itself (config in ``assets/model_configs``)."""

    name: str
    description: str
    seed: int | None = None  # random init from this seed when no --pretrained is given
    checkpoint: str | None = None  # bundled weights (under assets/models) used when no --pretrained is given


PROJECT_MODELS: dict[str, ProjectModel] = {
    "negalign-tiny-test": ProjectModel(
        name="negalign-tiny-test",
        description="ViT 32 px, patch 8, 2 layers, width 64; random init (seed 0); for tests and examples",
        seed=0,
    ),
    "negalign-toy": ProjectModel(
        name="negalign-toy",
        description="ViT 64 px, patch 8, 4 layers, width 128; trained on the toy world (model card: "
        "negalign_cli/assets/models/negalign-toy.md)",
        seed=0,
        checkpoint="models/negalign-toy.pt",
    ),
}


def bundled_checkpoint(project: ProjectModel) -> Path | None:
    if project.checkpoint is None:
        return None
    from negalign_cli.assets import asset_path

    return asset_path(project.checkpoint)


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

    def image_transform(self):
        """open_clip's evaluation preprocessing for this model (resize, centre crop, normalise)."""
        import open_clip

        cfg = self.preprocess_cfg
        return open_clip.image_transform(
            cfg["size"],
            is_train=False,
            mean=cfg.get("mean"),
            std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"),
            interpolation=cfg.get("interpolation"),
            fill_color=cfg.get("fill_color", 0),
        )

    def describe(self) -> str:
        where = f"{self.device}, {self.precision}"
        return f"{self.name} ({self.weights}; fingerprint {self.short_fingerprint}; {where})"


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
    try:
        yield
    finally:
        root.removeFilter(quiet)


def is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.lower().endswith(CHECKPOINT_SUFFIXES)


def _weights_hint(arch: str, tags: list[str]) -> str:
    shown = ", ".join(tags[:6]) + (", …" if len(tags) > 6 else "")
    tag_part = f"an open_clip tag ({shown}) to download, " if tags else ""
    return (
        f"pass --pretrained with {tag_part}a local checkpoint path such as --pretrained /path/to/{arch}.pt, "
        f"or --pretrained random for a seeded random init (speed tests only)"
    )


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from, resolved from ``--model`` and ``--pretrained``."""

    description: str  # human-readable, shown in messages and manifests
    tag: str | None = None  # an open_clip tag (downloaded by open_clip)
    checkpoint: Path | None = None  # a local checkpoint file
    seed: int | None = None  # a seeded random init
    local_dir: bool = False  # ``local-dir:`` models carry their own weights

    @property
    def random(self) -> bool:
        return self.seed is not None


def resolve_weights(name: str, pretrained: str | None) -> WeightsSource:
    """Check ``name`` and ``pretrained`` and say where the weights come from (no model is built).

    Raises :class:`NegalignError` with a one-line explanation for anything the user can fix."""
    open_clip = _open_clip()
    schema, identifier = open_clip.factory.parse_model_name(name)
    if schema == "local-dir":
        if pretrained:
            raise NegalignError("a local-dir: model carries its own weights; drop --pretrained")
        if not Path(identifier).is_dir():
            raise NegalignError(f"model folder not found: {identifier}")
        return WeightsSource(identifier, local_dir=True)
    project = PROJECT_MODELS.get(name)
    if project is None and name not in open_clip.list_models():
        raise NegalignError(f"unknown model architecture {name!r}: `negalign models` lists the known ones")
    tags = list(open_clip.list_pretrained_tags_by_model(name))
    if not pretrained:
        if project is not None and project.checkpoint is not None:
            checkpoint = bundled_checkpoint(project)
            if checkpoint is None or not checkpoint.is_file():
                raise NegalignError(
                    f"the bundled {name} checkpoint is missing ({checkpoint}); regenerate it with "
                    "`negalign toy train --install` or pass --pretrained PATH"
                )
            return WeightsSource(f"bundled checkpoint {project.checkpoint}", checkpoint=checkpoint)
        if project is None or project.seed is None:
            raise NegalignError(f"model {name} needs weights: {_weights_hint(name, tags)}")
        return WeightsSource(f"random init, seed {project.seed}", seed=project.seed)
    if pretrained.lower() == RANDOM:
        seed = project.seed if project is not None and project.seed is not None else DEFAULT_RANDOM_SEED
        return WeightsSource(f"random init, seed {seed}", seed=seed)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return WeightsSource(str(path.resolve()), checkpoint=path.resolve())
    if pretrained in tags:
        return WeightsSource(f"open_clip tag {pretrained}", tag=pretrained)
    if path.exists():
        raise NegalignError(f"--pretrained {pretrained} is a folder, not a checkpoint file")
    if _looks_like_path(pretrained):
        raise NegalignError(f"checkpoint not found: {pretrained}")
    raise NegalignError(
        f"--pretrained {pretrained!r} is neither a file nor a tag of {name}: {_weights_hint(name, tags)}"
    )


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
                model = open_clip.create_model(
                    name, pretrained=source.tag, device="cpu", force_quick_gelu=quick_gelu
                )
            else:
                with _seeded(source.seed if source.seed is not None else DEFAULT_RANDOM_SEED):
                    model = open_clip.create_model(
                        name, pretrained=None, device="cpu", force_quick_gelu=quick_gelu
                    )
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for a failed download
            if source.tag is not None:
                fail_fast = "" if os.environ.get("HF_HUB_OFFLINE") else "; set HF_HUB_OFFLINE=1 to fail fast"
                raise NegalignError(
                    f"could not get the weights {name}/{source.tag} ({_first_line(exc, 120)}); offline? "
                    f"Download them elsewhere and pass --pretrained /path/to/{name}.bin, or try the "
                    f"bundled toy model with --model negalign-toy{fail_fast}"
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
) -> LoadedModel:
    """Build ``name`` with weights from ``pretrained`` and put it in eval mode on ``device``.
    ``ViT-B-16`` without ``pretrained`` means OpenAI's weights (the field's standard). Random
    weights build open_clip's GELU config unless ``random_quick_gelu`` (the architecture OpenAI's
    weights run: :func:`openai_quick_gelu`).

    Raises :class:`NegalignError` with a one-line explanation for anything the user can fix.
    """
    from negalign_cli.settings import check_precision, torch_dtype

    if name == DEFAULT_MODEL and not pretrained:
        pretrained = DEFAULT_PRETRAINED
    precision = check_precision(precision)
    source = resolve_weights(name, pretrained)
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
