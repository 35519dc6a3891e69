"""``negalign sanity``: one image through the whole pipeline, with the method's sanity fields.

By default the image, the classes and the negative split come from a small toy benchmark made in
a scratch folder. S_final uses the stored components and the shared formula
(:func:`negalign_cli.compute.evaluation.final_score`); M3 needs ID statistics, which one image does
not have, so it is off here (``evaluate --scale-stabilize`` fits them on an ID set).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from negalign_cli.cache.workspace import Workspace
from negalign_cli.compute.evaluation import final_score
from negalign_cli.compute.scores import ScoreConfig
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.listing import list_images
from negalign_cli.inputs.words import load_classes, load_negatives
from negalign_cli.models import LoadedModel
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files
from negalign_cli.stages.images import cam_images, digest_images
from negalign_cli.stages.scoring import open_image_set, score_images
from negalign_cli.stages.vocab import VocabEntry, negatives_from_split, split_scores, split_vocab
from negalign_cli.toy.demo import TOY_CAM, TOY_TAU
from negalign_cli.toy.generate import ToySpec, generate_toy


def run_sanity(
    model: LoadedModel,
    workspace: Workspace,
    *,
    image: Path | None = None,
    classes: str | None = None,
    negatives_split: Path | None = None,
    lam: float = 1.0,
    reporter: Reporter | None = None,
) -> dict[str, str]:
    """The sanity fields of one image: predicted class, S_NegLabel plain and *, P_align, S_final
    (λ = ``lam``), CAM valid. Missing inputs come from a generated toy benchmark."""
    reporter = reporter or NullReporter()
    scratch = Path(tempfile.mkdtemp(prefix="negalign-sanity-"))
    try:
        if image is None or classes is None or negatives_split is None:
            generate_toy(scratch / "toy", ToySpec(n_id=2, n_ood=1), reporter)
        image_path = (
            image or scratch / "toy" / "id" / pd.read_csv(scratch / "toy" / "id" / "manifest.csv")["path"][0]
        )
        if not Path(image_path).is_file():
            raise NegalignError(f"image not found: {image_path}")
        class_list = load_classes(classes or str(scratch / "toy" / "classes.txt"), reporter)
        if negatives_split is None:
            vocab = load_negatives(scratch / "toy" / "vocab.txt", reporter)
            scores = split_scores(model, [VocabEntry(vocab, "noun")], workspace, reporter=reporter)
            split_vocab(scores.artifact, workspace, tau=TOY_TAU, reporter=reporter).artifact.export(
                scratch / "split"
            )
            negatives_split = scratch / "split"
        (scratch / "one.csv").write_text(f"path\n{Path(image_path).resolve()}\n")
        listing = digest_images(list_images(scratch / "one.csv"), reporter)
        cam = cam_images(model, listing, class_list, workspace, TOY_CAM, workers=0, reporter=reporter)
        cam.artifact.export(scratch / "cam")
        scored = score_images(
            model,
            open_image_set(scratch / "cam"),
            class_list,
            negatives_from_split(negatives_split),
            workspace,
            ScoreConfig(groups=1, role_aware=True, include_ambiguous=True),
            reporter=reporter,
        )
        row = pd.read_parquet(scored.artifact.file(files.SCORES)).iloc[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    final = final_score(np.array([row["s_neglabel_star"]]), np.array([row["p_align"]]), lam)[0]
    return {
        "image": str(image_path),
        "predicted class": f"{row['pred_name']} (index {row['pred_class']})",
        "S_NegLabel plain": f"{row['s_neglabel_plain']:.6f}",
        "S_NegLabel*": f"{row['s_neglabel_star']:.6f}",
        "P_align": f"{row['p_align']:.6f}",
        f"S_final (λ={lam:g})": f"{final:.6f}",
        "CAM valid": str(bool(row["cam_valid"])),
    }
