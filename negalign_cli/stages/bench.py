"""``negalign bench``: every flow's throughput and peak memory, measured in ONE run on one device.

Each flow runs once to warm up (allocations, kernels, caches), then ``repeats`` times; the median
time gives images/s. Model flows run on decoded tensors already on the device (random pixels: speed
does not depend on values) unless image files are given; random weights in the architecture of the
model's OpenAI weights (QuickGELU for ViT-B-16, as users run it). Scoring does depend on values:
how many distinct (class, negative) pairs multi-matching meets. Its embeddings are drawn with real
data's pair statistics (:func:`real_like_embeddings`), and each multi-matching flow reports its
distinct pairs. The per-image reference flow is the
published research scripts' way: batch 1, the "p and n" texts of NegRefine's multi-matching encoded
for every image, and Grad-CAM by a full backward pass (through every block, into the weights). The
bare GEMM — scoring's own matmuls, images × D × classes and images × D × negatives, float32, the same
chunks, shapes and strides — is what scoring cannot beat; scoring is reported as a fraction of it.
"""

from __future__ import annotations

import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from negalign_cli import __version__
from negalign_cli.compute.native import describe as describe_score_passes
from negalign_cli.compute.score_columns import pair_text
from negalign_cli.compute.scores import (
    LOGIT_SCALE,
    PairTable,
    ScoreConfig,
    ScoreInputs,
    chunk_rows,
    compute_scores,
    group_order,
    neglabel_grouped,
)
from negalign_cli.compute.vision import (
    CamConfig,
    _hooks,
    cam_batch,
    cam_from_gradients,
    encode_images,
    foreground_mask,
    masked_mean,
    vision_tower,
)
from negalign_cli.compute.vision import _project as project_tokens
from negalign_cli.errors import NegalignError
from negalign_cli.models import LoadedModel
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.settings import loader_sharing

FLOW_GROUPS = {
    "model": "image tower forward, embed, embed from files, embed + CAM + background",
    "score": "bare GEMMs, scoring from cache (embeddings; all columns), scoring with multi-matching",
    "pipeline": "full NegAlign pipeline (and from --images files), per-image reference flow",
    "decode": "embed images' decoding (DataLoader, ImageDataset) beside a bare PIL loop; the reader pool",
}


@dataclass(frozen=True)
class BenchConfig:
    batch_size: int = 64
    batches: int = 2  # timed batches per repetition of a model flow
    repeats: int = 3
    classes: int = 1000
    negatives: int = 10000
    score_images: int = 20000
    per_image: int = 4  # images of the per-image reference flow (per repetition)
    cam: CamConfig = field(default_factory=CamConfig)
    pairs: int = 5  # NegRefine's top-k classes and negatives: pairs² texts per image
    images: Path | None = None  # real files instead of decoded tensors
    workers: int = 0
    flows: tuple[str, ...] = ("model", "score", "pipeline")  # which groups of flows (FLOW_GROUPS)
    embeddings: str = "real-like"  # scoring's image embeddings: real-like (pair statistics) | random
    decode_workers: int | None = None  # the decode flow's DataLoader workers (None: as the CLI's default)
    scratch: Path | None = None  # where the decode flow writes its JPEG files without --images


@dataclass
class Measurement:
    flow: str
    images: int  # per repetition
    seconds: float  # median over repetitions
    peak_mb: float
    repeats: int
    note: str = ""
    distinct_pairs: int | None = None  # multi-matching: distinct (class, negative) pairs per repetition

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


