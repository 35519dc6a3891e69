"""``negalign demo``: the whole pipeline on the toy benchmark and the bundled toy CLIP.

generate → split-vocab → cam (the ID test set and each OOD set; it also embeds) → score → evaluate
--compare --lambda sweep --id-group minority, then CAM overlays of ID and of every OOD set
(``viz/<set>/``), the report (``report/``: report.html, report.md, report.tex) and a summary
computed from the measured figures (:func:`summarise`). Every step but the drawing is a cached
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
from negalign_cli.defaults import DEFAULT_LAMBDAS, DEFAULT_TAU, NEGALIGN
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.words import load_classes, load_negatives
from negalign_cli.models import LoadedModel
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files
from negalign_cli.stages.evaluation import EvaluateRequest, evaluate
from negalign_cli.stages.images import cam_images, digest_images
from negalign_cli.stages.plots import write_cam_overlays
from negalign_cli.stages.report import build_report
from negalign_cli.stages.results_json import loads_results
from negalign_cli.stages.scoring import open_image_set, score_images
from negalign_cli.stages.vocab import VocabEntry, negatives_from_split, split_scores, split_vocab
from negalign_cli.toy.generate import GROUPS, ID_TEST, ToySpec, generate_toy

OOD_SETS = ("ood_spurious", "ood_spurious_object", "ood_nonspurious")
ID_SET = "id"  # the ID test set: toy id_test.csv (id and id_minority)


TOY_TAU = DEFAULT_TAU  # NegAlign's own: negalign-toy's r-scores (|r| ≥ 0.33, model card) suit it
TOY_CAM = CamConfig(method="gradxact", block=-2)  # the best localiser of the model card (IoU 0.47)


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
    for name in (ID_SET, *OOD_SETS):
        manifest = data / ID_TEST if name == ID_SET else data / name / "manifest.csv"
        listing = digest_images(list_images(manifest), reporter)
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
        score_files[ID_SET],
        [(name.removeprefix("ood_"), score_files[name]) for name in OOD_SETS],
        lambdas=list(settings.lambdas),
        compare=True,
        id_groups=[("minority", data / GROUPS / "minority.csv")],
    )
    evaluated = evaluate(request, workspace, reporter)
    steps.append(("evaluate", evaluated))
    evaluated.artifact.export(out / "results")
    results = loads_results((out / "results" / files.RESULTS).read_text(encoding="utf-8"))
    overlays = []
    for name in ("id", *OOD_SETS):
        overlays += write_cam_overlays(
            out / "cam" / name, settings.viz, out / "viz" / name.removeprefix("ood_"), model.image_size
        )
    report = build_report(
        out / "results",
        out / files.REPORT_DIR,
        reporter=reporter,
        stat_cache=workspace.store.stat_cache,
        store=workspace.store,  # a second demo copies the report's figures from the cache
    )
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


def summarise(results: dict, tolerance: float = 0.0005) -> list[str]:
    """What the demo found, in sentences computed from ``results.json``: the best method on each
    OOD set (AUROC; methods within ``tolerance`` of the best share the place), the best λ per set
    and whether P_align helps there (AUROC above λ = 0), and the share of the minority ID group
    each method rejects at the threshold keeping 95% of all ID images."""
    convention = results["metrics_convention"]
    lines = []
    for name, block in results["ood"].items():
        auroc = {m: v["metrics"][convention]["auroc"] for m, v in block["methods"].items()}
        top = max(auroc.values())
        best = [m for m, a in auroc.items() if a >= top - tolerance]
        if len(best) == len(auroc):
            lines.append(
                f"{name}: every method scores AUROC {100 * top:.2f}% (the set does not separate them)"
            )
            continue
        worst = min(auroc, key=lambda m: auroc[m])
        lines.append(
            f"{name}: best {' = '.join(best)} (AUROC {100 * top:.2f}%); "
            f"worst {worst} ({100 * auroc[worst]:.2f}%)"
        )
    per_set, gains = [], []
    for name, block in results["ood"].items():
        if not block.get("lambda_sweep"):
            continue
        auroc = {float(k): v["metrics"][convention]["auroc"] for k, v in block["lambda_sweep"].items()}
        lam = float(block["best_lambda"])
        gain = auroc[lam] - auroc[0.0] if 0.0 in auroc else None
        if gain is not None and lam > 0 and gain > 0:
            gains.append(name)
            per_set.append(f"{name} λ={lam:g} (+{100 * gain:.2f} AUROC over λ=0)")
        else:
            per_set.append(f"{name} λ={lam:g}" + (" (no gain)" if gain is not None else ""))
    if per_set:
        verdict = f"P_align helps on {', '.join(gains)}" if gains else "P_align helps on no set"
        lines.append(f"{verdict}; best λ per set: " + "; ".join(per_set))
    for group, entry in results.get("id_groups", {}).items():
        rejected = entry["rejected"]
        order = sorted(rejected, key=lambda m: rejected[m])
        shares = ", ".join(f"{m}{_lambda_label(results, m)} {100 * rejected[m]:.1f}%" for m in order)
        lines.append(
            f"{group} ID images ({entry['n']}) rejected at the threshold keeping {100 * entry['keep']:g}% "
            f"of all ID (all ID: {100 * (1 - entry['keep']):.0f}%): {shares}"
        )
    return lines


def _lambda_label(results: dict, method: str) -> str:
    if method != NEGALIGN:
        return ""
    lam = results["mean"]["methods"].get(NEGALIGN, {}).get("lambda")
    return f" (λ={lam:g})" if lam is not None else ""
