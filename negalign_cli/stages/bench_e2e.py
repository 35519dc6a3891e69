"""``negalign bench --e2e`` and ``--flows decode``: figures users understand.

The end-to-end flow writes synthetic ImageNet-sized JPEG files once (500×375 pixels, quality 90,
~110 KB each: a smooth random field plus mid-frequency blotches plus fine texture noise, the
entropy of a photo rather than of flat colour or white noise), for a MOS-sized benchmark — 50,000
ID images and four OOD sets of 10,000, 10,000, 10,000 and 5,640 (iNaturalist, SUN, Places,
Textures) — scaled by ``scale``. It then runs the real pipeline in-process through the stage
functions the CLI calls: ``embed texts`` (classes and negatives), ``cam`` for the ID set and each
OOD set (which also embeds), ``score`` (multi-matching included) and ``evaluate`` (the method
table), once with a fresh cache folder (cold: text and pair caches empty) and once more with the
same folder (warm). Wall time runs from the files to the method table; each stage's time is
reported beside it (their sum is within the total: the rest is listing and exporting).

The decode flow times ``embed images``' decoding path (a DataLoader over
:class:`~negalign_cli.inputs.datasets.ImageDataset` with the model's transform) against a bare
``Image.open → RGB → resize → centre crop → normalise`` loop over the same files, in one run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from negalign_cli.reporting import NullReporter, Reporter

MOS_SETS = (("id", 50_000), ("inaturalist", 10_000), ("sun", 10_000), ("places", 10_000), ("textures", 5_640))
WIDTH, HEIGHT = 500, 375
QUALITY = 90
NOISE = 19.0  # texture noise σ that puts quality-90 files near 110 KB (measured: 112 KB at 20, 108 at 18)
SPEC_FILE = ".e2e-spec.json"
FILES_VERSION = 1


# ----------------------------------------------------------------------------- the files
def _noise_pool() -> np.ndarray:
    return np.random.default_rng(12345).normal(0.0, 1.0, (HEIGHT + 64, WIDTH + 64, 3)).astype(np.float32)


_POOL: np.ndarray | None = None


def synthetic_image(seed: int) -> np.ndarray:
    """One natural-image-like 375×500 RGB array: a smooth field (16×12 random colours, bicubic),
    blotches (125×94 random colours, bilinear) and fine texture noise (a window of a shared noise
    field at a random offset: no per-image noise draw)."""
    from PIL import Image

    global _POOL
    if _POOL is None:
        _POOL = _noise_pool()
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (WIDTH, HEIGHT), Image.Resampling.BICUBIC
    )
    blotches = Image.fromarray(rng.integers(0, 256, (94, 125, 3), dtype=np.uint8)).resize(
        (WIDTH, HEIGHT), Image.Resampling.BILINEAR
    )
    y, x = rng.integers(0, 64, 2)
    pixels = (
        0.6 * np.asarray(smooth, np.float32)
        + 0.4 * np.asarray(blotches, np.float32)
        + NOISE * _POOL[y : y + HEIGHT, x : x + WIDTH]
    )
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _write_one(job: tuple[str, int]) -> int:
    from PIL import Image

    path, seed = job
    Image.fromarray(synthetic_image(seed)).save(path, "JPEG", quality=QUALITY)
    return os.path.getsize(path)


def set_sizes(scale: float) -> dict[str, int]:
    """Images per set of the MOS-sized benchmark at ``scale`` (at least 2 per set)."""
    if not scale > 0:
        from negalign_cli.errors import NegalignError

        raise NegalignError(f"--e2e-scale must be above 0, got {scale}")
    return {name: max(2, round(n * scale)) for name, n in MOS_SETS}


def write_jpegs(
    folder: Path, sizes: dict[str, int], workers: int = 0, reporter: Reporter | None = None
) -> dict:
    """The synthetic JPEG files, one sub-folder per set, written once: a folder whose spec file
    matches is reused. Returns the spec (counts, mean file size, the seconds writing took)."""
    reporter = reporter or NullReporter()
    folder = Path(folder)
    spec: dict[str, Any] = {
        "version": FILES_VERSION,
        "sizes": sizes,
        "width": WIDTH,
        "height": HEIGHT,
        "quality": QUALITY,
    }
    marker = folder / SPEC_FILE
    if marker.is_file():
        written = json.loads(marker.read_text(encoding="utf-8"))
        if {k: written.get(k) for k in spec} == spec:
            reporter.info(f"synthetic JPEG files already in {folder}")
            return written
    if folder.exists():
        shutil.rmtree(folder)
    jobs = []
    seed = 0
    for name, n in sizes.items():
        (folder / name).mkdir(parents=True)
        for i in range(n):
            jobs.append((str(folder / name / f"{i:06d}.jpg"), seed))
            seed += 1
    started = time.perf_counter()
    if workers > 0:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:  # no fork of a process holding CUDA
            written_sizes = pool.map(_write_one, jobs, chunksize=64)
    else:
        written_sizes = [_write_one(job) for job in jobs]
    spec["files"] = len(jobs)
    spec["mean_bytes"] = float(np.mean(written_sizes))
    spec["seconds"] = time.perf_counter() - started
    marker.write_text(json.dumps(spec), encoding="utf-8")
    reporter.info(f"wrote {len(jobs)} JPEG files ({spec['mean_bytes'] / 1e3:.0f} KB each) to {folder}")
    return spec


# ----------------------------------------------------------------------------- end to end
@dataclass(frozen=True)
class E2EConfig:
    folder: Path  # the JPEG files (kept) and the cache folders (removed before a cold run)
    scale: float = 1.0
    classes: int = 1000
    negatives: int = 10000
    batch_size: int = 256
    workers: int | None = None  # DataLoader workers (None: the CLI's default)
    write_workers: int = 0


def _vocabulary(config: E2EConfig, model: Any):
    from negalign_cli.compute.vocab import ROLE_AMBIGUOUS, ROLE_BACKGROUND, ROLE_OBJECT
    from negalign_cli.inputs.words import WordList
    from negalign_cli.stages.vocab import NegativeVocab

    classes = WordList("bench e2e classes", tuple(f"class {i}" for i in range(config.classes)))
    cycle = (ROLE_OBJECT, ROLE_BACKGROUND, ROLE_AMBIGUOUS)
    words = tuple(f"negative {i}" for i in range(config.negatives))
    negatives = NegativeVocab(
        words=words,
        sources=("noun",) * len(words),
        roles=tuple(cycle[i % 3] for i in range(len(words))),
        origin="bench e2e negatives",
        model=model.fingerprint,  # roles assigned for this run's model (a third each, not r-scores)
    )
    return classes, negatives


def _pipeline(model: Any, config: E2EConfig, data: Path, cache: Path, out: Path) -> dict[str, Any]:
    """One run, files → method table; seconds per stage and in all."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.compute.scores import ScoreConfig
    from negalign_cli.compute.vision import CamConfig
    from negalign_cli.defaults import CLASS_TEMPLATES
    from negalign_cli.inputs.listing import list_images
    from negalign_cli.inputs.words import load_templates
    from negalign_cli.stages import files
    from negalign_cli.stages.evaluation import EvaluateRequest, evaluate
    from negalign_cli.stages.images import cam_images, digest_images
    from negalign_cli.stages.results_json import loads_results
    from negalign_cli.stages.scoring import open_image_set, score_images
    from negalign_cli.stages.text import embed_texts

    stages: dict[str, float] = {
        "embed texts": 0.0,
        "list + digest": 0.0,
        "cam": 0.0,
        "score": 0.0,
        "evaluate": 0.0,
    }
    hits: dict[str, bool] = {}

    def timed(stage: str, run: Callable[..., Any]) -> Any:
        started = time.perf_counter()
        result = run()
        stages[stage] += time.perf_counter() - started
        return result

    started = time.perf_counter()
    workspace = Workspace.open(cache)
    classes, negatives = _vocabulary(config, model)
    templates = load_templates(CLASS_TEMPLATES)
    text = timed(
        "embed texts",
        lambda: embed_texts(
            model,
            classes,
            templates,
            workspace,
            negatives=negatives_words(negatives),
            batch_size=max(config.batch_size, 256),
        ),
    )
    hits["embed texts"] = text.hit
    groups = 100 if config.negatives >= 300 else 1
    score_config = ScoreConfig(groups=groups, role_aware=True, include_ambiguous=True)
    score_files: dict[str, Path] = {}
    for name, _ in MOS_SETS:
        listing = timed(
            "list + digest",
            lambda name=name: digest_images(  # as `negalign cam`: unchanged files are not hashed again
                list_images(data / name), stat_cache=workspace.stat_cache
            ),
        )
        cam = timed(
            "cam",
            lambda listing=listing: cam_images(
                model,
                listing,
                classes,
                workspace,
                CamConfig(),
                batch_size=config.batch_size,
                workers=config.workers,
                decoder="auto",  # as `negalign cam`: batched nvJPEG on CUDA, PIL on a CPU
            ),
        )
        hits[f"cam {name}"] = cam.hit
        cam.artifact.export(out / "cam" / name)
        scored = timed(
            "score",
            lambda name=name: score_images(
                model,
                open_image_set(out / "cam" / name),
                classes,
                negatives,
                workspace,
                score_config,
                batch_size=max(config.batch_size, 1024),
            ),
        )
        hits[f"score {name}"] = scored.hit
        scored.artifact.export(out / "scores" / name)
        score_files[name] = out / "scores" / name / files.SCORES
    request = EvaluateRequest(
        score_files["id"], [(name, score_files[name]) for name, _ in MOS_SETS[1:]], compare=True
    )
    evaluated = timed("evaluate", lambda: evaluate(request, workspace))
    hits["evaluate"] = evaluated.hit
    evaluated.artifact.export(out / "results")
    table = loads_results((out / "results" / files.RESULTS).read_text(encoding="utf-8"))
    total = time.perf_counter() - started
    return {"seconds": total, "stages": stages, "hits": hits, "methods": list(table.get("columns", {}))}


