"""Scoring's passes after its matmuls, block by block (issue 23, the CPU targets): the kernels
against brute-force float64 numpy on random inputs with ties and extreme logits, and the whole
path against a float64 loop for every block size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import negalign_cli.compute.scores as scores_module
from negalign_cli.compute.scores import (
    ScoreConfig,
    ScoreInputs,
    block_rows,
    column_candidates,
    compute_scores,
    copy_blocks,
    mcm_and_energy,
    rank_candidates,
    top_columns,
    unit_rows,
)
from tests.test_scoring_speed_paths import brute_force, extreme_inputs, unit

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logit_rows(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    """(n, M) float32 logits laid out as ``groups`` blocks of ``width`` then ``rest`` columns, with
    k; values from a small set (exact ties within and across blocks) or spread (−100…100)."""
    n = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 12))
    width = draw(st.integers(1, 9))
    rest = draw(st.integers(0, groups - 1))
    k = draw(st.integers(1, groups * width + rest))
    m = groups * width + rest
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        logits = torch.randint(-3, 4, (n, m), generator=generator).float()  # ties everywhere
    else:
        logits = (200 * torch.rand(n, m, generator=generator) - 100).float()
    return logits, groups, groups * width, k


@FAST
@given(logit_rows())
def test_top_columns_give_numpys_top_k_values(case):
    """The k largest values (exactly, in order) and columns holding them, distinct: on ties any
    such columns are a top-k; the candidates come from whole blocks copied by index_select."""
    logits, groups, kept, k = case
    values, columns = top_columns(logits, k, kept, groups)
    expected = -np.sort(-logits.double().numpy(), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(values.double().numpy(), expected)
    np.testing.assert_array_equal(torch.gather(logits, 1, columns).numpy(), values.numpy())
    assert all(len(set(row)) == k for row in columns.tolist())


@FAST
@given(logit_rows(), st.integers(0, 3))
def test_copy_blocks_equals_slicing_on_strided_rows(case, pad):
    """Rows with a stride beyond their width (a column slice, as the class logits beside the
    cosines are), blocks in any order and repeated."""
    logits, groups, kept, k = case
    n, m = logits.shape
    wide = torch.full((n, m + pad), float("nan"))
    wide[:, :m] = logits
    rows = wide[:, :m]
    width = kept // groups
    generator = torch.Generator().manual_seed(n * 131 + m)
    blocks = torch.randint(0, groups, (n, k), generator=generator)
    out = torch.empty(n, k * width)
    copy_blocks(rows, blocks, width, out)
    array = logits.numpy()
    expected = np.stack(
        [
            np.concatenate([array[i, b * width : (b + 1) * width] for b in blocks[i].tolist()])
            for i in range(n)
        ]
    )
    np.testing.assert_array_equal(out.numpy(), expected)


def test_candidates_into_given_buffers_rank_as_top_columns():
    """column_candidates writing into a chunk's buffers (as each block does), then one ranking:
    the same as top_columns on the rows (the columns after ``kept`` included)."""
    generator = torch.Generator().manual_seed(3)
    logits = 80 * torch.randn(9, 10 * 7 + 4, generator=generator)
    logits[2, 70:] = 500.0  # the largest values among the columns after kept
    k, groups, kept, width = 3, 10, 70, 7
    maxes = logits[:, :kept].reshape(9, groups, width).amax(-1)
    best, candidates = torch.empty(9, k, dtype=torch.int64), torch.empty(9, k * width)
    for start in range(0, 9, 4):
        part = slice(start, min(start + 4, 9))
        column_candidates(
            logits[part],
            k,
            kept,
            groups,
            maxes[part],
            (best[part], candidates[part], torch.empty(4, k)[: part.stop - part.start]),
        )
    values, columns = rank_candidates(candidates, best, width, logits, kept)
    expected_values, expected_columns = top_columns(logits, k, kept, groups)
    assert torch.equal(values, expected_values) and torch.equal(columns, expected_columns)
    assert (columns[2] >= kept).all()


@FAST
@given(
    n=st.integers(1, 5),
    k=st.integers(1, 40),
    temperature=st.sampled_from([1.0, 0.5, 0.01]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_mcm_and_energy_equal_float64_numpy(n, k, temperature, ties, seed):
    """exp as 2^(d·log₂e) in float64: within 1e-12 of numpy's float64 exp (the tolerance the
    former test of this function holds against mcm() and energy()), on ties and cosines of ±1."""
    generator = torch.Generator().manual_seed(seed)
    cos = torch.rand(n, k, generator=generator) * 2 - 1
    if ties:
        cos = torch.round(cos * 2) / 2  # −1, −0.5, 0, 0.5, 1: tied maxima
    pair = torch.stack([cos, 100 * cos], dim=1)
    s_mcm, s_energy = mcm_and_energy(pair, torch.empty(n, 2, k, dtype=torch.float64), temperature)
    c, logits = pair[:, 0].double().numpy(), pair[:, 1].double().numpy()
    shifted = (c - c.max(axis=1, keepdims=True)) / temperature
    expected_mcm = 1 / np.exp(shifted).sum(axis=1)
    top = logits.max(axis=1)
    expected_energy = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    np.testing.assert_allclose(s_mcm.numpy(), expected_mcm, rtol=1e-12, atol=0)
    np.testing.assert_allclose(s_energy.numpy(), expected_energy, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- the whole path
def scores_with_blocks(inputs: ScoreInputs, config: ScoreConfig, rows: int | None) -> dict[str, np.ndarray]:
    """compute_scores' torch passes with blocks of ``rows`` rows (None: the default budget)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scores_module, "native_passes", lambda: None)
        if rows is not None:
            n_classes, n_negatives = inputs.classes.shape[0], inputs.negatives.shape[0]
            patch.setattr(scores_module, "BLOCK_FLOATS", rows * (2 * n_negatives + 6 * n_classes))
        return compute_scores(inputs, config)


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_every_block_size_gives_the_same_numbers_and_the_float64_loop(temperature):
    """Blocks of 7 rows (the last one shorter) and of 59 give the whole chunk's bits (each row's
    passes are the same operations on the same values); blocks of 1 or 2 rows take torch's
    reductions for tiny outputs, another summation order: one rounding of a float32 group sum
    (NegLabel) or of a float64 sum (MCM) apart. Each within the float64 loop's tolerances, on rows
    whose logits overflow and underflow exp."""
    inputs = extreme_inputs()
    config = ScoreConfig(groups=6, role_aware=True, mcm_temperature=temperature)
    whole = scores_with_blocks(inputs, config, 10_000)
    for rows in (7, 59):
        blocked = scores_with_blocks(inputs, config, rows)
        for name, values in whole.items():
            np.testing.assert_array_equal(blocked[name], values, err_msg=f"{name}, {rows} rows a block")
    for rows in (1, 2):
        blocked = scores_with_blocks(inputs, config, rows)
        for name, values in whole.items():
            rtol = {"s_mcm": 1e-15, "s_neglabel_plain": 2e-7, "s_neglabel_star": 2e-7, "s_negrefine": 2e-7}
            np.testing.assert_allclose(blocked[name], values, rtol=rtol.get(name, 0), atol=0, err_msg=name)
    expected = brute_force(inputs, config)
    np.testing.assert_allclose(whole["s_mcm"], expected["s_mcm"], rtol=2e-6, atol=0)
    np.testing.assert_allclose(whole["s_energy"], expected["s_energy"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(whole["s_neglabel_plain"], expected["plain"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(whole["s_neglabel_star"], expected["star"], rtol=0, atol=2e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), near=st.floats(0.5, 0.88), rows=st.sampled_from([1, 3, 64]))
def test_exp2_neglabel_stays_within_the_float64_tolerance_near_overflow(seed, near, rows):
    """Logits up to ~88 (exp2's float32 argument rounding is largest there, just below where
    float32's exp overflows and the row takes the shifted path): NegLabel plain and M2 within the
    float64 loop's 2e-6, for any block size."""
    generator = torch.Generator().manual_seed(seed)
    n, k, m = 12, 5, 48
    images, classes, negatives = unit(n, seed % 1000), unit(k, seed % 1000 + 1), unit(m, seed % 1000 + 2)
    mix = near * images[torch.randint(0, n, (m,), generator=generator)] + (1 - near) * negatives
    negatives = torch.nn.functional.normalize(mix, dim=1)
    inputs = ScoreInputs(
        images=images.numpy(),
        classes=classes,
        negatives=negatives,
        class_names=[f"c{i}" for i in range(k)],
        negative_names=[f"n{i}" for i in range(m)],
        star_indices=torch.arange(0, m, 2),
    )
    config = ScoreConfig(groups=4, role_aware=True)
    got = scores_with_blocks(inputs, config, rows)
    expected = brute_force(inputs, config)
    np.testing.assert_allclose(got["s_neglabel_plain"], expected["plain"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(got["s_neglabel_star"], expected["star"], rtol=0, atol=2e-6)


def test_block_rows_fit_the_budget_on_a_cpu_and_take_the_chunk_elsewhere():
    assert block_rows(26_000, torch.device("cpu"), 3050) == scores_module.BLOCK_FLOATS // 26_000
    assert block_rows(26_000, torch.device("cpu"), 3) == 3
    assert block_rows(10**9, torch.device("cpu"), 3050) == 1
    assert block_rows(26_000, torch.device("meta"), 3050) == 3050  # a GPU: launches, not caches


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    tied=st.integers(1, 8),
    k=st.integers(1, 6),
    rows=st.sampled_from([1, 4, 64]),
)
def test_pred_class_is_the_first_of_tied_maxima(seed, tied, k, rows):
    """pred_class and MaxLogit come from the top classes where that is exact (fewer than k classes
    tied with the largest logit) and from torch.max otherwise: numpy's argmax (the first of tied
    maxima) and max either way, with 1 to 8 identical class features (exactly tied logits)."""
    generator = torch.Generator().manual_seed(seed)
    n, n_classes, m = 9, 12, 20
    classes = unit(n_classes, seed % 1000 + 5)
    classes[3 : 3 + tied] = classes[3]  # identical prompts: their logits tie exactly
    images = torch.nn.functional.normalize(
        classes[3] + 0.3 * torch.randn(n, classes.shape[1], generator=generator), dim=1
    )
    images[::2] = torch.nn.functional.normalize(torch.randn(5, classes.shape[1], generator=generator), dim=1)
    inputs = ScoreInputs(
        images=images.numpy(),
        classes=classes,
        negatives=unit(m, seed % 1000 + 6),
        class_names=[f"c{i}" for i in range(n_classes)],
        negative_names=[f"n{i}" for i in range(m)],
    )
    got = scores_with_blocks(inputs, ScoreConfig(groups=4, multimatch_pos=k), rows)
    pair = torch.empty(n, 2, n_classes)  # the class logits as scoring computes them, in float32
    torch.matmul(unit_rows(inputs.images, 0, n), classes.T, out=pair[:, 0])
    expected = torch.mul(pair[:, 0], 100.0, out=pair[:, 1]).numpy()
    np.testing.assert_array_equal(got["pred_class"], expected.argmax(axis=1))
    np.testing.assert_array_equal(got["s_maxlogit"], expected.max(axis=1).astype(np.float64))
