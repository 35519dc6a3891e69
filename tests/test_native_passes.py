"""Scoring's fused C passes (compute/native.py, assets/kernels/score_passes.c): each output
against float64 numpy or torch, the tie and NaN rules, independence from the thread count, the
whole scoring path against the torch passes, and the loader with the real C compiler (absent,
failing, a broken library on disk, a library that computes wrongly)."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import negalign_cli.compute.native as native_module
import negalign_cli.compute.scores as scores_module
from negalign_cli.compute.native import ScorePasses, compiler
from negalign_cli.compute.scores import LOG2_E, ScoreConfig, ScoreInputs, compute_scores

LOG2E32 = float(np.float32(LOG2_E))


def require_compiler() -> None:
    """Skips without a C compiler; fails in CI, which installs one (.ci/run)."""
    if compiler() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must test the compiled scoring passes: no C compiler ($CC, cc, gcc, clang)")
        pytest.skip("no C compiler on this machine")


@pytest.fixture
def needs_compiler() -> None:
    require_compiler()


@pytest.fixture(scope="module")
def passes() -> ScorePasses:
    require_compiler()
    loaded = native_module.load()
    assert loaded is not None, native_module.why_not()
    return loaded


def negative_outputs(n: int, groups: int, k: int) -> tuple[torch.Tensor, ...]:
    return (
        torch.full((n, groups), -7.0),
        torch.full((n, groups), -7.0),
        torch.full((n, k), -7.0),
        torch.full((n, k), -7, dtype=torch.int64),
    )


def ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got − exact| in units of float32's last place at exact."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


# ----------------------------------------------------------------------------- exp2
def test_exp2_is_within_two_ulp_over_float32s_range(passes):
    """Every term Σ 2^x of a group of one: within 2 ulp of float64's 2^x on a dense sweep of
    [-126, 127], 0 below -126, inf above 127, NaN for NaN."""
    x = np.concatenate([np.linspace(-126.0, 127.0, 400_001), [-0.5, 0.5, 0.0, 1e-30, -1e-30]])
    x32 = torch.from_numpy(x.astype(np.float32)).unsqueeze(0)
    m = x32.shape[1]
    maxes, sums, _, _ = negative_outputs(1, m, 1)
    passes.negative_pass(x32, m, m, 1.0, maxes, sums)
    exact = np.exp2(x32.double().numpy()[0])
    assert ulps(sums.numpy()[0], exact).max() <= 2.0
    assert torch.equal(maxes, x32)  # a group of one: its maximum is its value
    edge = torch.tensor([[-126.5, -150.0, -1e30, 127.5, 200.0, math.inf, -math.inf, math.nan]])
    maxes, sums, _, _ = negative_outputs(1, 8, 1)
    passes.negative_pass(edge, 8, 8, 1.0, maxes, sums)
    got = sums.numpy()[0]
    assert (got[:3] == 0).all() and (got[3:6] == math.inf).all() and got[6] == 0 and math.isnan(got[7])
    assert math.isnan(maxes[0, 7])


# ----------------------------------------------------------------------------- the negative pass
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 40),
    groups=st.integers(1, 9),
    width=st.integers(1, 37),
    extra=st.integers(0, 20),
    k=st.integers(1, 6),
    spread=st.sampled_from([0.3, 20.0, 60.0]),
    ties=st.booleans(),
)
def test_the_negative_pass_equals_float64_and_torch(passes, seed, n, groups, width, extra, k, spread, ties):
    """Group maxima as torch.amax, group sums of 2^(l·log₂e) within 1e-6 of float64 (the same
    float32 product, the sums in float64), M2's gathered sums alike, the top k as torch.topk's
    values with the smaller column first among ties — also from the columns after the groups,
    and for k above the number of groups."""
    g = torch.Generator().manual_seed(seed)
    kept = groups * width
    m = kept + extra
    logits = torch.randn(n, m + 3, generator=g) * spread
    if ties:
        logits = torch.round(logits / spread * 2) * spread / 2  # a few values, many times each
    logits = logits[:, :m]  # rows with a stride longer than their width
    star = torch.randperm(m, generator=g)[: groups * max(1, width // 2)]
    maxes, sums, values, columns = negative_outputs(n, groups, k)
    star_sums = torch.empty(n, groups)
    passes.negative_pass(logits, kept, groups, LOG2E32, maxes, sums, (star, star_sums), (values, columns))

    grouped = logits[:, :kept].reshape(n, groups, width)
    assert torch.equal(maxes, grouped.amax(-1))
    exponents = (logits * LOG2E32).double().numpy()  # the float32 product, as torch's passes
    terms = np.exp2(exponents)
    # a term above 2^127 makes its sum inf (scoring then takes the shifted log-sum-exp)
    terms[exponents > 127] = np.inf
    terms[exponents < -126] = 0.0  # and one below 2^-126 counts 0 (torch keeps subnormals)
    expected = terms[:, :kept].reshape(n, groups, width).sum(-1)
    np.testing.assert_allclose(sums.numpy(), expected.astype(np.float32), rtol=1e-6, atol=0)
    expected_star = terms[:, star.numpy()].reshape(n, groups, -1).sum(-1)
    np.testing.assert_allclose(star_sums.numpy(), expected_star.astype(np.float32), rtol=1e-6, atol=0)

    k_eff = min(k, m)
    reference = torch.topk(logits, k_eff, dim=-1).values
    assert torch.equal(values[:, :k_eff], reference)
    for row in range(n):
        for j in range(k_eff):
            value, column = values[row, j].item(), columns[row, j].item()
            assert logits[row, column].item() == value
            # among equal values the smaller column comes first: none smaller is left out
            equal = (logits[row] == value).nonzero().squeeze(1).tolist()
            top = zip(columns[row, :k_eff].tolist(), values[row, :k_eff].tolist(), strict=True)
            chosen = [c for c, v in top if v == value]
            assert chosen == sorted(equal)[: len(chosen)]


def test_the_negative_pass_marks_nan_groups(passes):
    logits = torch.arange(24, dtype=torch.float32).view(2, 12) / 10
    logits[1, 5] = math.nan
    maxes, sums, values, columns = negative_outputs(2, 3, 2)
    passes.negative_pass(logits, 12, 3, LOG2E32, maxes, sums, top=(values, columns))
    assert torch.isnan(maxes[1, 1]) and torch.isnan(sums[1, 1])
    assert not torch.isnan(maxes[1, [0, 2]]).any() and not torch.isnan(sums[0]).any()
    assert math.isnan(values[1, 0].item()) and columns[1, 0].item() == 5  # NaN first, as torch.topk


# ----------------------------------------------------------------------------- the class pass
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 40),
    k_classes=st.integers(1, 300),
    k=st.integers(1, 6),
    temperature=st.sampled_from([1.0, 0.5, 0.01]),
    ties=st.booleans(),
)
def test_the_class_pass_equals_float64_and_torch(passes, seed, n, k_classes, k, temperature, ties):
    """Logits = 100·cos bit for bit as torch.mul; the largest cosine and logit exactly; MCM's and
    Energy's float64 sums within 1e-14 of numpy's exp; the top k as torch.topk's values, ties
    broken towards the smaller class (so the first is ``pred_class``: the first of tied maxima)."""
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(n, k_classes, generator=g) * 2 - 1
    if ties:
        cos = torch.round(cos * 2) / 2
    pair = torch.zeros(n, 2, k_classes)
    pair[:, 0] = cos
    maxima, sums = torch.empty(n, 2), torch.empty(n, 2, dtype=torch.float64)
    k = min(k, k_classes)
    top = (torch.empty(n, k), torch.empty(n, k, dtype=torch.int64))
    scales = (LOG2_E / temperature, LOG2_E)
    passes.class_pass(pair, 100.0, scales, maxima, sums, top)

    logits = torch.mul(cos, 100.0)
    assert torch.equal(pair[:, 1], logits) and torch.equal(pair[:, 0], cos)
    assert torch.equal(maxima[:, 0], cos.amax(-1)) and torch.equal(maxima[:, 1], logits.amax(-1))
    c, lg = cos.double().numpy(), logits.double().numpy()
    expected_cos = np.exp((c - c.max(1, keepdims=True)) / temperature).sum(1)
    expected_logit = np.exp(lg - lg.max(1, keepdims=True)).sum(1)
    np.testing.assert_allclose(sums[:, 0].numpy(), expected_cos, rtol=1e-14, atol=0)
    np.testing.assert_allclose(sums[:, 1].numpy(), expected_logit, rtol=1e-14, atol=0)
    assert torch.equal(top[0], torch.topk(logits, k, dim=-1).values)
    first = (logits == logits.amax(-1, keepdim=True)).int().argmax(-1)  # the first of tied maxima
    assert torch.equal(top[1][:, 0], first)
    assert torch.equal(logits.gather(1, top[1]), top[0])


def test_the_class_pass_keeps_nan_rows_nan(passes):
    pair = torch.zeros(2, 2, 20)
    pair[:, 0] = torch.linspace(-1, 1, 20)
    pair[1, 0, 3] = math.nan
    maxima, sums = torch.empty(2, 2), torch.empty(2, 2, dtype=torch.float64)
    top = (torch.empty(2, 3), torch.empty(2, 3, dtype=torch.int64))
    passes.class_pass(pair, 100.0, (LOG2_E, LOG2_E), maxima, sums, top)
    assert torch.isnan(sums[1]).all() and torch.isnan(maxima[1]).all()
    assert not torch.isnan(sums[0]).any() and top[1][1, 0].item() == 3  # NaN first, as torch.topk


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "python-threads"])
def test_the_passes_do_not_depend_on_the_thread_count(passes, openmp, monkeypatch):
    """Rows are split over the threads and each row's arithmetic is fixed: 1, 2 and 3 threads give
    the same bits, on OpenMP's threads or (a library built without OpenMP) on Python threads."""
    if not openmp:
        monkeypatch.setattr(passes, "openmp", False)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(301, 1000, generator=g) * 20
    cos = torch.rand(301, 2, 200, generator=g)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            maxes, sums, values, columns = negative_outputs(301, 10, 5)
            passes.negative_pass(logits, 1000, 10, LOG2E32, maxes, sums, top=(values, columns))
            pair = cos.clone()
            maxima, class_sums = torch.empty(301, 2), torch.empty(301, 2, dtype=torch.float64)
            top = (torch.empty(301, 5), torch.empty(301, 5, dtype=torch.int64))
            passes.class_pass(pair, 100.0, (LOG2_E, LOG2_E), maxima, class_sums, top)
            results.append((maxes, sums, values, columns, pair, maxima, class_sums, *top))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_the_passes_refuse_wrong_buffers(passes):
    logits = torch.zeros(4, 10)
    maxes, sums, _, _ = negative_outputs(4, 2, 1)
    with pytest.raises(ValueError, match="do not split"):
        passes.negative_pass(logits, 9, 2, 1.0, maxes, sums)
    with pytest.raises(ValueError, match="unit column stride"):
        passes.negative_pass(logits.T, 4, 2, 1.0, maxes, sums)
    with pytest.raises(ValueError, match="float32 CPU tensor of shape"):
        passes.negative_pass(logits, 10, 2, 1.0, maxes.double(), sums)
    with pytest.raises(ValueError, match="within the logits"):
        star = (torch.tensor([0, 10]), torch.empty(4, 2))
        passes.negative_pass(logits, 10, 2, 1.0, maxes, sums, star)


