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


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs 'initialized randomly' and download errors itself; we report our own."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(previous)


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


def load_model(
    name: str,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> LoadedModel:
    """Build ``name`` with weights from ``pretrained`` and put it in eval mode on ``device``.

    Raises :class:`NegalignError` with a one-line explanation for anything the user can fix.
    """
    from negalign_cli.settings import check_precision, torch_dtype

    open_clip = _open_clip()
    device = torch.device(device)
    if name == DEFAULT_MODEL and not pretrained:
        pretrained = DEFAULT_PRETRAINED
    precision = check_precision(precision)
    project = PROJECT_MODELS.get(name)
    is_local_dir = name.startswith("local-dir:")
    if not is_local_dir and project is None and name not in open_clip.list_models():
        raise NegalignError(f"unknown model architecture {name!r}: `negalign models` lists the known ones")
    tags = [] if is_local_dir else list(open_clip.list_pretrained_tags_by_model(name))
    if is_local_dir and pretrained:
        raise NegalignError("a local-dir: model carries its own weights; drop --pretrained")

    checkpoint: Path | None = None
    tag: str | None = None
    seed: int | None = None
    if is_local_dir:
        weights = name.removeprefix("local-dir:")
        if not Path(weights).is_dir():
            raise NegalignError(f"model folder not found: {weights}")
    elif (pretrained is None or pretrained == "") and project is not None and project.checkpoint is not None:
        checkpoint = bundled_checkpoint(project)
        if not checkpoint.is_file():
            raise NegalignError(
                f"the bundled {name} checkpoint is missing ({checkpoint}); regenerate it with "
                "`negalign toy train --install` or pass --pretrained PATH"
            )
        weights = f"bundled checkpoint {project.checkpoint}"
    elif pretrained is None or pretrained == "":
        if project is None or project.seed is None:
            raise NegalignError(f"model {name} needs weights: {_weights_hint(name, tags)}")
        seed = project.seed
        weights = f"random init, seed {seed}"
    elif pretrained.lower() == RANDOM:
        seed = project.seed if project is not None and project.seed is not None else DEFAULT_RANDOM_SEED
        weights = f"random init, seed {seed}"
    elif Path(pretrained).expanduser().is_file():
        checkpoint = Path(pretrained).expanduser().resolve()
        weights = str(checkpoint)
    elif pretrained in tags:
        tag = pretrained
        weights = f"open_clip tag {tag}"
    elif Path(pretrained).expanduser().exists():
        raise NegalignError(f"--pretrained {pretrained} is a folder, not a checkpoint file")
    elif _looks_like_path(pretrained):
        raise NegalignError(f"checkpoint not found: {pretrained}")
    else:
        raise NegalignError(
            f"--pretrained {pretrained!r} is neither a file nor a tag of {name}: {_weights_hint(name, tags)}"
        )

    quick_gelu = False
    if tag is not None:
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    if checkpoint is not None and is_torchscript_archive(checkpoint):
        quick_gelu = True  # OpenAI's released CLIP models all use QuickGELU

    with _quiet_open_clip():
        try:
            if is_local_dir:
                model = open_clip.create_model(name, device="cpu")
            elif tag is not None:
                model = open_clip.create_model(
                    name, pretrained=tag, device="cpu", force_quick_gelu=quick_gelu
                )
            else:
                with _seeded(seed if seed is not None else DEFAULT_RANDOM_SEED):
                    model = open_clip.create_model(
                        name, pretrained=None, device="cpu", force_quick_gelu=quick_gelu
                    )
        except NegalignError:
            raise
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors for a failed download
            if tag is not None:
                fail_fast = "" if os.environ.get("HF_HUB_OFFLINE") else "; set HF_HUB_OFFLINE=1 to fail fast"
                raise NegalignError(
                    f"could not get the weights {name}/{tag} ({_first_line(exc, 120)}); offline? Download "
                    f"them elsewhere and pass --pretrained /path/to/{name}.bin, or try the bundled toy "
                    f"model with --model negalign-toy{fail_fast}"
                ) from exc
            raise NegalignError(f"could not build model {name}: {_first_line(exc)}") from exc
        if checkpoint is not None:
            _load_checkpoint(open_clip, model, checkpoint, name)

    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = _resolved_config(open_clip, name, quick_gelu)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    fingerprint = model_fingerprint(model, config, preprocess_cfg)
    model.to(device)
    if precision != "fp32":
        open_clip.model.convert_weights_to_lp(model, dtype=torch_dtype(precision))
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(
        name=name,
        pretrained=pretrained,
        weights=weights,
        model=model,
        tokenizer=tokenizer,
        preprocess_cfg=preprocess_cfg,
        config=config,
        fingerprint=fingerprint,
        device=device,
        precision=precision,
        random_weights=seed is not None,
    )


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
        raise NegalignError(f"could not load {path} as {name} weights: {_first_line(exc)}") from exc
