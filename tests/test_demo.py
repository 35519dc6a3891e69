from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from negalign_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DEMO_AUROC = {
    "spurious": {
        "MCM": 0.9921,
        "Energy": 1.0,
        "MaxLogit": 1.0,
        "NegLabel": 1.0,
        "NegRefine": 1.0,
        "NegLabel*": 0.9662,
        "NegAlign": 0.9662,
    },
    "spurious_object": {
        "MCM": 0.9721,
        "Energy": 0.9985,
        "MaxLogit": 0.9985,
        "NegLabel": 0.9988,
        "NegRefine": 0.994,
        "NegLabel*": 0.9988,
        "NegAlign": 0.9988,
    },
    "nonspurious": {
        "MCM": 0.9696,
        "Energy": 0.9954,
        "MaxLogit": 0.9954,
        "NegLabel": 0.9971,
        "NegRefine": 0.9925,
        "NegLabel*": 0.9971,
        "NegAlign": 0.9971,
    },
}
DEMO_MINORITY_REJECTED = {
    "MCM": 0.0213,
    "Energy": 0.0851,
    "MaxLogit": 0.0851,
    "NegLabel": 0.0638,
    "NegRefine": 0.0638,
    "NegLabel*": 0.0638,
    "NegAlign": 0.0638,
}


@pytest.mark.slow
def test_demo_runs_end_to_end_and_then_from_the_cache(toy_demo):
    """What `make demo` runs (smaller): the whole pipeline on the bundled toy CLIP in a real process
    (tests/conftest.py), then a rerun in-process."""
    demo, first = toy_demo
    tmp_path = demo.parent
    command = ["demo", "--out", str(demo), "--n-id", "80", "--n-ood", "40"]
    env = {"COLUMNS": "160", "NEGALIGN_CACHE": str(tmp_path / "cache")}  # the fixture's cache
    assert first.returncode == 0, first.stderr[-3000:]
    for method in ("MCM", "NegLabel", "NegRefine", "NegLabel*", "NegAlign"):
        assert method in first.stdout
    results = json.loads((tmp_path / "demo" / "results" / "results.json").read_text())
    assert set(results["ood"]) == {"spurious", "spurious_object", "nonspurious"}
    assert results["id"]["n"] == 80 + 40  # id and id_minority
    assert "what the demo found" in first.stdout and "minority ID images" in first.stdout
    auroc = {
        name: {m: v["metrics"]["neglabel"]["auroc"] for m, v in block["methods"].items()}
        for name, block in results["ood"].items()
    }
    # every method on every split, as `negalign demo --n-id 80 --n-ood 40` measured them with the
    # bundled checkpoint (model card: the 400/200 figures); deterministic up to float order
    for name, methods in DEMO_AUROC.items():
        for method, expected in methods.items():
            assert auroc[name][method] == pytest.approx(expected, abs=0.01), (name, method)
    # the sets separate methods: negative labels beat MCM on unknown objects on ID backgrounds, and
    # role-aware negatives (object words only) lose background-only images that NegLabel catches
    assert auroc["spurious_object"]["NegLabel"] > auroc["spurious_object"]["MCM"] + 0.02
    assert auroc["spurious"]["NegLabel*"] < auroc["spurious"]["NegLabel"] - 0.02
    minority = results["id_groups"]["minority"]
    assert minority["n"] == 47 and minority["rejected"] == pytest.approx(DEMO_MINORITY_REJECTED, abs=0.025)
    for name in ("id", "spurious", "spurious_object", "nonspurious"):  # CAM overlays of ID and every OOD set
        assert len(list((tmp_path / "demo" / "viz" / name).glob("*.png"))) == 2
    for name in ("report.html", "report.md", "report.tex", "figures/cam_grid.png"):
        assert (tmp_path / "demo" / "report" / name).is_file()
    for name in ("roc.png", "score_hist.png", "metrics.csv"):
        assert (tmp_path / "demo" / "results" / name).is_file()
    second = CliRunner().invoke(app, command, env=env)
    assert second.exit_code == 0 and "everything served from the cache" in second.stdout, second.output


@pytest.mark.slow
def test_sanity_prints_the_method_document_fields(tmp_path):
    result = CliRunner().invoke(app, ["sanity", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output[-2000:]
    for field in ("predicted class", "S_NegLabel plain", "S_NegLabel*", "P_align", "S_final", "CAM valid"):
        assert field in result.stdout


def _block(aurocs: dict[str, float], sweep: dict[float, float] | None = None) -> dict:
    block: dict = {"methods": {m: {"metrics": {"neglabel": {"auroc": a}}} for m, a in aurocs.items()}}
    if sweep is not None:
        block["lambda_sweep"] = {
            str(k): {"lambda": k, "metrics": {"neglabel": {"auroc": v}}} for k, v in sweep.items()
        }
        block["best_lambda"] = max(sorted(sweep), key=lambda k: sweep[k])
        block["methods"]["NegAlign"] = {
            "lambda": block["best_lambda"],
            "metrics": {"neglabel": {"auroc": max(sweep.values())}},
        }
    return block


def test_summary_is_computed_from_the_figures():
    from negalign_cli.toy.demo import summarise

    results = {
        "metrics_convention": "neglabel",
        "ood": {
            "a": _block({"MCM": 0.7, "NegLabel": 0.9}, {0.0: 0.8, 1.0: 0.85, 5.0: 0.6}),
            "b": _block({"MCM": 1.0, "NegLabel": 1.0}, {0.0: 1.0, 1.0: 1.0}),
            "c": _block({"MCM": 0.91, "NegLabel": 0.6}, {0.0: 0.6, 1.0: 0.55}),
        },
        "mean": {"methods": {"NegAlign": {"lambda": None}}},
        "id_groups": {
            "minority": {"n": 30, "keep": 0.95, "rejected": {"MCM": 0.3, "NegLabel": 0.1, "NegAlign": 0.2}}
        },
    }
    lines = summarise(results)
    assert lines[0] == "a: best NegLabel (AUROC 90.00%); worst MCM (70.00%)"
    assert lines[1].startswith("b: every method scores AUROC 100.00%")
    assert lines[2] == "c: best MCM (AUROC 91.00%); worst NegAlign (55.00%)" or lines[2].startswith(
        "c: best MCM"
    )
    assert lines[3].startswith("P_align helps on a;") and "a λ=1 (+5.00 AUROC over λ=0)" in lines[3]
    assert "b λ=0 (no gain)" in lines[3] and "c λ=0 (no gain)" in lines[3]
    assert lines[4].startswith("minority ID images (30)") and lines[4].endswith(
        "NegLabel 10.0%, NegAlign 20.0%, MCM 30.0%"
    )
    # a different figure, a different sentence: nothing is canned
    results["ood"]["a"] = _block({"MCM": 0.95, "NegLabel": 0.9}, {0.0: 0.9, 1.0: 0.85})
    again = summarise(results)
    assert again[0].startswith("a: best MCM (AUROC 95.00%)") and again[3].startswith(
        "P_align helps on no set"
    )