# ----------------------------------------------------------------------------- the scoring path
def some_inputs(n: int = 700, k: int = 60, m: int = 900, seed: int = 0) -> ScoreInputs:
    g = torch.Generator().manual_seed(seed)

    def unit(rows: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(rows, 32, generator=g), dim=1)

    classes, negatives = unit(k), unit(m)
    label = torch.randint(0, k, (n,), generator=g)
    images = torch.nn.functional.normalize(classes[label] + 0.6 * unit(n), dim=1)
    return ScoreInputs(
        images=images.numpy(),
        classes=classes,
        negatives=negatives,
        class_names=[f"class {i}" for i in range(k)],
        negative_names=[f"negative {i}" for i in range(m)],
        star_indices=torch.arange(0, m, 3),
        background=unit(n).numpy(),
        background_valid=torch.ones(n, dtype=torch.bool),
        background_indices=torch.arange(1, m, 2),
    )


def pair_features(classes: torch.Tensor, negatives: torch.Tensor):
    def encode(names: list[str]) -> torch.Tensor:
        rows = []
        for name in names:
            left, right = name.split(" and ")
            rows.append(classes[int(left.split()[-1])] + negatives[int(right.split()[-1])])
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    return encode


@pytest.mark.parametrize(
    "config",
    [
        ScoreConfig(groups=100),
        ScoreConfig(groups=30, role_aware=True, mcm_temperature=0.01),
        ScoreConfig(groups=7, neg_topk=50, role_aware=True),
        ScoreConfig(groups=300),  # a group of 3 columns: k above many runs' widths
    ],
    ids=["plain", "m2", "m1", "narrow"],
)
def test_scoring_with_the_c_passes_equals_the_torch_passes(passes, monkeypatch, config):
    """Every column, with multi-matching and P_align: pred_class, MaxLogit, multi-matching and
    P_align bit for bit; MCM and Energy to float64 rounding; NegLabel to float32 rounding of the
    group sums (their order differs)."""
    inputs = some_inputs()
    encode = pair_features(inputs.classes, inputs.negatives)
    with_c = compute_scores(inputs, config, encode)
    monkeypatch.setattr(scores_module, "native_passes", lambda: None)
    with_torch = compute_scores(inputs, config, encode)
    for name in ("pred_class", "s_maxlogit", "s_multimatch", "p_align", "s_bg_pos", "s_bg_neg"):
        np.testing.assert_array_equal(with_c[name], with_torch[name], err_msg=name)
    np.testing.assert_allclose(with_c["s_mcm"], with_torch["s_mcm"], rtol=1e-14, atol=0)
    np.testing.assert_allclose(with_c["s_energy"], with_torch["s_energy"], rtol=1e-15, atol=0)
    for name in ("s_neglabel_plain", "s_neglabel_star", "s_negrefine"):
        np.testing.assert_allclose(with_c[name], with_torch[name], rtol=0, atol=1e-7, err_msg=name)
    assert np.isfinite(with_c["s_multimatch"]).all()