# ----------------------------------------------------------------------------- measuring
class _PeakRss:
    """Peak resident memory of this process while a block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as handle:
                return int(handle.read().split()[1]) * 4096
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.current())

    @contextmanager
    def watch(self) -> Iterator[None]:
        self.peak = self.current()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self._stop.clear()
            self.peak = max(self.peak, self.current())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Flow:
    name: str
    run: Callable[[], Any]
    images: int
    note: str = ""


def measure_together(flows: list[Flow], device: torch.device, repeats: int) -> list[Measurement]:
    """Warm each flow up once, then time ``repeats`` rounds, each round running every flow once
    (interleaved, so a noisy neighbour on a shared machine slows all of them alike and their
    ratio holds); the median time of each flow gives its rate."""
    for flow in flows:
        flow.run()
        _sync(device)
    times: dict[str, list[float]] = {flow.name: [] for flow in flows}
    peaks = dict.fromkeys(times, 0.0)
    for _ in range(repeats):
        for flow in flows:
            rss = _PeakRss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with rss.watch():
                started = time.perf_counter()
                flow.run()
                _sync(device)
                times[flow.name].append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
            peaks[flow.name] = max(peaks[flow.name], peak / 2**20)
    return [
        Measurement(f.name, f.images, statistics.median(times[f.name]), peaks[f.name], repeats, f.note)
        for f in flows
    ]


def measure(
    flow: str,
    run: Callable[[], Any],
    images: int,
    device: torch.device,
    repeats: int,
    note: str = "",
) -> Measurement:
    """Warm up once, then time ``repeats`` runs; the median gives the rate."""
    return measure_together([Flow(flow, run, images, note)], device, repeats)[0]


# ----------------------------------------------------------------------------- the inputs
def _unit(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=generator), dim=-1)


def _pixels(model: LoadedModel, n: int, generator: torch.Generator) -> torch.Tensor:
    size = model.image_size
    return model.to_input(torch.randn(n, 3, size, size, generator=generator))  # normalised pixels ~N(0, 1)


EMBEDDINGS = ("real-like", "random")


def real_like_embeddings(
    n: int, classes: torch.Tensor, negatives: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Unit image embeddings with real data's (class, negative) pair statistics: each image is a
    noisy mixture of its class's text feature, of some of that class's 8 related classes and of
    some of its 16 related negatives (fixed per class, drawn once), with random weights. An image's
    top-5 classes and negatives then vary among related words as a real image's do, rather than
    being random (random unit vectors: every image meets 25 new pairs) or shared by every image
    (random weights give near-identical embeddings: a handful of pairs in all)."""
    n_classes, dim = classes.shape
    related_classes = torch.randint(0, n_classes, (n_classes, 8), generator=generator)
    related_negatives = torch.randint(0, negatives.shape[0], (n_classes, 16), generator=generator)
    label = torch.randint(0, n_classes, (n,), generator=generator)
    class_weights = torch.rand(n, 8, generator=generator) * 0.6
    negative_weights = torch.rand(n, 16, generator=generator) * 0.6  # some of the 16 lead, varying
    mixture = (
        classes[label]
        + torch.einsum("nk,nkd->nd", class_weights, classes[related_classes[label]])
        + torch.einsum("nk,nkd->nd", negative_weights, negatives[related_negatives[label]])
        + 0.9 * torch.randn(n, dim, generator=generator) / dim**0.5
    )
    return F.normalize(mixture, dim=-1)


def _score_inputs(
    n: int, dim: int, config: BenchConfig, generator: torch.Generator, embeddings: str = "random"
) -> ScoreInputs:
    negatives = _unit(config.negatives, dim, generator)
    classes = _unit(config.classes, dim, generator)
    half = config.negatives // 2
    if embeddings == "real-like":
        images = real_like_embeddings(n, classes, negatives, generator)
    elif embeddings == "random":
        images = _unit(n, dim, generator)
    else:
        raise NegalignError(f"unknown --embeddings {embeddings!r}: use {', '.join(EMBEDDINGS)}")
    return ScoreInputs(
        images=images.numpy(),
        classes=classes,
        negatives=negatives,
        class_names=[f"class {i}" for i in range(config.classes)],
        negative_names=[f"negative {i}" for i in range(config.negatives)],
        star_indices=torch.arange(half),
        background=_unit(n, dim, generator).numpy(),
        background_valid=torch.ones(n, dtype=torch.bool),
        background_indices=torch.arange(half, config.negatives),
    )


