"""``negalign demo``: the whole pipeline on the toy benchmark and the bundled toy CLIP.

generate → split-vocab → cam (ID and both OOD sets; it also embeds) → score → evaluate
--compare --lambda sweep, then CAM overlays of ID and of every OOD set (``viz/<set>/``) and the
report (``report/``: report.html, report.md, report.tex). Every step but the drawing is a cached
stage, so a second run is served from the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from negalign_cli.cache.store import StageResult
from negalign_cli.cache.workspace import Workspace
from negalign_cli.compute.scores import ScoreConfig
from negalign_cli.compute.vision import CamConfig
from negalign_cli.defaults import DEFAULT_LAMBDAS
from negalign_cli.inputs.datasets import list_images
from negalign_cli.inputs.words import load_classes, load_negatives
from negalign_cli.models import LoadedModel
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files
from negalign_cli.stages.evaluation import EvaluateRequest, evaluate
from negalign_cli.stages.images import cam_images, digest_images
from negalign_cli.stages.plots import write_cam_overlays
from negalign_cli.stages.report import build_report
from negalign_cli.stages.scoring import open_image_set, score_images
from negalign_cli.stages.vocab import VocabEntry, negatives_from_split, split_scores, split_vocab
from negalign_cli.toy.generate import ToySpec, generate_toy

OOD_SETS = ("ood_spurious", "ood_nonspurious")


TOY_TAU = 0.001  # negalign-toy's r-scores are ~100× smaller than NegAlign's tau assumes
TOY_CAM = CamConfig(method="gradxact", block=-1)  # the best localiser of the model card (IoU 0.49)


@dataclass(frozen=True)
class DemoSettings:
    """The toy model card's recommendations (negalign_cli/assets/models/negalign-toy.md)."""

    tau: float = TOY_TAU
    cam: CamConfig = TOY_CAM
    groups: int = 1  # the toy vocabulary holds 30 words: NegLabel's 100 groups need more
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    viz: int = 2  # CAM overlays per set (ID and each OOD set)


@dataclass
class DemoResult:
    results: dict
    steps: list[tuple[str, StageResult]]
    out: Path
    overlays: list[Path] = field(default_factory=list)
    report: Path | None = None

    @property
    def all_hits(self) -> bool:
        return all(result.hit for _, result in self.steps)


def run_demo(
    model: LoadedModel,
    out: Path,
    workspace: Workspace,
    toy: ToySpec,
    settings: DemoSettings,
    *,
    batch_size: int = 256,
    workers: int = 0,
    reporter: Reporter | None = None,
) -> DemoResult:
    reporter = reporter or NullReporter()
    out = Path(out)
    data = out / "toy"
    marker = data / ".spec.json"
    if not marker.is_file() or json.loads(marker.read_text()) != _spec_json(toy):
        generate_toy(data, toy, reporter)
        (data / ".spec.json").write_text(json.dumps(_spec_json(toy)))
    else:
        reporter.info(f"toy benchmark already in {data}")
    steps: list[tuple[str, StageResult]] = []
    classes = load_classes(str(data / "classes.txt"), reporter)
    vocab = load_negatives(data / "vocab.txt", reporter)
    scores = split_scores(
        model, [VocabEntry(vocab, "noun")], workspace, batch_size=batch_size, reporter=reporter
    )
    steps.append(("split-scores", scores))
    split = split_vocab(scores.artifact, workspace, tau=settings.tau, reporter=reporter)
    steps.append(("split-vocab", split))
    split.artifact.export(out / "split")
    negatives = negatives_from_split(out / "split")
    score_files = {}
    for name in ("id", *OOD_SETS):
        listing = digest_images(list_images(data / name / "manifest.csv"), reporter)
        cam = cam_images(
            model,
            listing,
            classes,
            workspace,
            settings.cam,
            batch_size=batch_size,
            workers=workers,
            reporter=reporter,
        )
        steps.append((f"cam {name}", cam))
        cam.artifact.export(out / "cam" / name)
        scored = score_images(
            model,
            open_image_set(out / "cam" / name),
            classes,
            negatives,
            workspace,
            ScoreConfig(groups=settings.groups, role_aware=True, include_ambiguous=True),
            batch_size=batch_size,
            reporter=reporter,
        )
        steps.append((f"score {name}", scored))
        scored.artifact.export(out / "scores" / name)
        score_files[name] = out / "scores" / name / files.SCORES
    request = EvaluateRequest(
        score_files["id"],
        [(name.removeprefix("ood_"), score_files[name]) for name in OOD_SETS],
        lambdas=list(settings.lambdas),
        compare=True,
    )
    evaluated = evaluate(request, workspace, reporter)
    steps.append(("evaluate", evaluated))
    evaluated.artifact.export(out / "results")
    results = json.loads((out / "results" / files.RESULTS).read_text(encoding="utf-8"))
    overlays = []
    for name in ("id", *OOD_SETS):
        overlays += write_cam_overlays(
            out / "cam" / name, settings.viz, out / "viz" / name.removeprefix("ood_"), model.image_size
        )
    report = build_report(out / "results", out / files.REPORT_DIR, reporter=reporter)
    return DemoResult(results, steps, out, overlays, report.out / files.REPORT_HTML)


def _spec_json(spec: ToySpec) -> dict:
    return {
        "seed": spec.seed,
        "n_id": spec.n_id,
        "n_ood": spec.n_ood,
        "n_train": spec.n_train,
        "correlation": spec.correlation,
        "id_shapes": list(spec.id_shapes),
        "id_backgrounds": [list(g) for g in spec.id_backgrounds],
    }
