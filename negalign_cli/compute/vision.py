"""Image embeddings, batched Grad-CAM at ``ln_1`` and background embeddings (docs/maths.md). Pure.

One forward per batch yields the image embedding, the CAM block's activation and the final
tokens. The activation is the output of ``ln_1`` of block ``b`` (the normalised block input that
feeds attention). The forward runs in two passes (:class:`TowerPasses`): the blocks before ``b``
and that ``ln_1`` without autograd (:func:`front_pass`), then block ``b`` from a leaf holding the
activation, the blocks after it, pooling and projection with autograd (:func:`back_pass`), so the
backward pass covers only what follows the activation; the target is the cosine between the image
embedding and the predicted class's text feature, summed over the batch (each image's gradient
equals a single-image run: a ViT never mixes images). The passes are plain functions of the
module, so ``torch.compile`` can compile each (``models.ImageTower``); the CAM tail (percentile,
dilation, validity, the background patches: :func:`cam_masks`) is batched tensor work on the
model's device with no host synchronisation.
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
from negalign_cli.compute.quantile import percentile_of_sorted
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
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    residual = (ResidualAttentionBlock, CustomResidualAttentionBlock)  # what back_pass rebuilds
    unknown = sorted({type(b).__name__ for b in visual.transformer.resblocks if not isinstance(b, residual)})
    if unknown:
        raise NegalignError(
            f"Grad-CAM here needs open_clip's residual attention blocks; this tower has {', '.join(unknown)}"
        )
    grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
    patch = (int(visual.patch_size[0]), int(visual.patch_size[1]))
    return VisionTower(
        visual, visual.transformer.resblocks, grid, patch, bool(visual.transformer.batch_first)
    )


def encode_pass(model: OpenClipModule, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings, float32 (the pass ``encode_images`` runs)."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


def front_pass(visual: OpenClipModule, images: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower up to the CAM block ``block`` (an index ≥ 0), called without autograd: (the block's
    input, its ``ln_1`` output), both in the transformer's own layout. Exactly the operations of
    open_clip's ``VisionTransformer.forward`` up to there."""
    x = visual._embeds(images)
    if not visual.transformer.batch_first:
        x = x.transpose(0, 1).contiguous()  # NLD -> LND, as open_clip's Transformer.forward
    blocks = visual.transformer.resblocks
    for index in range(block):
        x = blocks[index](x)
    return x, blocks[block].ln_1(x)


def _attend(block: OpenClipModule, normed: torch.Tensor) -> torch.Tensor:
    """A residual block's attention branch from its ``ln_1`` output (before ``ls_1``)."""
    from open_clip.transformer import CustomResidualAttentionBlock

    if isinstance(block, CustomResidualAttentionBlock):
        out: torch.Tensor = block.ln_attn(block.attn(normed, attn_mask=None))
    else:
        out = block.attention(q_x=normed)
    return out