# ----------------------------------------------------------------------------- the loader
@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    """An empty kernel folder and no library loaded yet in this process."""
    monkeypatch.setenv("NEGALIGN_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("NEGALIGN_NATIVE", raising=False)
    native_module.load.cache_clear()
    yield tmp_path / "kernels"
    native_module.load.cache_clear()


def test_the_library_is_built_once_and_reused(needs_compiler, fresh_loader):
    first = native_module.load()
    assert first is not None and first.path.parent == fresh_loader
    built = first.path.stat().st_mtime_ns
    native_module.load.cache_clear()
    again = native_module.load()
    assert again is not None and again.path == first.path and again.path.stat().st_mtime_ns == built
    assert [p.name for p in fresh_loader.iterdir()] == [first.path.name]  # no build folder left


def test_a_truncated_library_is_built_again(needs_compiler, fresh_loader, monkeypatch, tmp_path):
    """A library cut short on disk (a full disk, a copy interrupted) under the name a process looks
    for: loading it fails, and it is built again. (Another folder: this process keeps the first
    library loaded, and the loader hands a loaded path back without reading the file.)"""
    built = native_module.load().path  # type: ignore[union-attr]
    other = tmp_path / "other-kernels"
    other.mkdir()
    (other / built.name).write_bytes(built.read_bytes()[:100])
    monkeypatch.setenv("NEGALIGN_KERNEL_DIR", str(other))
    native_module.load.cache_clear()
    again = native_module.load()
    assert again is not None and again.path == other / built.name
    assert again.path.stat().st_size > 1000


def test_without_a_compiler_scoring_runs_its_torch_passes(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang either
    assert native_module.load() is None
    assert "no C compiler" in native_module.why_not()
    monkeypatch.setattr(scores_module, "native_passes", native_module.load)
    got = compute_scores(some_inputs(n=50), ScoreConfig(groups=10))
    assert np.isfinite(got["s_neglabel_plain"]).all()


def test_a_compiler_that_fails_is_reported_not_raised(fresh_loader, monkeypatch, tmp_path):
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'cc: fatal error: out of cheese' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert native_module.load() is None
    assert "out of cheese" in native_module.why_not()
    assert not any(fresh_loader.glob("*.so"))


def test_an_unwritable_kernel_folder_is_reported_not_raised(fresh_loader, monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("NEGALIGN_KERNEL_DIR", str(blocked / "kernels"))
    require_compiler()
    assert native_module.load() is None
    assert "compiling the scoring kernels failed" in native_module.why_not()
    assert native_module.describe().startswith("torch operators (")


def test_a_full_disk_under_the_kernel_folder_falls_back(needs_compiler, fresh_loader, monkeypatch, tmp_path):
    """The kernel folder on a real tmpfs with no room left: the build fails (ENOSPC), nothing
    half-written stays behind, and scoring runs its torch passes."""
    from tests.faults.test_storage_faults import fill, tmpfs

    disk = tmp_path / "disk"
    with tmpfs(disk, "1m"):
        fill(disk)
        monkeypatch.setenv("NEGALIGN_KERNEL_DIR", str(disk / "kernels"))
        assert native_module.load() is None
        assert "compiling the scoring kernels failed" in native_module.why_not()
        left = [p.name for p in (disk / "kernels").iterdir()] if (disk / "kernels").exists() else []
        assert left == []
        monkeypatch.setattr(scores_module, "native_passes", native_module.load)
        got = compute_scores(some_inputs(n=50), ScoreConfig(groups=10))
        assert np.isfinite(got["s_neglabel_plain"]).all()


def test_native_off_by_environment(fresh_loader, monkeypatch):
    monkeypatch.setenv("NEGALIGN_NATIVE", "0")
    assert native_module.load() is None and "NEGALIGN_NATIVE=0" in native_module.why_not()


def test_a_library_that_computes_wrongly_is_refused(needs_compiler, fresh_loader, monkeypatch, tmp_path):
    """A library under our name whose exp is wrong (here: one that adds 1 to every sum) fails the
    self-check on load and is not used."""
    source = native_module._source().decode().replace("sm[g] = run_sum(", "sm[g] = 1.0f + run_sum(")
    cc = compiler()
    assert cc is not None
    wrong = tmp_path / "wrong.so"
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-x", "c", "-", "-o", str(wrong), "-lm"],
                   input=source, text=True, check=True)  # fmt: skip

    def compile_wrong(cc: str, source: bytes, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(wrong, target)
        return None

    monkeypatch.setattr(native_module, "_compile", compile_wrong)
    assert native_module.load() is None
    assert "computes wrong values" in native_module.why_not()
