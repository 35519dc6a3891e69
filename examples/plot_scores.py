# %% [markdown]
# # Where NegAlign moves images: S* against P_align
#
# A notebook-style script (`# %%` cells: run it in VS Code / Jupyter, or as a plain script):
#
#     python examples/plot_scores.py runs/waterbirds            # a `make waterbirds` / waterbirds.sh OUT
#     python examples/plot_scores.py runs/waterbirds out.png
#
# It reads the ID and OOD `scores.parquet` and `results.json` of one run, and draws each image at
# (NegLabel*, P_align), with the line S* + λ·P_align = threshold at the chosen λ: the threshold
# that keeps 95% of ID images. Images below the line are called OOD.

# %%
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; remove in a notebook to see the figure inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

args = [a for a in sys.argv[1:] if not a.startswith("-")]  # a notebook kernel passes its own flags
RUN = Path(args[0] if args else os.environ.get("RUN", "runs/waterbirds"))
FIGURE = Path(args[1] if len(args) > 1 else RUN / "star_vs_palign.png")

# %% Load the scores (one row per image, every component) and the evaluation
results = json.loads((RUN / "results" / "results.json").read_text())
ood_name = next(iter(results["ood"]))
ood_file = Path(results["ood"][ood_name]["file"])  # as evaluate was given it: relative to where it ran
if not ood_file.is_file():
    ood_file = RUN / "scores" / ood_name / "scores.parquet"
frames = {
    "ID": pd.read_parquet(RUN / "scores" / "id" / "scores.parquet"),
    f"OOD: {ood_name}": pd.read_parquet(ood_file),
}
lam = results["ood"][ood_name]["methods"]["NegAlign"]["lambda"]
for name, frame in frames.items():
    print(
        f"{name}: {len(frame)} images, mean S* {frame['s_neglabel_star'].mean():.4f}, "
        f"mean P_align {frame['p_align'].mean():.4f}"
    )

# %% S_final at the chosen λ, and the threshold that keeps 95% of ID images
id_final = frames["ID"]["s_neglabel_star"] + lam * frames["ID"]["p_align"]
threshold = float(np.quantile(id_final, 0.05))
rejected = {
    name: float(((frame["s_neglabel_star"] + lam * frame["p_align"]) < threshold).mean())
    for name, frame in frames.items()
}
print(f"λ = {lam:g}; threshold {threshold:.4f}; share called OOD: {rejected}")

# %% The plot
fig, ax = plt.subplots(figsize=(6, 4.5))
for (name, frame), colour in zip(frames.items(), ("tab:blue", "tab:red"), strict=True):
    ax.scatter(
        frame["s_neglabel_star"],
        frame["p_align"],
        s=12,
        alpha=0.6,
        c=colour,
        label=f"{name} ({100 * rejected[name]:.0f}% called OOD)",
    )
x = np.linspace(*ax.get_xlim(), 50)
if lam > 0:
    ax.plot(x, (threshold - x) / lam, "k--", lw=1, label=f"S* + {lam:g}·P_align = {threshold:.3f}")
else:
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"S* = {threshold:.3f} (λ = 0)")
ax.set_xlabel("NegLabel* score S*")
ax.set_ylabel("P_align (background alignment)")
ax.set_title("NegAlign's two terms per image")
ax.legend(fontsize=8)
fig.tight_layout()
FIGURE.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(FIGURE, dpi=120)
print(f"wrote {FIGURE}")
