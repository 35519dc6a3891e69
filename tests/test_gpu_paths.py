"""The image tower's GPU paths, checked on the CPU (issue 23, item 2): the forward in two passes
(the blocks before the CAM block without autograd), the CAM tail as batched tensor work with no
host synchronisation and numpy's exact foreground rule in any precision, and ``--compile`` (a
compile that fails falls back to eager with one warning; compiled outputs equal eager ones within
float rounding, so the setting stays out of the cache keys)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from negalign_cli.compute import vision
from negalign_cli.compute.vision import (
    EAGER_PASSES,
    CamBatch,
    CamConfig,
    cam_batch,
    cam_from_gradients,
    cam_masks,
    encode_images,
    foreground_mask,
)
from negalign_cli.defaults import BG_POOLS, CAM_METHODS
from negalign_cli.errors import NegalignError
from negalign_cli.models import ImageTower, check_compile, compile_wanted, use_compile_cache
from negalign_cli.reporting import RecordingReporter
from tests.test_vision import numpy_foreground


# --------------------------------------------------------------------------- 1. two passes
def hooked_cam_batch(model, images, class_features, config) -> CamBatch:
    """``cam_batch`` as it was before the two passes: one forward under autograd, the ln_1 output
    of the CAM block swapped for a leaf by a hook, the final tokens and the last block's input
    captured by hooks."""
    tower = vision.vision_tower(model)
    with vision._hooks(tower, config.block) as capture, torch.enable_grad():
        embeddings = F.normalize(model.encode_image(images).float(), dim=-1)
        pred_score, pred_class = (embeddings @ class_features.T).max(dim=-1)
        hooked = capture.require("activation")
        (gradient,) = torch.autograd.grad(pred_score.sum(), hooked)
    cams = cam_from_gradients(hooked.detach(), gradient, config.method).view(-1, *tower.grid)
    foreground = foreground_mask(cams, config.fg_percentile, config.dilate)
    finite = torch.isfinite(cams).flatten(1).all(dim=1)
    valid = finite & (cams.flatten(1).amax(dim=1) > 0) & (~foreground).flatten(1).any(dim=1)
    with torch.inference_mode():
        pool = vision.BG_POOL_REGISTRY[config.bg_pool]
        background = pool(model, tower, images, capture, ~foreground | ~valid.view(-1, 1, 1))
    return CamBatch(
        embeddings.detach(),
        pred_class,
        pred_score.detach(),
        torch.nan_to_num(cams.float()),
        foreground,
        valid,
        background,
    )


# every pool and method, the last block and the first (the tiny model has two)
TWO_PASS_CASES = [("gradcam", -1, pool) for pool in BG_POOLS] + [
    ("gradxact", 0, "tokens"),
    ("gradxact", 0, "mask"),
]
assert {case[0] for case in TWO_PASS_CASES} == set(CAM_METHODS)


def test_two_passes_equal_the_hooked_forward_bit_for_bit(setup):
    model, images, classes = setup
    for method, block, bg_pool in TWO_PASS_CASES:
        config = CamConfig(method=method, block=block, bg_pool=bg_pool)
        got = cam_batch(model, images, classes, config)
        expected = hooked_cam_batch(model, images, classes, config)
        for name in ("embeddings", "pred_class", "pred_score", "cams", "foreground", "valid", "background"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (config, name)
        assert got.cams.abs().sum() > 0 and got.foreground.any()


def test_two_passes_with_open_clips_custom_blocks(setup):
    """Towers built from ``CustomResidualAttentionBlock`` (qk-norm, scaled attention) take the
    same two passes, bit for bit."""
    import open_clip

    _, images, classes = setup
    torch.manual_seed(0)
    vision_cfg = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    custom = open_clip.model.CLIP(
        64,
        {**vision_cfg, "qk_norm": True, "scale_attn": True},
        {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    custom.requires_grad_(False)
    assert type(custom.visual.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    for block in (-1, 0):
        config = CamConfig(block=block, bg_pool="tokens")
        got = cam_batch(custom, images, classes, config)
        expected = hooked_cam_batch(custom, images, classes, config)
        for name in ("embeddings", "cams", "foreground", "background"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (block, name)
        assert got.cams.abs().sum() > 0


def test_a_block_out_of_range_is_refused_not_wrapped(setup):
    model, images, classes = setup
    for block in (2, -3):  # the tiny model has blocks 0, 1 (-2, -1)
        with pytest.raises(NegalignError, match=f"--block {block} is out of range for a tower of 2 blocks"):
            cam_batch(model, images, classes, CamConfig(block=block))


def test_blocks_before_the_cam_block_run_without_autograd(setup):
    """Autograd is off in every block before the CAM block and on from its attention on (before
    the two passes, the whole forward ran with autograd on)."""
    model, images, classes = setup
    blocks = model.visual.transformer.resblocks
    seen: list[tuple[int, str, bool]] = []
    handles = [
        getattr(block, part).register_forward_pre_hook(
            lambda m, a, i=i, part=part: seen.append((i, part, torch.is_grad_enabled()))
        )
        for i, block in enumerate(blocks)
        for part in ("attn", "mlp")
    ]
    try:
        cam_batch(model, images, classes, CamConfig(block=1, bg_pool="tokens"))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [(0, "attn", False), (0, "mlp", False), (1, "attn", True), (1, "mlp", True)]


def test_encode_images_through_the_passes_equals_open_clip(setup):
    model, images, _ = setup
    with torch.inference_mode():
        expected = F.normalize(model.encode_image(images).float(), dim=-1)
    assert torch.equal(encode_images(model, images), expected)
    assert torch.equal(encode_images(model, images, EAGER_PASSES), expected)


# --------------------------------------------------------------------------- 2. the CAM tail
def numpy_tail(cams: np.ndarray, percentile: float, dilate: int):
    """The documented rule in numpy float64: foreground, validity, background patches."""
    foreground = numpy_foreground(cams, percentile, dilate)
    flat = cams.reshape(len(cams), -1).astype(np.float64)
    valid = np.isfinite(flat).all(1) & (flat.max(1) > 0) & (~foreground).reshape(len(cams), -1).any(1)
    return foreground, valid, ~foreground | ~valid[:, None, None]


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def cam_maps(draw):
    """Batches of CAMs of every kind the tail meets: continuous values, coarse ties, constant
    maps, all-zero maps, mostly-zero maps (ReLU'd), negative values; in float32, float16, bfloat16."""
    side = draw(st.sampled_from([2, 3, 4, 7, 14, 16]))
    count = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["continuous", "ties", "constant", "zeros", "relu"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (count, side, side)
    if kind == "continuous":
        values = rng.standard_normal(shape) * draw(st.sampled_from([1e-6, 1.0, 1e3]))
    elif kind == "ties":
        values = rng.integers(0, draw(st.integers(1, 4)) + 1, shape) / 4.0
    elif kind == "constant":
        values = np.full(shape, draw(st.sampled_from([0.0, 0.25, 3.0, -1.0])))
    elif kind == "zeros":
        values = np.zeros(shape)
    else:
        values = np.maximum(rng.standard_normal(shape), 0.0)
    dtype = _DTYPES[draw(st.sampled_from(list(_DTYPES)))]
    cams = torch.from_numpy(values.astype(np.float32)).to(dtype)
    percentile = draw(
        st.sampled_from([0.0, 50.0, 80.0, 90.0, 100.0]) | st.integers(0, 1000).map(lambda k: k / 10)
    )
    return cams, percentile, draw(st.integers(0, 2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cam_maps())
def test_cam_tail_equals_the_numpy_rule_in_any_precision(case):
    """Bit-identical masks: the tensor tail on float32, float16 and bfloat16 CAMs against numpy's
    float64 rule on the same values (ties, constant and all-zero maps included)."""
    cams, percentile, dilate = case
    foreground, valid, background = cam_masks(cams, percentile, dilate)
    expected = numpy_tail(cams.to(torch.float64).numpy(), percentile, dilate)
    np.testing.assert_array_equal(foreground.numpy(), expected[0])
    np.testing.assert_array_equal(valid.numpy(), expected[1])
    np.testing.assert_array_equal(background.numpy(), expected[2])


def test_cam_tail_of_constant_zero_and_nan_maps():
    cams = torch.stack([torch.full((14, 14), 2.0), torch.zeros(14, 14), torch.full((14, 14), float("nan"))])
    foreground, valid, background = cam_masks(cams, 80.0, 1)
    assert foreground[0].all() and not foreground[1].any()  # a constant map is all at its percentile
    assert not valid.any()  # no background left, no positive value, not finite
    assert background.all()  # an invalid CAM pools the whole image


class HostSyncs(TorchDispatchMode):
    """Records the operators that make a CUDA device wait for the host or copy to it: reading a
    value (``.item()``, ``bool(tensor)``), outputs whose size depends on the data (``nonzero``,
    boolean indexing, ``masked_select``, ``unique``), comparisons answered on the host, copies to
    the CPU from another device."""

    SYNCING = {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::is_nonzero",
        "aten::equal",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
    }

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in self.SYNCING:
            self.found.append(str(func))
        elif (
            name == "aten::repeat_interleave"
            and func._overloadname != "self_int"
            and not kwargs.get("output_size")
        ):
            self.found.append(str(func))  # repeats given as a tensor: the output is counted on the host
        elif name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.found.append(str(func))
        elif name in ("aten::_to_copy", "aten::copy_") and tensors:
            target = kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu" and tensors[0].device.type != "cpu":
                self.found.append(str(func))
        return func(*args, **kwargs)


def test_the_detector_sees_host_syncs():
    with HostSyncs() as mode:
        values = torch.tensor([0.0, 2.0, 1.0])
        values.max().item()
        values[values > 0.5]
        bool(values.sum() > 0)
    assert len(mode.found) == 3, mode.found


def test_cam_batch_never_waits_for_the_host(setup):
    """The whole batch (forward, single-block backward, CAM, percentile, dilation, validity,
    background pooling) is device work: nothing reads a value back or sizes an output by the data."""
    model, images, classes = setup
    methods = ["gradcam", "gradxact", "gradcam", "gradxact"]
    with HostSyncs() as mode:
        for bg_pool, method, dilate in zip(BG_POOLS, methods, [2, 0, 1, 1], strict=True):
            config = CamConfig(method=method, bg_pool=bg_pool, dilate=dilate, fg_percentile=33.3 + dilate)
            cam_batch(model, images, classes, config)
    assert mode.found == []


def test_cam_tail_runs_on_shapes_alone():
    """On the meta device (shapes, no values) any read of a value fails: the tail reads none."""
    foreground, valid, background = cam_masks(torch.empty(512, 14, 14, device="meta"), 80.0, 1)
    assert foreground.shape == background.shape == (512, 14, 14) and valid.shape == (512,)
    assert foreground.dtype == valid.dtype == torch.bool


# --------------------------------------------------------------------------- 3. --compile
def test_compile_modes():
    assert [compile_wanted(m, "cpu") for m in ("auto", "on", "off")] == [False, True, False]
    assert [compile_wanted(m, "cuda") for m in ("auto", "on", "off")] == [True, True, False]
    assert compile_wanted(" On ", torch.device("cpu"))
    with pytest.raises(NegalignError, match="unknown --compile 'sometimes': use auto, on, off"):
        check_compile("sometimes")


class _CompilerBroken(RuntimeError):
    pass


@contextlib.contextmanager
def broken_compiler(monkeypatch):
    """torch.compile whose compiled functions fail on their first call, as inductor does without a
    C compiler or Triton; counts the calls."""
    calls = {"compile": 0, "compiled": 0}

    def fake_compile(function, **kwargs):
        calls["compile"] += 1

        def compiled(*args, **kw):
            calls["compiled"] += 1
            raise _CompilerBroken("InductorError: no working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    yield calls


def test_a_failing_compile_falls_back_to_eager_with_one_warning(setup, monkeypatch, tmp_path):
    model, images, classes = setup
    config = CamConfig(bg_pool="mask")  # the pool that runs the encode pass too
    reporter = RecordingReporter()
    with broken_compiler(monkeypatch) as calls:
        tower = ImageTower(model, compiled=True, cache=tmp_path / "compiled")
        first = tower.cam(images, classes, config, reporter)
        second = tower.cam(images, classes, config, reporter)
        embedded = tower.encode(images, reporter)
    expected = cam_batch(model, images, classes, config)
    for out in (first, second):
        for name in ("embeddings", "cams", "foreground", "valid", "background"):
            assert torch.equal(getattr(out, name), getattr(expected, name)), name
    assert torch.equal(embedded, encode_images(model, images))
    warnings = [m for kind, m in reporter.messages if kind == "warn"]
    assert len(warnings) == 1, warnings
    assert (
        "torch.compile of the image tower failed" in warnings[0] and "no working C++ compiler" in warnings[0]
    )
    assert "--compile off" in warnings[0]
    assert calls == {"compile": 3, "compiled": 1}  # compiled once, tried once, eager from then on
    assert not tower.compiled and tower.requested and "_CompilerBroken" in str(tower.failure)


def test_errors_that_are_not_the_compilers_are_not_swallowed(setup, monkeypatch):
    model, images, classes = setup
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)
    tower = ImageTower(model, compiled=True)
    reporter = RecordingReporter()

    def refused(passes):
        raise NegalignError("--block 7 is out of range")

    with pytest.raises(NegalignError, match="out of range"):
        tower.run(refused, reporter)
    assert tower.compiled and reporter.messages == []
    assert torch.equal(tower.encode(images, reporter), encode_images(model, images))


def test_the_compile_cache_is_the_negalign_caches(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_compile_cache(tmp_path / "cache" / "compiled")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "compiled")
    assert (tmp_path / "cache" / "compiled").is_dir()
    use_compile_cache(tmp_path / "other" / "compiled")  # a later model with another cache: ours again
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "other" / "compiled")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's: kept
    use_compile_cache(tmp_path / "cache" / "compiled")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # inductor's own default, set by it
    use_compile_cache(tmp_path / "cache" / "compiled")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "compiled")


def test_cli_compile_on_falls_back_and_shares_the_cache_key(monkeypatch, tmp_path):
    """`embed images --compile on` with a compiler that fails: one warning, the eager result; the
    artifact is the one `--compile off` finds (the setting is not part of the key)."""
    from tests.faults.helpers import cli
    from tests.helpers.images import make_image_folder

    folder = make_image_folder(tmp_path / "images", per_class=1)
    cache = str(tmp_path / "cache")
    with broken_compiler(monkeypatch):
        on = cli(
            "embed",
            "images",
            "--images",
            str(folder),
            "--cache-dir",
            cache,
            "--compile",
            "on",
            "--workers",
            "0",
        )
    assert on.exit_code == 0, on.output
    assert on.output.count("torch.compile of the image tower failed") == 1, on.output
    off = cli(
        "embed", "images", "--images", str(folder), "--cache-dir", cache, "--compile", "off", "--workers", "0"
    )
    assert off.exit_code == 0, off.output
    assert "cache hit" in off.output and "torch.compile" not in off.output
    key = on.output.split("embed-images ", 1)[1][:12]
    assert off.output.split("embed-images ", 1)[1][:12] == key
    wrong = cli("cam", "--images", str(folder), "--classes", "waterbird", "--compile", "sometimes")
    assert wrong.exit_code == 2 and "'sometimes' is not one of" in wrong.output


@pytest.mark.ci
def test_compiled_tower_matches_eager_on_the_cpu(setup, monkeypatch, tmp_path):
    """torch.compile for real (inductor's CPU backend: about a minute cold on 2 shared cores, hence
    `ci`): the compiled passes agree with the eager ones within float rounding; masks may differ
    only at patches whose CAM value lies within rounding of the image's threshold; the compiled
    artifacts land in the cache's compiled/ folder."""
    model, images, classes = setup
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    reporter = RecordingReporter()
    tower = ImageTower(model, compiled=True, cache=tmp_path / "compiled")
    config = CamConfig(bg_pool="mask", dilate=0)
    got = tower.cam(images, classes, config, reporter)
    embedded = tower.encode(images, reporter)
    assert tower.compiled, tower.failure
    assert reporter.messages == []
    expected = cam_batch(model, images, classes, config)
    torch.testing.assert_close(embedded, encode_images(model, images), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.embeddings, expected.embeddings, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.cams, expected.cams, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got.background, expected.background, rtol=0, atol=1e-5)
    assert torch.equal(got.pred_class, expected.pred_class)
    differ = got.foreground != expected.foreground
    if differ.any():
        from negalign_cli.compute.quantile import percentile

        threshold = percentile(expected.cams.flatten(1), config.fg_percentile, dim=1, keepdim=True)
        near = (expected.cams.flatten(1).double() - threshold).abs() <= 1e-4 * threshold.abs()
        assert not (differ.flatten(1) & ~near).any()
    assert any((tmp_path / "compiled").rglob("*")), "nothing was written to the compile cache"


def test_bench_times_the_compiled_flows_beside_eager(tiny_model, monkeypatch):
    """`bench --compile on`: the embed and CAM flows again, compiled, with the ratios; a compile
    that fails says so in the row's note (what ran was eager) and warns once. (`auto` on the CPU
    adds no rows: test_compile_modes.)"""
    import dataclasses

    from negalign_cli.stages.bench import BenchConfig, run_bench

    model = dataclasses.replace(tiny_model, compile="on")  # its own ImageTower, the same weights
    config = BenchConfig(batch_size=2, batches=1, repeats=1, classes=20, negatives=300, score_images=1)
    reporter = RecordingReporter()
    with broken_compiler(monkeypatch):
        record = run_bench(model, dataclasses.replace(config, flows=("model",)), reporter)
    assert [kind for kind, m in reporter.messages if "torch.compile" in m] == ["warn"]
    rows = {r["flow"]: r for r in record["results"]}
    for flow in ("embed", "embed + CAM + background"):
        assert flow in rows and rows[f"{flow}, compiled"]["note"].startswith("compile failed, eager: ")
    assert {"embed compiled / eager", "CAM compiled / eager"} <= set(record["ratios"])