class _WarmPairs:
    """NegRefine's pair features by index, from a warm text cache whose lookup costs next to
    nothing: the features of "p and n" are normalise(P[p] + N[n]) (no strings, no encoder).
    ``table()`` starts an empty :class:`PairTable` per run, as one ``score`` run does over the text
    cache (every distinct pair is fetched once per run); ``warm()`` keeps one table across runs,
    the pair features already on the device (what the warm target measures)."""

    def __init__(self, inputs: ScoreInputs) -> None:
        self.classes, self.negatives = inputs.classes, inputs.negatives
        self.last: PairTable | None = None
        self.kept: PairTable | None = None

    def encode(self, classes: np.ndarray, negatives: np.ndarray) -> torch.Tensor:
        p, n = torch.from_numpy(classes), torch.from_numpy(negatives)
        features = self.classes[p].add_(self.negatives[n])  # F.normalize's operations, in place
        return features.div_(torch.linalg.vector_norm(features, dim=-1, keepdim=True).clamp_min_(1e-12))

    def table(self) -> PairTable:
        self.last = PairTable(self.encode, self.negatives.shape[0])
        return self.last

    def warm(self) -> PairTable:
        if self.kept is None:
            self.kept = PairTable(self.encode, self.negatives.shape[0])
        return self.kept

    @staticmethod
    def distinct(table: PairTable | None) -> int | None:
        """Distinct pairs a table met (each is encoded once while the table holds them)."""
        return None if table is None or table.resets else table.encoded


def bare_gemm(
    images: np.ndarray,
    weights: torch.Tensor | Sequence[torch.Tensor],
    device: torch.device | None = None,
) -> None:
    """images × each of ``weights`` (D × columns, laid out as scoring passes them: the classes as a
    transposed view, the negatives contiguous) in float32, in the chunks scoring uses (copied to
    ``device`` as scoring copies them), each into one reused buffer: scoring's matmuls, same shapes,
    strides and dtype, and nothing else. A single (columns × D) tensor is one matmul with its
    transpose."""
    device = device or torch.device("cpu")
    rights = [weights.T.contiguous()] if isinstance(weights, torch.Tensor) else list(weights)
    rights = [w.to(device) for w in rights]
    rows = chunk_rows(sum(w.shape[1] for w in rights))
    outs = [torch.empty(min(rows, images.shape[0]), w.shape[1], device=device) for w in rights]
    for start in range(0, images.shape[0], rows):
        block = torch.from_numpy(images[start : start + rows]).to(device, non_blocking=True)
        for right, out in zip(rights, outs, strict=True):
            torch.matmul(block, right, out=out[: block.shape[0]])


