"""Training the bundled toy CLIP on the toy world (``negalign toy train``).

The recipe that makes a tiny CLIP learn objects, not only backgrounds: most of
each batch is built from groups of 16 images that share one background, so background words cannot
tell their captions apart and the contrastive loss has to look at the shape; the rest are mixed
groups, background-only images included, so that background words are learned too. AdamW with a
one-cycle schedule, open_clip's contrastive loss.

Batch ``step`` is a function of (seed, stage, step) alone, so a run draws the same batches whether
they are rendered in this process or by ``workers`` processes (what keeps a GPU busy: rendering a
batch takes about 0.1 s of one CPU core), and on the CPU or a GPU.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from negalign_cli.assets import template_sets
from negalign_cli.compute.text import encode_texts
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.toy.world import (
    BACKGROUND_PROMPTS,
    BACKGROUNDS,
    OBJECT_PROMPTS,
    SHAPES,
    caption,
    render,
    render_pattern,
    render_texture_object,
    zero_shot_accuracy,
)

# the preprocessing negalign-toy declares: open_clip's defaults, i.e. OpenAI's CLIP mean and std
MEAN = np.array(OPENAI_DATASET_MEAN, dtype=np.float32)
STD = np.array(OPENAI_DATASET_STD, dtype=np.float32)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 8000  # what the bundled checkpoint's run used (model card)
    batch_groups: int = 16
    group_size: int = 10  # = len(SHAPES): a shared group shows every shape once
    shared_groups: int = 12  # groups whose images share one background
    background_only: float = 0.12  # share of background-only images
    shape_only_shared: float = 0.85  # share of shape-only captions in shared-background groups
    shape_only_mixed: float = 0.5  # and in mixed groups
    # in mixed groups, images that give the vocabulary split's prompt forms a visual meaning: a
    # wallpaper of a shape captioned with a background form ("a texture of star"), a blob of a
    # texture captioned with an object form ("a photo of a lava")
    role_swapped: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    seed: int = 0
    threads: int | None = None
    init: str | None = None  # continue from this checkpoint (a second stage of training)
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    workers: int | None = None  # processes rendering batches (0: this one; None: auto_workers)
    eval_every: int = 250  # steps between the accuracy probes (and checkpoints)


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> normalised float (B, 3, 64, 64) on ``device``, the model's
    preprocessing (the uint8 pixels travel, the arithmetic runs on ``device``)."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    mean = torch.as_tensor(MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.as_tensor(STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def batch_rng(config: TrainConfig, step: int) -> np.random.Generator:
    """The generator of batch ``step``: a function of the seed, the stage (a run that continues
    from ``init`` draws other batches than the first stage) and the step alone."""
    return np.random.default_rng([config.seed, 1 if config.init is not None else 0, step])


def batch_for_step(config: TrainConfig, step: int) -> tuple[np.ndarray, list[str]]:
    return make_batch(batch_rng(config, step), config)


def auto_workers(device: torch.device) -> int:
    """Batch renderers when none are named: none on a CPU (the cores train), else all CPUs but
    one, at most 12 (about what keeps one GPU busy with this model)."""
    if device.type == "cpu":
        return 0
    return max(0, min(12, (os.cpu_count() or 1) - 1))


def _batches(config: TrainConfig, workers: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Batches 1..steps in order, rendered here or by ``workers`` spawned processes."""
    steps = range(1, config.steps + 1)
    if workers <= 0:
        yield from (batch_for_step(config, step) for step in steps)
        return
    context = multiprocessing.get_context("spawn")  # no fork after CUDA is up
    with context.Pool(workers) as pool:
        yield from pool.imap(functools.partial(batch_for_step, config), steps, chunksize=4)


