"""Known-answer figures of a CLIP on the toy world (``negalign toy report``).

- zero-shot accuracy over all shape names on object images, over all background names on
  background-only images;
- the vocabulary split of the toy vocabulary: share of shape words with r > 0, of background
  words with r < 0, and the role table at tau;
- localisation: IoU of the top-20% patches of each CAM method × block with the ground-truth mask
  on the patch grid, beside a random mask and a centre prior;
- background embeddings: zero-shot accuracy of each ``--bg-pool`` mode's background embedding
  over the background names, on object-on-background images.

OOD AUROCs come from ``negalign demo`` (results.json).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from negalign_cli.cache.workspace import Workspace
from negalign_cli.compute.vision import (
    CamConfig,
    cam_batch,
    encode_images,
    vision_tower,
)
from negalign_cli.compute.vocab import ROLES, assign_roles
from negalign_cli.defaults import BG_POOLS, CAM_METHODS
from negalign_cli.inputs.words import WordList, load_templates
from negalign_cli.models import LoadedModel
from negalign_cli.stages import files
from negalign_cli.stages.text import text_embeddings
from negalign_cli.stages.vocab import VocabEntry, split_scores
from negalign_cli.toy.world import BACKGROUNDS, SHAPES, SIZE, patch_mask, sample_scenes, zero_shot_accuracy

TOP_SHARE = 0.2


def _pixels_tensor(model: LoadedModel, pixels: np.ndarray) -> torch.Tensor:
    """uint8 images (B, H, W, 3) through the model's own preprocessing, on its device."""
    from PIL import Image

    transform = model.image_transform()
    return model.to_input(torch.stack([transform(Image.fromarray(image)) for image in pixels]))


def _tensor(model: LoadedModel, scenes) -> torch.Tensor:
    """The scenes through the model's own preprocessing, on its device."""
    return _pixels_tensor(model, np.stack([s.image for s in scenes]))


def _features(model: LoadedModel, words: Sequence[str], templates: str, workspace: Workspace) -> torch.Tensor:
    return torch.from_numpy(text_embeddings(model, list(words), load_templates(templates), workspace).vectors)


def _batches(images: torch.Tensor, size: int = 128):
    for start in range(0, images.shape[0], size):
        yield start, images[start : start + size]


def zero_shot(model: LoadedModel, workspace: Workspace, n: int, seed: int) -> dict[str, float]:
    """Zero-shot accuracy with the model's preprocessing and the cached text features."""

    def images(pixels: np.ndarray) -> np.ndarray:
        return encode_images(model.model, _pixels_tensor(model, pixels)).cpu().numpy()

    def words(names, templates: str) -> np.ndarray:
        return _features(model, names, templates, workspace).numpy()

    return zero_shot_accuracy(images, words, n, seed)


def vocabulary_split(
    model: LoadedModel, workspace: Workspace, tau: float, distractors: Sequence[str]
) -> dict:
    words = list(SHAPES) + list(BACKGROUNDS) + list(distractors)
    scores = split_scores(model, [VocabEntry(WordList("toy", tuple(words)), "noun")], workspace)
    import pandas as pd

    frame = pd.read_parquet(scores.artifact.file(files.R_SCORES))
    r = dict(zip(frame["word"], frame["r_score"], strict=True))
    table = {}
    for group, members in (("shapes", SHAPES), ("backgrounds", BACKGROUNDS), ("distractors", distractors)):
        roles = assign_roles(np.array([r[w] for w in members]), tau)
        table[group] = {role: int((roles == role).sum()) for role in ROLES}
    return {
        "shapes_r_positive": float(np.mean([r[w] > 0 for w in SHAPES])),
        "backgrounds_r_negative": float(np.mean([r[w] < 0 for w in BACKGROUNDS])),
        "tau": tau,
        "roles": table,
        "r": {w: float(r[w]) for w in words},
    }


def _top_share(maps: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """The top ``share`` of patches of each map (ties broken by position)."""
    flat = maps.flatten(1)
    k = max(1, round(share * flat.shape[1]))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, torch.topk(flat, k, dim=1).indices, True)
    return keep.view_as(maps)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp_min(1)
    return float((inter / union).mean())


def localisation(model: LoadedModel, workspace: Workspace, n: int, seed: int, blocks: Sequence[int]) -> dict:
    tower = vision_tower(model.model)
    h, w = tower.grid
    scenes = sample_scenes(n, seed, with_object=True)
    truth = torch.from_numpy(np.stack([patch_mask(s.mask, SIZE // h) for s in scenes]))
    images = _tensor(model, scenes)
    classes = _features(model, SHAPES, "object", workspace).to(model.device)
    results = {}
    for method in CAM_METHODS:
        for block in blocks:
            config = CamConfig(method=method, block=block, fg_percentile=80.0, dilate=0)
            cams = torch.cat(
                [cam_batch(model.model, b, classes, config).cams.cpu() for _, b in _batches(images)]
            )
            results[f"{method} block {block}"] = _iou(_top_share(cams), truth)
    generator = torch.Generator().manual_seed(seed)
    results["random map"] = _iou(_top_share(torch.rand(n, h, w, generator=generator)), truth)
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    centre = -(yy**2 + xx**2) + 1e-3 * torch.rand(h, w, generator=generator)
    results["centre prior"] = _iou(_top_share(centre.expand(n, h, w).clone()), truth)
    return results


def background_pooling(model: LoadedModel, workspace: Workspace, n: int, seed: int) -> dict[str, float]:
    scenes = sample_scenes(n, seed + 1, with_object=True)
    images = _tensor(model, scenes)
    classes = _features(model, SHAPES, "object", workspace).to(model.device)
    backgrounds = _features(model, BACKGROUNDS, "background", workspace)
    truth = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
    out = {}
    for pool in BG_POOLS:
        config = CamConfig(bg_pool=pool)
        embedded = torch.cat(
            [cam_batch(model.model, b, classes, config).background.cpu() for _, b in _batches(images)]
        )
        out[pool] = float(((F.normalize(embedded, dim=-1) @ backgrounds.T).argmax(1) == truth).float().mean())
    whole = torch.cat([encode_images(model.model, b).cpu() for _, b in _batches(images)])
    out["whole image (reference)"] = float(((whole @ backgrounds.T).argmax(1) == truth).float().mean())
    return out


def toy_report(
    model: LoadedModel, workspace: Workspace, n: int = 300, seed: int = 7, tau: float = 0.05
) -> dict:
    from negalign_cli.toy.generate import DISTRACTORS

    blocks = [-k for k in range(1, len(vision_tower(model.model).blocks) + 1)]
    return {
        "model": model.describe(),
        "images": n,
        "zero_shot": zero_shot(model, workspace, n, seed),
        "split": vocabulary_split(model, workspace, tau, DISTRACTORS),
        "localisation_iou": localisation(model, workspace, n, seed, blocks),
        "background_pooling_accuracy": background_pooling(model, workspace, n, seed),
    }