def negatives_words(negatives: Any) -> Any:
    from negalign_cli.inputs.words import WordList

    return WordList(negatives.origin, negatives.words)


def run_e2e(model: Any, config: E2EConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Cold (a fresh cache folder), then warm (the same folder again): files → method table."""
    reporter = reporter or NullReporter()
    sizes = set_sizes(config.scale)
    data = config.folder / "jpegs"
    spec = write_jpegs(data, sizes, config.write_workers, reporter)
    cache, out = config.folder / "cache", config.folder / "out"
    for stale in (cache, out):
        if stale.exists():
            shutil.rmtree(stale)
    reporter.info(f"end to end, cold: {sum(sizes.values())} images, a fresh cache in {cache}")
    cold = _pipeline(model, config, data, cache, out)
    shutil.rmtree(out)
    reporter.info("end to end, warm: the same cache again")
    warm = _pipeline(model, config, data, cache, out)
    return {
        "scale": config.scale,
        "images": sizes,
        "total_images": sum(sizes.values()),
        "files": {k: spec[k] for k in ("width", "height", "quality", "files", "mean_bytes") if k in spec},
        "classes": config.classes,
        "negatives": config.negatives,
        "cold": cold,
        "warm": warm,
    }


# ----------------------------------------------------------------------------- decoding
def bare_pil_loop(paths: list[str], cfg: dict[str, Any]) -> Callable[[], None]:
    """Image.open → RGB → resize (shortest side, bicubic) → centre crop → float tensor, normalised:
    the least any decoding path must do, in this process, one file after another."""
    import torch
    from PIL import Image

    size = cfg["size"]
    side = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = torch.tensor(cfg.get("mean") or (0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor(cfg.get("std") or (0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)

    def run() -> None:
        for path in paths:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            width, height = rgb.size
            scale = side / min(width, height)
            resized = rgb.resize(
                (max(side, round(width * scale)), max(side, round(height * scale))), Image.Resampling.BICUBIC
            )
            left, top = (resized.width - side) // 2, (resized.height - side) // 2
            cropped = resized.crop((left, top, left + side, top + side))
            tensor = torch.from_numpy(np.array(cropped)).permute(2, 0, 1).float().div_(255)
            tensor.sub_(mean).div_(std)

    return run


def dataset_loop(paths: list[str], transform: Any, batch_size: int, workers: int) -> Callable[[], None]:
    """``embed images``' decoding: a DataLoader over ImageDataset with the model's transform."""
    import torch

    from negalign_cli.inputs.datasets import ImageDataset, collate
    from negalign_cli.settings import loader_sharing

    loader_sharing(workers)
    dataset = ImageDataset(paths, transform)

    def run() -> None:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate
        )
        for _ in loader:
            pass

    return run
