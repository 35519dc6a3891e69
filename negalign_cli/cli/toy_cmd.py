"""`negalign toy generate|train`, `negalign demo` and `negalign sanity`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from negalign_cli.cli import options as o
from negalign_cli.cli.console import guarded, stdout
from negalign_cli.defaults import CACHE_ENV
from negalign_cli.errors import NegalignError

app = typer.Typer(
    help="The toy spurious-OOD world: generate it, train the bundled tiny CLIP on it, measure it.",
    epilog="Example: negalign toy generate --out toy; negalign toy report --model negalign-toy",
    no_args_is_help=True,
)


@app.command("generate", epilog="Example: negalign toy generate --out toy --n-id 400 --n-ood 200")
@guarded
def generate(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder to write the splits into: new, empty, or an earlier run's, whose files (listed "
            "in its toy_files.txt, and only those) are removed first; any other non-empty folder is refused.",
        ),
    ],
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random draw of the world.")] = 0,
    n_id: Annotated[int, typer.Option("--n-id", min=2, help="Images in the ID split.")] = 400,
    n_ood: Annotated[int, typer.Option("--n-ood", min=1, help="Images in each OOD split.")] = 200,
    n_train: Annotated[
        int, typer.Option("--train", min=0, help="Also write this many captioned training images.")
    ] = 0,
    correlation: Annotated[
        float, typer.Option("--correlation", help="Share of ID images on their own backgrounds.")
    ] = (0.95),
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Write the toy benchmark: shapes on textures with exact masks; a Waterbirds-like ID split,
    background-only (spurious) and other-object (non-spurious) OOD splits, classes.txt and vocab.txt."""
    from negalign_cli.toy.generate import ToySpec, generate_toy

    counts = generate_toy(
        out,
        ToySpec(seed=seed, n_id=n_id, n_ood=n_ood, n_train=n_train, correlation=correlation),
        o.reporter(verbose, quiet),
    )
    stdout().print(f"wrote {', '.join(f'{k}: {v}' for k, v in counts.items())} images to {out}")