# ----------------------------------------------------------------------------- the reference flow
@contextmanager
def _trainable(module: torch.nn.Module) -> Iterator[None]:
    """Weights that take gradients, as in the research scripts (restored after)."""
    before = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), before, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def reference_step(
    model: LoadedModel,
    image: torch.Tensor,
    inputs: ScoreInputs,
    config: BenchConfig,
    grouping: torch.Tensor,
    groups: int,
) -> dict[str, torch.Tensor]:
    """One image as the per-image research scripts do it: batch 1, Grad-CAM by a full backward
    (gradients into every weight), NegLabel, NegRefine's k² "p and n" texts encoded for this image,
    and P_align. Returns what it computed (the tests compare it with the batched flow)."""
    tower = vision_tower(model.model)
    device = model.device
    classes = inputs.classes.to(device)
    negatives = inputs.negatives.to(device)
    net: Any = model.model
    with _trainable(net), _hooks(tower, config.cam.block, detach=False) as capture, torch.enable_grad():
        embedding = F.normalize(net.encode_image(image).float(), dim=-1)
        score, predicted = (embedding @ classes.T).max(dim=-1)
        score.sum().backward()
        activation = capture.require("activation")
        gradient = activation.grad
    if gradient is None:
        raise RuntimeError("the full backward pass left no gradient at the hooked block")
    hooked = activation.detach() if tower.batch_first else activation.detach().transpose(0, 1)
    gradient = gradient if tower.batch_first else gradient.transpose(0, 1)
    cams = cam_from_gradients(hooked, gradient, config.cam.method).view(-1, *tower.grid)
    foreground = foreground_mask(cams, config.cam.fg_percentile, config.cam.dilate)
    final = capture.require("final")
    final = final if tower.batch_first else final.transpose(0, 1)
    with torch.inference_mode():
        tokens = project_tokens(tower.visual, final[:, 1:])
        background = masked_mean(tokens.float(), ~foreground)
        x = embedding.detach()
        pos = LOGIT_SCALE * x @ classes.T
        neg = LOGIT_SCALE * x @ negatives.T
        plain = neglabel_grouped(pos, neg[:, grouping], groups)
        top_pos = pos.topk(config.pairs, dim=-1).indices[0].tolist()
        top_neg = neg.topk(config.pairs, dim=-1)
        texts = [
            pair_text(inputs.class_names[p], inputs.negative_names[n])
            for p in top_pos
            for n in top_neg.indices[0].tolist()
        ]
        pair_features = F.normalize(net.encode_text(model.tokenizer(texts).to(device)).float(), dim=-1)
        pair_logits = LOGIT_SCALE * x @ pair_features.T
        multimatch = torch.sigmoid(
            pair_logits.double() - top_neg.values.repeat(1, config.pairs).double()
        ).max()
    return {
        "embedding": x,
        "cam": cams.detach(),
        "background": background,
        "neglabel": plain,
        "multimatch": multimatch,
        "pred_class": predicted,
    }


# ----------------------------------------------------------------------------- the run
def environment(model: LoadedModel) -> dict[str, Any]:
    import open_clip

    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "score_passes": describe_score_passes() if device.type == "cpu" else "torch operators",
        "model": model.name,
        "weights": model.weights,
        "quick_gelu": bool(model.config.get("quick_gelu", False)),
        "precision": model.precision,
        "image_size": model.image_size,
        "embed_dim": model.embed_dim,
        "versions": {
            "negalign": __version__,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "machine": platform.platform(),
    }


def _image_file_flow(
    model: LoadedModel, config: BenchConfig, step: Callable[[torch.Tensor], Any] | None = None
) -> tuple[Callable[[], Any], int, str]:
    """Embedding from image files the way `embed images` reads them: PIL in DataLoader workers on a
    CPU; on a GPU the JPEG bytes are decoded there in batches (nvJPEG), as ``--decode auto`` does.
    ``step``: what each decoded batch (model input, on the device) goes through (default: embed)."""
    if step is None:

        def step(batch: torch.Tensor) -> Any:
            return encode_images(model.model, batch)

    from negalign_cli.inputs.datasets import ImageDataset, collate, resolve_decoder
    from negalign_cli.inputs.listing import list_images

    if config.images is None:
        raise ValueError("no image folder")
    listed = list_images(config.images)
    paths = [listed.location(i) for i in range(min(len(listed), config.batch_size * config.batches))]
    decoder = resolve_decoder("auto", model.device)
    pin = model.device.type == "cuda"
    loader_sharing(config.workers)
    if decoder == "torch":
        from negalign_cli.inputs.reader import decoded_batches

        def run() -> None:
            for _, batch, _ in decoded_batches(
                paths,
                model.preprocess_cfg,
                model.image_transform(),
                model.device,
                batch_size=config.batch_size,
                workers=config.workers,
            ):
                if batch is not None:
                    step(model.to_input(batch))

        return run, len(paths), f"{config.workers} workers, reader pool, batched GPU JPEG decoding"
    dataset = ImageDataset(paths, model.image_transform())

    def run_pil() -> None:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.batch_size,
            num_workers=config.workers,
            collate_fn=collate,
            pin_memory=pin,
        )
        for _, batch, _ in loader:
            if batch is not None:
                step(model.to_input(batch, non_blocking=True))

    return run_pil, len(paths), f"{config.workers} workers, PIL decoding"


