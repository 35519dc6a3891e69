"""NegAlign from Python: the method description's API on any image folders.

    python examples/api_usage.py --id /data/waterbirds_test_images --ood /data/placesbg \
        --classes waterbird --arch ViT-B/16 --device cuda --out api_scores.csv

    # on the toy world (`negalign toy generate --out toy`), with the toy model card's settings:
    python examples/api_usage.py --id toy/id/images --ood toy/ood_spurious/images \
        --classes toy/classes.txt --nouns toy/vocab.txt --arch negalign-toy --tau 0.05 \
        --groups 1 --cam-method gradxact --cam-block -2 --out api_scores.csv

It scores one image with every detail, then every image in batches, fits M3's statistics on
half of the ID images (never on the batch being scored), and prints AUROC / FPR@95 of NegLabel,
NegLabel* and NegAlign on the other half against the OOD images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image

from negalign_cli import CLIPNegAlign
from negalign_cli.compute.metrics import ood_metrics

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def image_files(folder: str) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES)


def open_image(path: Path) -> Image.Image:
    """The image as PIL decodes it: the API converts it to RGB as the CLI converts files (16-bit
    scaled to 8 bits, where ``convert("RGB")`` would clip it)."""
    with Image.open(path) as image:
        return image.copy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--id", required=True, help="folder of ID images")
    parser.add_argument("--ood", required=True, help="folder of OOD images")
    parser.add_argument(
        "--classes", default="waterbird", help="class preset, class file, or comma-separated names"
    )
    parser.add_argument(
        "--nouns", default="negrefine-imagenet-noun", help="noun negatives (bundled list or file)"
    )
    parser.add_argument("--adjs", default=None, help="adjective-phrase negatives (bundled list or file)")
    parser.add_argument("--arch", default="ViT-B/16", help="OpenAI name, open_clip name or project model")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--cam-method", default="gradcam")
    parser.add_argument("--cam-block", type=int, default=-1, help="the block whose ln_1 output the CAM reads")
    parser.add_argument("--lambda-bg", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--out", default="api_scores.csv", help="per-image scores (CSV)")
    args = parser.parse_args()

    # Custom class names: a preset, a file with one class a line, or a Python list of names.
    classes = args.classes.split(",") if "," in args.classes else args.classes
    model = CLIPNegAlign(
        train_dataset=classes,
        arch=args.arch,
        pretrained=args.pretrained,
        device=args.device,
        neg_nouns=args.nouns,
        neg_adjs=args.adjs,
        use_neglabel_star=True,  # S*: NegLabel with M2 (object-leaning negatives)
        use_role_aware_negatives=True,
        use_scale_stabilization=True,  # M3: z-scores with ID statistics (fit_calibration below)
        use_p_align=True,
        lambda_bg=args.lambda_bg,
        tau=args.tau,
        groups=args.groups,
        cam_method=args.cam_method,
        cam_block=args.cam_block,
        batch_size=args.batch_size,
    )
    id_files, ood_files = image_files(args.id), image_files(args.ood)
    calibration_files, test_files = id_files[::2], id_files[1::2]

    # M3's statistics come from ID images, not from the batch being scored.
    stats = model.fit_calibration([str(p) for p in calibration_files])  # paths: read as the CLI reads them
    print(f"M3 statistics from {len(calibration_files)} ID images: {stats}")

    # One image, every detail (as the method description prints them).
    img = open_image(test_files[0])
    details = model.detection_score(
        model.clip_preprocess(img).unsqueeze(0), orig_image=img, return_details=True
    )
    print(
        f"{test_files[0].name}: predicted {details['pred_name']} (cosine {details['pred_score']:.4f}), "
        f"CAM valid {details['cam_valid']}"
    )
    for key in ("s_neglabel_plain", "s_neglabel_star", "p_align", "s_final"):
        print(f"  {key:<17} {details[key]:.4f}")

    # Every image, in batches; one row per image with every component.
    frames = []
    for name, files in (("id", test_files), ("ood", ood_files)):
        for start in range(0, len(files), args.batch_size):
            chunk = files[start : start + args.batch_size]
            frame = model.detection_scores([str(p) for p in chunk], return_details=True)
            frame.insert(0, "path", [str(p) for p in chunk])
            frame.insert(1, "set", name)
            frames.append(frame)
    scores = pd.concat(frames, ignore_index=True)
    scores.to_csv(args.out, index=False)

    id_rows, ood_rows = scores[scores["set"] == "id"], scores[scores["set"] == "ood"]
    for label, column in (
        ("NegLabel", "s_neglabel_plain"),
        ("NegLabel*", "s_neglabel_star"),
        ("NegAlign (M3)", "s_final"),
    ):
        metrics = ood_metrics(id_rows[column].to_numpy(), ood_rows[column].to_numpy())
        print(f"{label:<14} AUROC {100 * metrics.auroc:6.2f}  FPR@95 {100 * metrics.fpr95:6.2f}")
    print(f"wrote {len(scores)} rows to {args.out}")
    model.close()


if __name__ == "__main__":
    main()