@app.command(
    "train",
    epilog="Example: negalign toy train --out runs/toy --device cuda --install",
)
@guarded
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the checkpoint and the training log.")],
    steps: Annotated[
        int,
        typer.Option(
            "--steps", min=1, help="Optimiser steps (batch 160: 16 groups of 10; the bundled model's run)."
        ),
    ] = 8000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation and the batches.")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of the one-cycle schedule.")] = 1e-3,
    install: Annotated[
        bool, typer.Option("--install", help="Copy the result over the bundled checkpoint.")
    ] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads.", show_default=False)] = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Continue from this checkpoint (a second stage).", show_default=False),
    ] = None,
    warmup: Annotated[float, typer.Option("--warmup", help="Share of steps spent warming up.")] = 0.1,
    device: o.Device = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Processes rendering the batches (0: the training process; default: none on a CPU, "
            "all CPUs but one, at most 12, on a GPU). The batches are the same for any number.",
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="Steps between the accuracy probes and checkpoints.")
    ] = 250,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Train negalign-toy (open_clip ViT 64 px, patch 8, 4 layers) on the toy world with open_clip's
    contrastive loss. The default run is the bundled checkpoint's: about 5 minutes on one GPU, about
    3 hours on 2 CPU cores (1 to 3 s a step). Writes negalign-toy.pt (fp16), training_log.jsonl
    and training.json; --install copies the checkpoint over the bundled one."""
    from negalign_cli.models import PROJECT_MODELS, bundled_checkpoint
    from negalign_cli.toy.training import TrainConfig
    from negalign_cli.toy.training import train as run

    if init is not None and not init.is_file():
        raise NegalignError(f"--init checkpoint not found: {init}")
    config = TrainConfig(
        steps=steps,
        seed=seed,
        lr=lr,
        threads=threads,
        warmup=warmup,
        init=str(init) if init else None,
        device=device,
        workers=workers,
        eval_every=eval_every,
    )
    summary = run(config, out, log=stdout().print, reporter=o.reporter(verbose, quiet))
    stdout().print(f"final: {summary['final']}")
    if install:
        target = bundled_checkpoint(PROJECT_MODELS["negalign-toy"])
        assert target is not None  # negalign-toy ships a checkpoint
        shutil.copyfile(out / "negalign-toy.pt", target)
        stdout().print(f"installed {target}")


DemoCacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar=CACHE_ENV,
        help=f"Cache folder (else ${CACHE_ENV}, else OUT/cache, i.e. demo-output/cache): the demo keeps "
        "its cache beside its outputs, so deleting OUT removes everything it wrote.",
        show_default=False,
    ),
]


@guarded
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path(
        "demo-output"
    ),
    model: o.Model = "negalign-toy",
    pretrained: o.Pretrained = None,
    n_id: Annotated[int, typer.Option("--n-id", min=2, help="Images in the toy ID split.")] = 400,
    n_ood: Annotated[int, typer.Option("--n-ood", min=1, help="Images in each toy OOD split.")] = 200,
    workers: o.Workers = 0,
    cache_dir: DemoCacheDir = None,
    device: o.Device = "auto",
    precision: o.PrecisionOpt = o.Precision.fp32,
    batch_size: o.BatchSize = 256,
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Run the whole pipeline on the toy benchmark with the bundled toy CLIP: generate, split-vocab,
    cam (which also embeds), score, evaluate --compare --lambda sweep --id-group minority, CAM
    overlays of ID and OOD images, and the report. Prints the method table and a summary computed
    from it (best method per set, best λ per set, minority-group false alarms); writes results.json,
    metrics.csv, plots, overlays and report/report.html under --out."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.cli.render import render_results
    from negalign_cli.toy.demo import DemoSettings, run_demo, summarise
    from negalign_cli.toy.generate import ToySpec

    started = time.perf_counter()
    rt = o.runtime(cache_dir or (out / "cache"), device, precision, batch_size)
    report = o.reporter(verbose, quiet)
    loaded = o.load(model, pretrained, rt, report)
    workspace = Workspace.open(rt.cache_dir)
    settings = DemoSettings()
    result = run_demo(
        loaded,
        out,
        workspace,
        ToySpec(n_id=n_id, n_ood=n_ood),
        settings,
        batch_size=rt.batch_size,
        workers=workers or 0,
        reporter=report,
    )
    render_results(result.results)
    stdout().print("what the demo found (computed from the figures above):")
    for line in summarise(result.results):
        stdout().print(f"- {line}")
    seconds = time.perf_counter() - started
    sets = sum(name.startswith("cam ") for name, _ in result.steps)
    computed = sum(not r.hit for _, r in result.steps)
    served = (
        "everything served from the cache"
        if result.all_hits
        else f"all {computed} stages computed"
        if computed == len(result.steps)
        else f"{computed} of {len(result.steps)} stages computed, the rest from the cache"
    )
    stdout().print(
        f"demo: generate → split-vocab → cam ×{sets} → score ×{sets} → evaluate → overlays, report in "
        f"{seconds:.1f} s ({served}); "
        f"results in {out / 'results'}, {len(result.overlays)} CAM overlays in {out / 'viz'}, "
        f"the report in {result.report}"
    )


@guarded
def sanity(
    image: Annotated[
        Path | None,
        typer.Option("--image", help="An image (default: a generated toy image).", show_default=False),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes", "-c", help="Class preset or file (default: the toy classes).", show_default=False
        ),
    ] = None,
    negatives: Annotated[
        Path | None,
        typer.Option(
            "--negatives-split",
            help="A split-vocab --out folder (default: the toy vocabulary, split now).",
            show_default=False,
        ),
    ] = None,
    model: o.Model = "negalign-toy",
    pretrained: o.Pretrained = None,
    lam: Annotated[float, typer.Option("--lambda", help="λ of S_final.")] = 1.0,
    cache_dir: o.CacheDir = None,
    device: o.Device = "auto",
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """One image through the whole model, printing the method's sanity fields: predicted class,
    S_NegLabel plain and *, P_align, S_final, CAM valid."""
    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.toy.sanity import run_sanity

    rt = o.runtime(cache_dir, device, "fp32", 1)
    report = o.reporter(verbose, quiet)
    loaded = o.load(model, pretrained, rt, report)
    fields = run_sanity(
        loaded,
        Workspace.open(rt.cache_dir),
        image=image,
        classes=classes,
        negatives_split=negatives,
        lam=lam,
        reporter=report,
    )
    for key, value in fields.items():
        stdout().print(f"{key:>20}: {value}")


@app.command("report", epilog="Example: negalign toy report --model negalign-toy --out toy-report")
@guarded
def report(
    model: o.Model = "negalign-toy",
    pretrained: o.Pretrained = None,
    images: Annotated[int, typer.Option("--images", min=12, help="Images per figure.")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated test images.")] = 7,
    tau: Annotated[float, typer.Option("--tau", help="Threshold of the vocabulary-split role table.")] = 0.05,
    out: o.Out = None,
    cache_dir: o.CacheDir = None,
    device: o.Device = "auto",
    verbose: o.Verbose = 0,
    quiet: o.Quiet = False,
) -> None:
    """Known-answer figures of a model on the toy world: zero-shot accuracy, the vocabulary split,
    CAM localisation (IoU of every method × block beside a random map and a centre prior) and the
    background-pooling modes. Writes report.json."""
    import json

    from negalign_cli.cache.workspace import Workspace
    from negalign_cli.toy.report import toy_report

    rt = o.runtime(cache_dir, device, "fp32", 1)
    loaded = o.load(model, pretrained, rt, o.reporter(0, False))
    result = toy_report(loaded, Workspace.open(rt.cache_dir), n=images, seed=seed, tau=tau)
    zs, split = result["zero_shot"], result["split"]
    stdout().print(
        f"zero-shot accuracy: objects {100 * zs['object']:.1f}%, backgrounds {100 * zs['background']:.1f}%"
    )
    stdout().print(
        f"split: shapes with r > 0 {100 * split['shapes_r_positive']:.0f}%, backgrounds with r < 0 "
        f"{100 * split['backgrounds_r_negative']:.0f}%; roles at tau {tau:g}: {split['roles']}"
    )
    stdout().print(
        "localisation IoU (top 20% of patches vs the true mask): "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["localisation_iou"].items())
    )
    stdout().print(
        "background-embedding zero-shot accuracy: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["background_pooling_accuracy"].items())
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(result, indent=2))
        stdout().print(f"wrote {out / 'report.json'}")
