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
from tests.faults.helpers import cli


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
        rate["score from cache (all columns)"] / rate["bare GEMM (fp32)"],
    )
    assert record["environment"]["versions"]["torch"] == torch.__version__
    assert "score / bare GEMM" in result.output