def back_pass(
    visual: OpenClipModule, x: torch.Tensor, leaf: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the CAM block's input ``x`` and its ``ln_1`` output ``leaf`` (what the gradient is taken
    against) on, with autograd: (the projected class token, the transformer's output, the last
    block's input), the last two in the transformer's own layout. Block ``block`` is open_clip's
    ``ResidualAttentionBlock.forward`` with ``ln_1(x)`` replaced by ``leaf``."""
    blocks = visual.transformer.resblocks
    current = blocks[block]
    y = x + current.ls_1(_attend(current, leaf))
    y = y + current.ls_2(current.mlp(current.ln_2(y)))
    last_input = x
    for index in range(block + 1, len(blocks)):
        last_input = y
        y = blocks[index](y)
    final = y
    tokens = final if visual.transformer.batch_first else final.transpose(0, 1)
    pooled, _ = visual._pool(tokens)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, final, last_input


@dataclass(frozen=True)
class TowerPasses:
    """The image tower's passes: eager (:data:`EAGER_PASSES`) or compiled with ``torch.compile``
    (``models.ImageTower``); each is a plain function of the module and tensors."""

    encode: Callable[[OpenClipModule, torch.Tensor], torch.Tensor]
    front: Callable[[OpenClipModule, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    back: Callable[
        [OpenClipModule, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ]


EAGER_PASSES = TowerPasses(encode=encode_pass, front=front_pass, back=back_pass)


@torch.inference_mode()
def encode_images(
    model: OpenClipModule, images: torch.Tensor, passes: TowerPasses = EAGER_PASSES
) -> torch.Tensor:
    """L2-normalised image embeddings, float32."""
    return passes.encode(model, images)


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
    (:func:`negalign_cli.compute.quantile.percentile_of_sorted`): a float32 quantile drops the patch
    at the threshold on 4×4, 14×14 and 16×16 grids. The CAM values are sorted in their own dtype
    (exact in any precision) and compared with the float64 threshold by type promotion (exact too):
    the rule is numpy's float64 rule for float16, bfloat16 and float32 CAMs alike. Batched, on the
    CAMs' device, no host synchronisation."""
    flat = cams.flatten(1)
    ordered = torch.sort(flat, dim=1).values
    threshold = percentile_of_sorted(ordered, percentile, dim=1, keepdim=True)
    mask = torch.where(threshold > 0, flat >= threshold, flat > 0).view_as(cams)
    if dilate:
        grown = mask.to(torch.float32).unsqueeze(1)
        for _ in range(dilate):
            grown = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
        mask = grown.squeeze(1) > 0
    return mask


def cam_masks(
    cams: torch.Tensor, percentile: float, dilate: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CAM tail for a batch (B, h, w): (foreground, valid, background patches). A CAM is valid
    when it is finite, has a positive value and leaves some patch out of the foreground; an invalid
    one pools the whole image (the fallback; ``score --invalid-cam`` decides its use). Tensor
    operations on the CAMs' device: no ``.item()``, no copy to the host, no per-image loop."""
    foreground = foreground_mask(cams, percentile, dilate)
    flat = cams.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    valid = finite & (flat.amax(dim=1) > 0) & (~foreground).flatten(1).any(dim=1)
    background_patches = ~foreground | ~valid.view(-1, 1, 1)
    return foreground, valid, background_patches


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


BackgroundPool = Callable[
    [OpenClipModule, VisionTower, torch.Tensor, _Capture, torch.Tensor, TowerPasses], torch.Tensor
]


def pool_tokens(
    model: OpenClipModule,
    tower: VisionTower,
    images: torch.Tensor,
    capture: _Capture,
    keep: torch.Tensor,
    passes: TowerPasses = EAGER_PASSES,
) -> torch.Tensor:
    """``tokens``: the mean of the final patch tokens (ln_post, proj) over the background patches."""
    tokens = _project(tower.visual, _batch_first(capture.require("final"), tower)[:, 1:])
    return masked_mean(tokens.float(), keep)


def pool_maskclip(
    model: OpenClipModule,
    tower: VisionTower,
    images: torch.Tensor,
    capture: _Capture,
    keep: torch.Tensor,
    passes: TowerPasses = EAGER_PASSES,
) -> torch.Tensor:
    """``maskclip``: the last block's value path (:func:`maskclip_tokens`) over the background patches."""
    tokens = maskclip_tokens(tower, _batch_first(capture.require("last_input"), tower))
    return masked_mean(tokens.float(), keep)


def pool_clearclip(
    model: OpenClipModule,
    tower: VisionTower,
    images: torch.Tensor,
    capture: _Capture,
    keep: torch.Tensor,
    passes: TowerPasses = EAGER_PASSES,
) -> torch.Tensor:
    """``clearclip``: the last block's q·q attention (:func:`clearclip_tokens`) over the background."""
    tokens = clearclip_tokens(tower, _batch_first(capture.require("last_input"), tower))
    return masked_mean(tokens.float(), keep)


def pool_mask(
    model: OpenClipModule,
    tower: VisionTower,
    images: torch.Tensor,
    capture: _Capture,
    keep: torch.Tensor,
    passes: TowerPasses = EAGER_PASSES,
) -> torch.Tensor:
    """``mask``: the image re-encoded with its foreground patches set to the preprocessing mean."""
    filled = fill_foreground(images, ~keep, tower.patch)
    return passes.encode(model, filled)


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
    model: OpenClipModule,
    images: torch.Tensor,
    class_features: torch.Tensor,
    config: CamConfig,
    passes: TowerPasses = EAGER_PASSES,
) -> CamBatch:
    """Embeddings, CAMs, foreground masks and background embeddings for one batch: the blocks
    before the CAM block without autograd, the rest with it (:class:`TowerPasses`)."""
    tower = vision_tower(model)
    config.validate(len(tower.blocks))  # an out-of-range block is an error, never wrapped around
    block = config.block % len(tower.blocks)
    class_features = class_features.to(images.device, torch.float32)
    with torch.no_grad():
        x, activation = passes.front(tower.visual, images, block)
    hooked = activation.detach().requires_grad_(True)
    with torch.enable_grad():
        pooled, final, last_input = passes.back(tower.visual, x, hooked, block)
        embeddings = F.normalize(pooled.float(), dim=-1)
        cosines = embeddings @ class_features.T
        pred_score, pred_class = cosines.max(dim=-1)
        (gradient,) = torch.autograd.grad(pred_score.sum(), hooked)
    capture = _Capture()
    capture.final, capture.last_input = final.detach(), last_input.detach()
    activation = _batch_first(hooked.detach(), tower)
    gradient = _batch_first(gradient, tower)
    cams = cam_from_gradients(activation, gradient, config.method).view(-1, *tower.grid)
    foreground, valid, background_patches = cam_masks(cams, config.fg_percentile, config.dilate)
    pool = registered(BG_POOL_REGISTRY, config.bg_pool, "--bg-pool")
    with torch.inference_mode():
        background = pool(model, tower, images, capture, background_patches, passes)
    return CamBatch(
        embeddings=embeddings.detach(),
        pred_class=pred_class.detach(),
        pred_score=pred_score.detach(),
        cams=torch.nan_to_num(cams.detach().float()),
        foreground=foreground,
        valid=valid,
        background=background.float(),
    )
