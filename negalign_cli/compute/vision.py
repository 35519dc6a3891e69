"""Image embeddings, batched Grad-CAM at ``ln_1`` and background embeddings (docs/maths.md). Pure.

One forward per batch yields the image embedding, the hooked block's activation and the final
tokens. The activation is the output of ``ln_1`` of block ``b`` (the normalised block input that
feeds attention), replaced by a detached leaf so that the backward pass covers only what follows
it; the target is the cosine between the image embedding and the predicted class's text feature,
summed over the batch (each image's gradient equals a single-image run: a ViT never mixes images).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# CAM settings and the row layout are torch-free (planning reads them there); re-exported here for
# the modules that import them with the CAM maths (stages/images.py, api.py)
from negalign_cli.compute.cam_layout import CamConfig as CamConfig
from negalign_cli.compute.cam_layout import CamRows as CamRows
from negalign_cli.compute.cam_layout import cam_row_width as cam_row_width
from negalign_cli.compute.cam_layout import registered
from negalign_cli.compute.cam_layout import unpack_cam_rows as unpack_cam_rows
from negalign_cli.compute.quantile import percentile as exact_percentile
from negalign_cli.compute.types import OpenClipModule
from negalign_cli.defaults import BG_POOLS, CAM_METHODS
from negalign_cli.errors import NegalignError


@dataclass(frozen=True)
class VisionTower:
    """The parts of an open_clip ViT that CAM and background pooling use."""

    visual: OpenClipModule
    blocks: OpenClipModule  # the transformer's ModuleList of residual blocks
    grid: tuple[int, int]
    patch: tuple[int, int]
    batch_first: bool


def vision_tower(model: OpenClipModule) -> VisionTower:
    """Check that ``model`` has an open_clip ViT image tower with a class token; explain if not."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__ if visual is not None else "no image tower"
        raise NegalignError(
            f"Grad-CAM and background pooling need an open_clip ViT image tower; this model has {kind} "
            "(timm and ResNet towers are not supported)"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise NegalignError(
            "Grad-CAM here needs a class-token ViT (pool_type 'tok', no attention pooling); this tower pools "
            f"with {visual.pool_type!r}{' and an attention pooler' if visual.attn_pool is not None else ''}"
        )
    grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
    patch = (int(visual.patch_size[0]), int(visual.patch_size[1]))
    return VisionTower(
        visual, visual.transformer.resblocks, grid, patch, bool(visual.transformer.batch_first)
    )


@torch.inference_mode()
def encode_images(model: OpenClipModule, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, float32."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


@dataclass
class CamBatch:
    embeddings: torch.Tensor  # (B, D) float32, normalised
    pred_class: torch.Tensor  # (B,) int64
    pred_score: torch.Tensor  # (B,) cosine to the predicted class
    cams: torch.Tensor  # (B, h, w) float32
    foreground: torch.Tensor  # (B, h, w) bool, after dilation
    valid: torch.Tensor  # (B,) bool
    background: torch.Tensor  # (B, D) float32, normalised; the whole image pooled where invalid


def pack_cam_rows(batch: CamBatch) -> np.ndarray:
    """One float32 row per image (the per-image cache's layout; :func:`unpack_cam_rows` reads it)."""
    meta = torch.stack(
        [
            batch.pred_class.float(),
            batch.pred_score.float(),
            batch.valid.float(),
            batch.foreground.flatten(1).float().mean(1),
        ],
        dim=1,
    )
    parts = [
        batch.background.float(),
        batch.cams.flatten(1).float(),
        batch.foreground.flatten(1).float(),
        meta,
    ]
    return torch.cat([part.cpu() for part in parts], dim=1).numpy()


class _Capture:
    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None
        self.final: torch.Tensor | None = None
        self.last_input: torch.Tensor | None = None

    def require(self, name: str) -> torch.Tensor:
        """A captured tensor; a hook that never fired is a bug in the tower check."""
        value = getattr(self, name)
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(f"the forward pass did not reach the hook that captures {name!r}")
        return value


@contextlib.contextmanager
def _hooks(tower: VisionTower, block: int, detach: bool = True) -> Iterator[_Capture]:
    capture = _Capture()

    def on_ln1(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if detach:
            leaf = output.detach().requires_grad_(True)
            capture.activation = leaf
            return leaf
        output.retain_grad()
        capture.activation = output
        return output

    def on_transformer(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        capture.final = output.detach()

    def before_last(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        capture.last_input = args[0].detach()

    handles = [
        tower.blocks[block].ln_1.register_forward_hook(on_ln1),
        tower.visual.transformer.register_forward_hook(on_transformer),
        tower.blocks[-1].register_forward_pre_hook(before_last),
    ]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def _batch_first(tensor: torch.Tensor, tower: VisionTower) -> torch.Tensor:
    return tensor if tower.batch_first else tensor.transpose(0, 1)


def gradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_c w_c·A_c) per patch token, w_c the gradient averaged over patch tokens."""
    weights = gradient.mean(dim=1, keepdim=True)
    return F.relu((activation * weights).sum(dim=-1))


def gradxact(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """|Σ_c g_c·A_c| per patch token (no channel averaging)."""
    return (activation * gradient).sum(dim=-1).abs()


# The CAM methods, by the name `--cam-method` takes (defaults.CAM_METHODS lists the same names).
CAM_METHOD_REGISTRY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam,
    "gradxact": gradxact,
}


def cam_from_gradients(activation: torch.Tensor, gradient: torch.Tensor, method: str) -> torch.Tensor:
    """Patch-token relevance (B, HW) from the hooked activation and its gradient (B, 1+HW, C), by
    the registered ``method`` (``gradcam`` or ``gradxact``); an unknown name is refused."""
    function = registered(CAM_METHOD_REGISTRY, method, "--cam-method")
    return function(activation[:, 1:].float(), gradient[:, 1:].float())


def foreground_mask(cams: torch.Tensor, percentile: float, dilate: int) -> torch.Tensor:
    """Patches at or above the per-image percentile of the CAM (strictly positive ones when that
    percentile is 0), dilated by ``dilate`` patches (3×3 neighbourhood).

    The percentile is the exact order statistic with linear interpolation, compared in float64
    (:func:`negalign_cli.compute.quantile.percentile`): a float32 quantile drops the patch at the
    threshold on 4×4, 14×14 and 16×16 grids."""
    flat = cams.flatten(1).to(torch.float64)
    threshold = exact_percentile(flat, percentile, dim=1, keepdim=True)
    mask = torch.where(threshold > 0, flat >= threshold, flat > 0).view_as(cams)
    if dilate:
        grown = mask.float().unsqueeze(1)
        for _ in range(dilate):
            grown = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
        mask = grown.squeeze(1) > 0
    return mask


def _project(visual: OpenClipModule, tokens: torch.Tensor) -> torch.Tensor:
    tokens = visual.ln_post(tokens)
    return tokens @ visual.proj if visual.proj is not None else tokens


def maskclip_tokens(tower: VisionTower, block_input: torch.Tensor) -> torch.Tensor:
    """Last block's value path: out_proj(V(ln_1(x))) + x, then its MLP with residual, ln_post, proj."""
    block = tower.blocks[-1]
    width = block_input.shape[-1]
    hidden = block.ln_1(block_input)
    value = F.linear(hidden, block.attn.in_proj_weight[2 * width :], block.attn.in_proj_bias[2 * width :])
    x = block_input + block.ls_1(block.attn.out_proj(value))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return _project(tower.visual, x[:, 1:])


def clearclip_tokens(tower: VisionTower, block_input: torch.Tensor) -> torch.Tensor:
    """Last block's attention as softmax(q·qᵀ)·v through out_proj; no residual, no MLP; ln_post, proj."""
    block = tower.blocks[-1]
    attention = block.attn
    b, length, width = block_input.shape
    heads = attention.num_heads
    q, _, v = F.linear(block.ln_1(block_input), attention.in_proj_weight, attention.in_proj_bias).chunk(
        3, dim=-1
    )
    q = q.reshape(b, length, heads, -1).transpose(1, 2)
    v = v.reshape(b, length, heads, -1).transpose(1, 2)
    weights = torch.softmax(q @ q.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    x = (weights @ v).transpose(1, 2).reshape(b, length, width)
    return _project(tower.visual, attention.out_proj(x)[:, 1:])


def masked_mean(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the kept tokens (B, HW, D) per image, L2-normalised; zero where none is kept."""
    weights = keep.flatten(1).to(tokens.dtype).unsqueeze(-1)
    total = (tokens * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp_min(1.0)
    return F.normalize(total / count, dim=-1)


def fill_foreground(images: torch.Tensor, foreground: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Normalised images with foreground patches set to 0, i.e. to the preprocessing mean."""
    pixels = foreground.repeat_interleave(patch[0], dim=1).repeat_interleave(patch[1], dim=2)
    pixels = pixels[:, : images.shape[-2], : images.shape[-1]]
    return images.masked_fill(pixels.unsqueeze(1), 0.0)


BackgroundPool = Callable[[OpenClipModule, VisionTower, torch.Tensor, _Capture, torch.Tensor], torch.Tensor]


def pool_tokens(
    model: OpenClipModule, tower: VisionTower, images: torch.Tensor, capture: _Capture, keep: torch.Tensor
) -> torch.Tensor:
    """``tokens``: the mean of the final patch tokens (ln_post, proj) over the background patches."""
    tokens = _project(tower.visual, _batch_first(capture.require("final"), tower)[:, 1:])
    return masked_mean(tokens.float(), keep)


def pool_maskclip(
    model: OpenClipModule, tower: VisionTower, images: torch.Tensor, capture: _Capture, keep: torch.Tensor
) -> torch.Tensor:
    """``maskclip``: the last block's value path (:func:`maskclip_tokens`) over the background patches."""
    tokens = maskclip_tokens(tower, _batch_first(capture.require("last_input"), tower))
    return masked_mean(tokens.float(), keep)


def pool_clearclip(
    model: OpenClipModule, tower: VisionTower, images: torch.Tensor, capture: _Capture, keep: torch.Tensor
) -> torch.Tensor:
    """``clearclip``: the last block's q·q attention (:func:`clearclip_tokens`) over the background."""
    tokens = clearclip_tokens(tower, _batch_first(capture.require("last_input"), tower))
    return masked_mean(tokens.float(), keep)


def pool_mask(
    model: OpenClipModule, tower: VisionTower, images: torch.Tensor, capture: _Capture, keep: torch.Tensor
) -> torch.Tensor:
    """``mask``: the image re-encoded with its foreground patches set to the preprocessing mean."""
    filled = fill_foreground(images, ~keep, tower.patch)
    return F.normalize(model.encode_image(filled).float(), dim=-1)


# The background pools, by the name `--bg-pool` takes (defaults.BG_POOLS lists the same names).
BG_POOL_REGISTRY: dict[str, BackgroundPool] = {
    "tokens": pool_tokens,
    "maskclip": pool_maskclip,
    "clearclip": pool_clearclip,
    "mask": pool_mask,
}
if tuple(CAM_METHOD_REGISTRY) != CAM_METHODS or tuple(BG_POOL_REGISTRY) != BG_POOLS:
    raise RuntimeError("defaults.CAM_METHODS / BG_POOLS must name the registries of compute/vision.py")


def cam_batch(
    model: OpenClipModule, images: torch.Tensor, class_features: torch.Tensor, config: CamConfig
) -> CamBatch:
    """Embeddings, CAMs, foreground masks and background embeddings for one batch."""
    tower = vision_tower(model)
    class_features = class_features.to(images.device, torch.float32)
    with _hooks(tower, config.block) as capture, torch.enable_grad():
        embeddings = F.normalize(model.encode_image(images).float(), dim=-1)
        cosines = embeddings @ class_features.T
        pred_score, pred_class = cosines.max(dim=-1)
        hooked = capture.require("activation")
        (gradient,) = torch.autograd.grad(pred_score.sum(), hooked)
    activation = _batch_first(hooked.detach(), tower)
    gradient = _batch_first(gradient, tower)
    cams = cam_from_gradients(activation, gradient, config.method).view(-1, *tower.grid)
    foreground = foreground_mask(cams, config.fg_percentile, config.dilate)
    finite = torch.isfinite(cams).flatten(1).all(dim=1)
    valid = finite & (cams.flatten(1).amax(dim=1) > 0) & (~foreground).flatten(1).any(dim=1)
    # an invalid CAM pools the whole image (the fallback; `score --invalid-cam` decides its use)
    background_patches = ~foreground | ~valid.view(-1, 1, 1)
    pool = registered(BG_POOL_REGISTRY, config.bg_pool, "--bg-pool")
    with torch.inference_mode():
        background = pool(model, tower, images, capture, background_patches)
    return CamBatch(
        embeddings=embeddings.detach(),
        pred_class=pred_class.detach(),
        pred_score=pred_score.detach(),
        cams=torch.nan_to_num(cams.detach().float()),
        foreground=foreground,
        valid=valid,
        background=background.float(),
    )
