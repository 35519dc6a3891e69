"""`negalign bench`: the per-image reference flow computes what the batched flow computes, and the
command writes every figure it prints."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from negalign_cli.compute.scores import ScoreConfig, ScoreInputs, compute_scores, group_order
from negalign_cli.compute.vision import CamConfig, cam_batch
from negalign_cli.models import load_model
from negalign_cli.stages.bench import BenchConfig, _score_inputs, reference_step
from tests.faults.helpers import cli, one_line_error


def test_reference_flow_equals_the_batched_flow():
    model = load_model("negalign-tiny-test", "random")
    generator = torch.Generator().manual_seed(3)
    config = BenchConfig(classes=20, negatives=300, score_images=1)
    inputs = _score_inputs(1, model.embed_dim, config, generator)
    images = torch.randn(3, 3, model.image_size, model.image_size, generator=generator)
    batched = cam_batch(model.model, images, inputs.classes, CamConfig())
    groups = 100
    grouping = group_order(config.negatives, groups)

    def encode_pairs(texts):
        with torch.inference_mode():
            return F.normalize(model.model.encode_text(model.tokenizer(texts)).float(), dim=-1)

    scores = compute_scores(
        ScoreInputs(
            images=batched.embeddings.numpy(),
            classes=inputs.classes,
            negatives=inputs.negatives,
            class_names=inputs.class_names,
            negative_names=inputs.negative_names,
        ),
        ScoreConfig(groups=groups),
        encode_pairs,
    )
    for i in range(3):
        one = reference_step(model, images[i : i + 1], inputs, config, grouping, groups)
        torch.testing.assert_close(one["embedding"][0], batched.embeddings[i], rtol=1e-5, atol=1e-6)
        assert int(one["pred_class"]) == int(batched.pred_class[i])
        # full backward into every weight gives the single-block backward's CAM
        torch.testing.assert_close(one["cam"][0], batched.cams[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(one["background"][0], batched.background[i], rtol=1e-4, atol=1e-5)
        assert abs(float(one["neglabel"]) - scores["s_neglabel_plain"][i]) < 1e-6
        assert abs(float(one["multimatch"]) - scores["s_multimatch"][i]) < 1e-5
    assert all(p.grad is None for p in model.model.parameters())  # the flow leaves no gradients


def test_bench_command_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = cli(
        "bench",
        "--model",
        "negalign-tiny-test",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--batches",
        "1",
        "--repeats",
        "2",
        "--classes",
        "10",
        "--negatives",
        "200",
        "--score-images",
        "300",
        "--per-image",
        "2",
        "--json",
        str(out),
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    flows = {row["flow"]: row for row in record["results"]}
    assert set(flows) >= {
        "image tower forward (ceiling)",
        "embed",
        "embed + CAM + background",
        "bare GEMM (fp32)",
        "score from cache (embeddings)",
        "score from cache (all columns)",
        "score + multi-matching",
        "full NegAlign pipeline",
        "per-image reference flow",
    }
    for row in flows.values():
        assert row["seconds"] > 0 and row["peak_mb"] > 0 and row["repeats"] == 2
        assert np.isclose(row["images_per_s"], row["images"] / row["seconds"])
    rate = {name: row["images_per_s"] for name, row in flows.items()}
    assert np.isclose(
        record["ratios"]["score / bare GEMM"],
        rate["score from cache (embeddings)"] / rate["bare GEMM (fp32)"],
    )
    assert np.isclose(
        record["ratios"]["all columns / bare GEMMs"],
        rate["score from cache (all columns)"] / rate["bare GEMMs with background (fp32)"],
    )
    assert record["environment"]["versions"]["torch"] == torch.__version__
    assert "score / bare GEMM" in result.output


def test_bench_runs_only_the_chosen_flows(tmp_path):
    out = tmp_path / "b.json"
    args = ["bench", "--model", "negalign-tiny-test", "--device", "cpu", "--flows", "score", "--repeats", "1"]
    result = cli(*args, "--classes", "10", "--negatives", "200", "--score-images", "100", "--json", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert [row["flow"] for row in record["results"]] == [
        "bare GEMM (fp32)",
        "score from cache (embeddings)",
        "bare GEMMs with background (fp32)",
        "score from cache (all columns)",
        "score + multi-matching",
        "score + multi-matching, pairs fetched",
    ]
    assert list(record["ratios"]) == [
        "score / bare GEMM",
        "all columns / bare GEMMs",
        "multi-matching / all columns",
        "multi-matching, pairs fetched / all columns",
    ]


# ----------------------------------------------------------------------------- issue 23: an honest bench
def test_bench_scores_real_like_embeddings_and_reports_distinct_pairs(tmp_path):
    """Multi-matching's cost depends on how many distinct (class, negative) pairs the images meet:
    the bench scores embeddings with real data's pair statistics and reports the count."""
    records = {}
    for kind in ("real-like", "random"):
        out = tmp_path / f"{kind}.json"
        args = ["bench", "--model", "negalign-tiny-test", "--device", "cpu", "--flows", "score,pipeline"]
        result = cli(
            *args,
            *("--repeats", "1", "--classes", "40", "--negatives", "400", "--score-images", "400"),
            *("--batch-size", "2", "--batches", "1", "--per-image", "1", "--embeddings", kind),
            "--json",
            str(out),
        )
        assert result.exit_code == 0, result.output
        records[kind] = json.loads(out.read_text())
    flows = {row["flow"]: row for row in records["real-like"]["results"]}
    assert "distinct pairs" in result.output
    assert "multi-matching / all columns" in records["real-like"]["ratios"]
    # the count is the number of distinct pairs the images' top-5 classes and negatives form
    generator = torch.Generator().manual_seed(0)
    config = BenchConfig(classes=40, negatives=400)
    inputs = _score_inputs(400, 32, config, generator, "real-like")
    x = torch.from_numpy(inputs.images)
    top_pos = (x @ inputs.classes.T).topk(5).indices
    top_neg = (x @ inputs.negatives.T).topk(5).indices
    formed = (top_pos[:, :, None] * 400 + top_neg[:, None, :]).unique().numel()
    real = flows["score + multi-matching"]["distinct_pairs"]
    assert abs(real - formed) <= 0.01 * formed  # fp32 near-ties may swap a 5th place
    assert flows["full NegAlign pipeline"]["distinct_pairs"] > 2 * 5  # not one embedding for all
    random = {row["flow"]: row for row in records["random"]["results"]}["score + multi-matching"]
    assert random["distinct_pairs"] > 0.65 * 25 * 400  # random unit vectors: most distinct (of 16,000)
    assert 3 * 400 < real < 0.8 * random["distinct_pairs"]  # pairs repeat (dimension 32: barely)
    assert records["real-like"]["config"]["embeddings"] == "real-like"