def make_batch(rng: np.random.Generator, config: TrainConfig) -> tuple[np.ndarray, list[str]]:
    """``batch_groups`` groups of ``group_size`` scenes. A shared group is one background with the
    shapes in a random order, each shape once before any repeats (so in a group of len(SHAPES) every
    other image is a true negative that differs by its shape alone); a mixed group draws shape and
    background per image. Any image is background-only with probability ``background_only``."""
    images, captions = [], []
    for group in range(config.batch_groups):
        shared = group < config.shared_groups
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        order = np.concatenate(
            [rng.permutation(len(SHAPES)) for _ in range(-(-config.group_size // len(SHAPES)))]
        )
        for slot in range(config.group_size):
            if not shared and rng.random() < config.role_swapped:
                image, text = role_swapped_scene(rng)
                images.append(image)
                captions.append(text)
                continue
            bg = background if shared else BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            pick = order[slot] if shared else rng.integers(len(SHAPES))
            shape = None if rng.random() < config.background_only else SHAPES[pick]
            scene = render(shape, bg, rng)
            images.append(scene.image)
            captions.append(
                caption(
                    shape, bg, rng, shape_only=config.shape_only_shared if shared else config.shape_only_mixed
                )
            )
    return np.stack(images), captions


def role_swapped_scene(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A shape as a background (wallpaper, background prompt form) or a texture as an object (a
    blob, object prompt form), half and half."""
    if rng.random() < 0.5:
        shape = SHAPES[rng.integers(len(SHAPES))]
        return render_pattern(shape, rng), BACKGROUND_PROMPTS[rng.integers(len(BACKGROUND_PROMPTS))].format(
            b=shape
        )
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return render_texture_object(background, rng), OBJECT_PROMPTS[rng.integers(len(OBJECT_PROMPTS))].format(
        o=background
    )


@torch.no_grad()
def training_accuracy(model, tokenizer, n: int = 240, seed: int = 12345) -> dict[str, float]:
    """The toy world's zero-shot accuracy (the same prompts and scenes as `negalign toy report`)
    of the model being trained: its weights change, so nothing is cached."""
    model.eval()
    device = next(model.parameters()).device

    def images(pixels: np.ndarray) -> np.ndarray:
        return F.normalize(model.encode_image(to_tensor(pixels, device)), dim=-1).cpu().numpy()

    def words(names, templates: str) -> np.ndarray:
        return encode_texts(model, tokenizer, names, template_sets()[templates]).numpy()

    return zero_shot_accuracy(images, words, n, seed)


def train(
    config: TrainConfig,
    out_dir: Path,
    log: Callable[[str], None] = print,
    reporter: Reporter | None = None,
) -> dict:
    """Train ``negalign-toy`` from its seeded init; writes ``negalign-toy.pt`` (fp16 state dict),
    ``training_log.jsonl`` and ``training.json`` to ``out_dir``."""
    import open_clip

    from negalign_cli.models import _open_clip, _seeded
    from negalign_cli.settings import resolve_device

    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    _open_clip()
    with _seeded(config.seed):
        model = open_clip.create_model("negalign-toy")
    if config.init is not None:
        state = torch.load(config.init, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.to(device)
    tokenizer = open_clip.get_tokenizer("negalign-toy")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.steps, pct_start=config.warmup
    )
    loss_fn = open_clip.ClipLoss()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "training_log.jsonl"
    log_path.write_text("")
    workers = config.workers if config.workers is not None else auto_workers(device)
    started = time.perf_counter()
    history = []
    with (reporter or NullReporter()).progress(f"training {config.steps} steps", config.steps) as advance:
        for step, (images, captions) in enumerate(_batches(config, workers), start=1):
            model.train()
            image_features, text_features, logit_scale = model(
                to_tensor(images, device), tokenizer(captions).to(device, non_blocking=True)
            )
            loss = loss_fn(image_features, text_features, logit_scale)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            if step % config.eval_every == 0 or step == config.steps:
                accuracy = training_accuracy(model, tokenizer)
                entry = {
                    "step": step,
                    "loss": float(loss.detach()),
                    "seconds": round(time.perf_counter() - started, 1),
                    **accuracy,
                }
                history.append(entry)
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(entry) + "\n")
                log(json.dumps(entry))
                save_checkpoint(model, out_dir / "negalign-toy.pt")
            advance(1)
    summary = {"config": asdict(config), "history": history, "final": history[-1] if history else {}}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    state = {
        k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.cpu()
        for k, v in model.state_dict().items()
    }
    state.pop("attn_mask", None)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