def _full_from_files(
    model: LoadedModel,
    config: BenchConfig,
    inputs: ScoreInputs,
    class_features: torch.Tensor,
    pairs: _WarmPairs,
    score_config: ScoreConfig,
) -> Measurement:
    """The full NegAlign pipeline from image files: each batch decoded as `embed images` decodes it
    (:func:`_image_file_flow`), embedded with CAM and background, then every score with
    multi-matching (pairs fetched per run), as the decoded-tensor pipeline flow scores."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cam_step(batch: torch.Tensor) -> None:
        out = cam_batch(model.model, batch, class_features, config.cam)
        kept.append((out.embeddings.cpu(), out.background.cpu()))

    decode, count, how = _image_file_flow(model, config, cam_step)

    def run() -> None:
        kept.clear()
        decode()
        background = torch.cat([b for _, b in kept])
        n = background.shape[0]
        # random weights embed every image alike: score real-like rows, as the pipeline flow does
        generator = torch.Generator().manual_seed(1)
        images = (
            np.asarray(inputs.images[:n])
            if inputs.images.shape[0] >= n
            else real_like_embeddings(n, inputs.classes, inputs.negatives, generator).numpy()
        )
        scored = ScoreInputs(
            images=images,
            classes=inputs.classes,
            negatives=inputs.negatives,
            class_names=inputs.class_names,
            negative_names=inputs.negative_names,
            star_indices=inputs.star_indices,
            background=background.numpy(),
            background_valid=torch.ones(n, dtype=torch.bool),
            background_indices=inputs.background_indices,
        )
        compute_scores(scored, score_config, pairs.table(), device=model.device)

    return measure(
        FULL_FROM_FILES,
        run,
        count,
        model.device,
        config.repeats,
        f"{how}; embed + CAM + all scores ({config.embeddings} embeddings scored)",
    )


FULL_FROM_FILES = "full NegAlign from image files"
DECODE_PATH = "decode: embed images' path"
DECODE_PATH_0 = "decode: embed images' path, no workers"
BARE_PIL = "decode: bare PIL loop"
READER_POOL = "decode: reader pool, batched decoding"


def _decode_flows(model: LoadedModel, config: BenchConfig, reporter: Reporter) -> list[Flow]:
    """``embed images``' decoding (DataLoader over ImageDataset, the model's transform, the CLI's
    workers) and the same without workers, beside a bare PIL loop in this process, and
    ``--decode torch``'s reader pool (the path ``auto`` takes on CUDA) on the model's device, over
    the same files: --images, else batch-size × batches synthetic ImageNet-sized JPEGs (500×375, ~110 KB)."""
    import tempfile

    from negalign_cli.inputs.datasets import default_workers
    from negalign_cli.stages.bench_e2e import bare_pil_loop, dataset_loop, write_jpegs

    n = config.batch_size * config.batches
    if config.images is not None:
        from negalign_cli.inputs.listing import list_images

        listed = list_images(config.images)
        paths = [str(listed.location(i)) for i in range(min(len(listed), n))]
        what = f"{len(paths)} files of {config.images}"
    else:
        folder = config.scratch or Path(tempfile.gettempdir()) / "negalign-bench-jpegs"
        spec = write_jpegs(folder, {"decode": n}, reporter=reporter)
        paths = sorted(str(p) for p in (folder / "decode").glob("*.jpg"))
        what = f"{len(paths)} synthetic 500×375 JPEGs, {spec['mean_bytes'] / 1e3:.0f} KB each"
    workers = default_workers() if config.decode_workers is None else config.decode_workers
    transform = model.image_transform()
    return [
        Flow(
            DECODE_PATH,
            dataset_loop(paths, transform, config.batch_size, workers),
            len(paths),
            f"DataLoader over ImageDataset, {workers} workers; {what}",
        ),
        Flow(
            DECODE_PATH_0,
            dataset_loop(paths, transform, config.batch_size, 0),
            len(paths),
            "the same in this process",
        ),
        Flow(
            BARE_PIL,
            bare_pil_loop(paths, model.preprocess_cfg),
            len(paths),
            "Image.open → RGB → resize → centre crop → normalise, one file after another",
        ),
        Flow(
            READER_POOL,
            reader_pool_loop(paths, model, config.batch_size, workers),
            len(paths),
            f"--decode torch's path to model input on {model.device} (no model): reader pool, "
            f"{workers} workers, batched decoding and resize, two batches in flight",
        ),
    ]


def reader_pool_loop(
    paths: list[str], model: LoadedModel, batch_size: int, workers: int
) -> Callable[[], None]:
    """``--decode torch``'s path (``auto`` on CUDA) up to the model's input, without the model."""
    from negalign_cli.inputs.reader import decoded_batches

    def run() -> None:
        for _ in decoded_batches(
            paths,
            model.preprocess_cfg,
            model.image_transform(),
            model.device,
            batch_size=batch_size,
            workers=workers,
        ):
            pass

    return run


def run_bench(model: LoadedModel, config: BenchConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Measure every flow; returns the record ``--json`` writes (the table reads it too)."""
    reporter = reporter or NullReporter()
    generator = torch.Generator().manual_seed(0)
    device, dim = model.device, model.embed_dim
    repeats = config.repeats
    n_model = config.batch_size * config.batches
    batches = [_pixels(model, config.batch_size, generator) for _ in range(config.batches)]
    class_features = _unit(config.classes, dim, generator).to(device)
    inputs = _score_inputs(config.score_images, dim, config, generator, config.embeddings)
    score_config = ScoreConfig(groups=100, role_aware=True)
    results: list[Measurement] = []
    unknown = set(config.flows) - set(FLOW_GROUPS)
    if unknown:
        raise NegalignError(
            f"unknown flow group(s) {', '.join(sorted(unknown))}: use {', '.join(FLOW_GROUPS)}"
        )
    files = config.images is not None
    total = {"model": 3 + files, "score": 6, "pipeline": 2 + files, "decode": 4}
    with reporter.progress("benchmark flows", sum(total[g] for g in config.flows)) as advance:
        pairs = _WarmPairs(inputs)
        if "model" in config.flows:

            @torch.inference_mode()
            def forward() -> None:
                visual: Any = vision_tower(model.model).visual
                for batch in batches:
                    visual(batch)

            def embed() -> None:
                for batch in batches:
                    encode_images(model.model, batch)

            def embed_cam() -> None:
                for batch in batches:
                    cam_batch(model.model, batch, class_features, config.cam)

            cam_note = f"{config.cam.method}, block {config.cam.block}, single-block backward"
            ceiling = Flow("image tower forward (ceiling)", forward, n_model)
            eager = [
                Flow("embed", embed, n_model, "normalised float32 embeddings"),
                Flow("embed + CAM + background", embed_cam, n_model, cam_note),
            ]
            tower = model.tower
            if not tower.requested:
                for flow in (ceiling, eager[0]):
                    results.append(measure(flow.name, flow.run, flow.images, device, repeats, flow.note))
                    advance(1)
            if config.images is not None:
                run, count, how = _image_file_flow(model, config)
                results.append(measure("embed from image files", run, count, device, repeats, how))
                advance(1)
            if not tower.requested:
                flow = eager[1]
                results.append(measure(flow.name, flow.run, flow.images, device, repeats, flow.note))
                advance(1)
            else:  # --compile on, or auto on CUDA: compiled beside eager, interleaved (their ratios hold)

                def embed_compiled() -> None:
                    for batch in batches:
                        tower.encode(batch, reporter)

                def embed_cam_compiled() -> None:
                    for batch in batches:
                        tower.cam(batch, class_features, config.cam, reporter)

                compiled = [
                    Flow("embed, compiled", embed_compiled, n_model, "torch.compile"),
                    Flow("embed + CAM + background, compiled", embed_cam_compiled, n_model, "torch.compile"),
                ]
                flows = [ceiling, eager[0], compiled[0], eager[1], compiled[1]]
                for measured in measure_together(flows, device, repeats):
                    if measured.note == "torch.compile" and not tower.compiled:  # what ran was eager
                        measured.note = f"compile failed, eager: {tower.failure}"
                    results.append(measured)
                advance(3)

        if "score" in config.flows:
            # scoring's matmuls: x·Pᵀ (a transposed view), 100x·N (the negatives in group order, contiguous)
            weights = [inputs.classes.T, inputs.negatives.T.contiguous()]
            background_weights = inputs.negatives[inputs.background_indices]
            plain = ScoreInputs(
                images=inputs.images,
                classes=inputs.classes,
                negatives=inputs.negatives,
                class_names=inputs.class_names,
                negative_names=inputs.negative_names,
            )

            def gemms_with_background() -> None:
                bare_gemm(inputs.images, weights, device)  # type: ignore[arg-type]
                bare_gemm(inputs.background, [background_weights.T], device)  # type: ignore[arg-type]

            n, c, m = config.score_images, config.classes, config.negatives
            scoring = [
                Flow(
                    "bare GEMM (fp32)",
                    lambda: bare_gemm(inputs.images, weights, device),  # type: ignore[arg-type]
                    n,
                    f"{n} × {dim} × ({c} + {m}): x·Pᵀ and x·Nᵀ, scoring's two matmuls per chunk",
                ),
                Flow(
                    "score from cache (embeddings)",
                    lambda: compute_scores(plain, ScoreConfig(groups=100), device=device),
                    n,
                    "MCM, Energy, MaxLogit, NegLabel (100 groups), top-k for NegRefine",
                ),
                Flow(
                    "bare GEMMs with background (fp32)",
                    gemms_with_background,
                    n,
                    f"the above + {n} × {background_weights.shape[0]} × {dim} (b·N_bg)",
                ),
                Flow(
                    "score from cache (all columns)",
                    lambda: compute_scores(inputs, score_config, device=device),
                    n,
                    "+ NegLabel* (M2, role-aware) and P_align",
                ),
                Flow(
                    "score + multi-matching",
                    lambda: compute_scores(inputs, score_config, pairs.warm(), device=device),
                    n,
                    f"+ NegRefine's pairs, warm (features on the device; {config.embeddings} embeddings)",
                ),
                Flow(
                    "score + multi-matching, pairs fetched",
                    lambda: compute_scores(inputs, score_config, pairs.table(), device=device),
                    n,
                    "+ every distinct pair fetched once per run from an in-memory text cache",
                ),
            ]
            results.extend(measure_together(scoring, device, repeats))  # interleaved: a fair ratio
            results[-2].distinct_pairs = pairs.distinct(pairs.kept)
            results[-1].distinct_pairs = pairs.distinct(pairs.last)
            advance(len(scoring))

        if "pipeline" in config.flows:

            def full() -> None:
                embeddings, backgrounds = [], []
                for batch in batches:
                    out = cam_batch(model.model, batch, class_features, config.cam)
                    embeddings.append(out.embeddings.cpu())
                    backgrounds.append(out.background.cpu())
                torch.cat(embeddings)  # random weights embed every image alike: score real-like rows
                pipeline = ScoreInputs(
                    images=pipeline_images,
                    classes=inputs.classes,
                    negatives=inputs.negatives,
                    class_names=inputs.class_names,
                    negative_names=inputs.negative_names,
                    star_indices=inputs.star_indices,
                    background=torch.cat(backgrounds).numpy(),
                    background_valid=torch.ones(n_model, dtype=torch.bool),
                    background_indices=inputs.background_indices,
                )
                compute_scores(pipeline, score_config, pairs.table(), device=device)

            pipeline_images = np.asarray(inputs.images[:n_model])
            if pipeline_images.shape[0] < n_model:  # fewer --score-images than the model flows' images
                more = (
                    real_like_embeddings(n_model, inputs.classes, inputs.negatives, generator)
                    if config.embeddings == "real-like"
                    else _unit(n_model, dim, generator)
                )
                pipeline_images = more.numpy()
            results.append(
                measure(
                    "full NegAlign pipeline",
                    full,
                    n_model,
                    device,
                    repeats,
                    f"embed + CAM + all scores ({config.embeddings} embeddings scored)",
                )
            )
            results[-1].distinct_pairs = pairs.distinct(pairs.last)
            advance(1)
            if config.images is not None:
                results.append(_full_from_files(model, config, inputs, class_features, pairs, score_config))
                results[-1].distinct_pairs = pairs.distinct(pairs.last)
                advance(1)
            grouping = group_order(config.negatives, score_config.groups, score_config.group_seed)
            singles = [b[i : i + 1] for b in batches for i in range(b.shape[0])][: config.per_image]

            def per_image() -> None:
                for image in singles:  # one host sync per image, as those scripts have
                    float(
                        reference_step(model, image, inputs, config, grouping, score_config.groups)[
                            "neglabel"
                        ]
                    )

            results.append(
                measure(
                    "per-image reference flow",
                    per_image,
                    len(singles),
                    device,
                    repeats,
                    f"batch 1, {config.pairs**2} texts per image, full backward",
                )
            )
            advance(1)
        if "decode" in config.flows:
            results.extend(measure_together(_decode_flows(model, config, reporter), device, repeats))
            advance(total["decode"])
    model.model.zero_grad(set_to_none=True)
    rate = {m.flow: m.images_per_s for m in results}
    wanted = {
        "embed / forward ceiling": ("embed", "image tower forward (ceiling)"),
        "score / bare GEMM": ("score from cache (embeddings)", "bare GEMM (fp32)"),
        "all columns / bare GEMMs": ("score from cache (all columns)", "bare GEMMs with background (fp32)"),
        "multi-matching / all columns": ("score + multi-matching", "score from cache (all columns)"),
        "multi-matching, pairs fetched / all columns": (
            "score + multi-matching, pairs fetched",
            "score from cache (all columns)",
        ),
        "full pipeline / per-image flow": ("full NegAlign pipeline", "per-image reference flow"),
        "embed compiled / eager": ("embed, compiled", "embed"),
        "CAM compiled / eager": ("embed + CAM + background, compiled", "embed + CAM + background"),
        "CAM compiled / forward ceiling": (
            "embed + CAM + background, compiled",
            "image tower forward (ceiling)",
        ),
        "JPEG path / bare PIL loop": (DECODE_PATH, BARE_PIL),
        "JPEG path, in process / bare PIL loop": (DECODE_PATH_0, BARE_PIL),
        "reader pool / bare PIL loop": (READER_POOL, BARE_PIL),
    }
    ratios = {name: rate[a] / rate[b] for name, (a, b) in wanted.items() if a in rate and b in rate}
    return {
        "environment": environment(model),
        "config": {
            **asdict(config),
            "images": str(config.images) if config.images else None,
            "scratch": str(config.scratch) if config.scratch else None,
        },
        "results": [{**asdict(m), "images_per_s": m.images_per_s} for m in results],
        "ratios": ratios,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