def test_bench_unknown_embeddings_is_one_error_line():
    result = cli("bench", "--model", "negalign-tiny-test", "--device", "cpu", "--embeddings", "pretty")
    one_line_error(result, "unknown --embeddings 'pretty': use real-like, random")


def test_random_weights_take_the_openai_architecture():
    """`--pretrained random` built open_clip's GELU config; the OpenAI weights users run are
    QuickGELU (slower in eager mode), so the bench builds random weights in that architecture."""
    from open_clip.transformer import QuickGELU

    from negalign_cli.models import openai_quick_gelu

    assert openai_quick_gelu("ViT-B-32") and openai_quick_gelu("ViT-B-16")
    assert not openai_quick_gelu("negalign-tiny-test")
    quick = load_model("ViT-B-32", "random", random_quick_gelu=True)
    plain = load_model("ViT-B-32", "random")
    assert any(isinstance(m, QuickGELU) for m in quick.model.modules())
    assert not any(isinstance(m, QuickGELU) for m in plain.model.modules())
    assert quick.config.get("quick_gelu") and quick.fingerprint != plain.fingerprint


def test_real_like_embeddings_repeat_pairs_as_real_images_do():
    """At CLIP's dimension, images of one class meet a limited set of related pairs: far fewer
    distinct pairs than random unit vectors (25 per image), far more than near-identical
    embeddings (a handful in all), and top-5 lists that differ from image to image."""
    config = BenchConfig(classes=100, negatives=2000)

    def distinct(kind: str) -> tuple[int, int]:
        inputs = _score_inputs(2000, 512, config, torch.Generator().manual_seed(1), kind)
        x = torch.from_numpy(inputs.images)
        top_pos = (x @ inputs.classes.T).topk(5).indices
        top_neg = (x @ inputs.negatives.T).topk(5).indices
        pairs = (top_pos[:, :, None] * 2000 + top_neg[:, None, :]).flatten(1)
        return pairs.unique().numel(), torch.unique(pairs.sort(dim=1).values, dim=0).shape[0]

    (real, real_lists), (random, _) = distinct("real-like"), distinct("random")
    assert random > 0.8 * 25 * 2000  # of 200,000 possible pairs
    assert 2 * 2000 < real < 0.5 * random
    assert real_lists > 0.9 * 2000  # hardly two images share all 25 pairs


def test_gpu_check_calls_existing_bench_flags_and_tabulates_a_cpu_record(tmp_path):
    """`benchmarks/gpu_check.sh` cannot run without a GPU: check what it calls instead. Every flag
    it passes to `negalign bench` exists, and its targets table reads a (CPU) bench record."""
    import importlib.util
    import re
    from pathlib import Path

    import typer

    from negalign_cli.cli.app import app

    root = Path(__file__).resolve().parents[1]
    script = (root / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    calls = [line for line in script.splitlines() if "negalign_cli bench" in line]
    assert len(calls) >= 3
    bench = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    known = {opt for param in bench.params for opt in (*param.opts, *param.secondary_opts)}
    used = {flag for line in calls for flag in re.findall(r"(?<=\s)--[a-z][a-z0-9-]*", line)}
    assert used and used <= known, used - known
    assert "gpu_table.py" in script

    out = tmp_path / "bench.json"
    args = ["bench", "--model", "negalign-tiny-test", "--device", "cpu", "--flows", "score", "--repeats", "1"]
    result = cli(*args, "--classes", "10", "--negatives", "200", "--score-images", "100", "--json", str(out))
    assert result.exit_code == 0, result.output
    spec = importlib.util.spec_from_file_location("gpu_table", root / "benchmarks" / "gpu_table.py")
    assert spec is not None and spec.loader is not None
    gpu_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_table)
    record = json.loads(out.read_text())
    text = gpu_table.table([record])
    rate = {row["flow"]: row["images_per_s"] for row in record["results"]}["score + multi-matching"]
    row = next(line for line in text.splitlines() if line.startswith("score + multi-matching, warm"))
    assert f"{rate:,.0f}" in row and "200,000" in row and "9,040" in row  # measured, target, now
    ratio = record["ratios"]["multi-matching / all columns"]
    assert f"{ratio:.3f}" in next(line for line in text.splitlines() if line.startswith("multi-matching /"))
