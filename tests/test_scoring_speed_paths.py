"""The fused scoring path (issue 23): buffers reused by every chunk, MCM and Energy in one float64
pass, every grouped log-sum-exp summed from one exp of the negative logits (the shifted
log-sum-exp only for rows outside exp's safe range), and the bench's bare GEMM with the shapes of
scoring's matmuls. Each is checked against a brute-force loop in float64 and by counting what a
chunk does (operator calls, fresh allocations) with a dispatch mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import negalign_cli.compute.scores as scores_module
from negalign_cli.compute.scores import (
    EXP_SUM_MIN,
    ScoreConfig,
    ScoreInputs,
    compute_scores,
    energy,
    group_logsumexp,
    group_order,
    log_of_block_sums,
    mcm,
    mcm_and_energy,
    one_thread,
)

D = 16


def unit(rows: int, seed: int, dim: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1
    ).float()


def extreme_inputs(n: int = 60, k: int = 7, m: int = 90) -> ScoreInputs:
    """Ordinary rows, rows whose logits overflow float32's exp (an image on a negative: logit ≈ 100)
    and rows where a whole group's exp underflows (negatives on −image: logit ≈ −100)."""
    images, classes, negatives = unit(n, 1), unit(k, 2), unit(m, 3)
    negatives[:10] = images[0]  # image 0: ten logits of 100 → exp overflows
    images[1] = negatives[20]
    negatives[30:] = torch.nn.functional.normalize(
        -images[2] + 0.05 * negatives[30:], dim=1
    )  # image 2: ≈ −100
    images[3] = classes[0]  # a class logit of 100 (Energy's exp must not overflow either)
    return ScoreInputs(
        images=images.numpy(),
        classes=classes,
        negatives=negatives,
        class_names=[f"c{i}" for i in range(k)],
        negative_names=[f"n{i}" for i in range(m)],
        star_indices=torch.arange(0, m, 2),
        background=unit(n, 4).numpy(),
        background_valid=torch.ones(n, dtype=torch.bool),
        background_indices=torch.arange(1, m, 2),
    )


def brute_force(inputs: ScoreInputs, config: ScoreConfig) -> dict[str, np.ndarray]:
    """Every embedding column, one image and one group at a time, in float64."""
    x = torch.nn.functional.normalize(torch.as_tensor(inputs.images).double(), dim=1)
    cos = (x @ inputs.classes.double().T).numpy()
    pos = 100 * cos
    neg = (100 * x @ inputs.negatives.double().T).numpy()
    n_neg = neg.shape[1]
    plain_columns = group_order(n_neg, config.groups, config.group_seed).numpy()
    star = inputs.star_indices.numpy() if inputs.star_indices is not None else None
    out: dict[str, list[float]] = {k: [] for k in ("s_mcm", "s_energy", "s_maxlogit", "plain", "star")}

    def lse(v: np.ndarray) -> float:
        top = v.max()
        return float(top + np.log(np.exp(v - top).sum()))

    def neglabel(i: int, columns: np.ndarray) -> float:
        blocks = neg[i, columns].reshape(config.groups, -1)
        return float(np.mean([1 / (1 + np.exp(lse(b) - lse(pos[i]))) for b in blocks]))

    for i in range(len(x)):
        c = cos[i] / config.mcm_temperature
        out["s_mcm"].append(float(1 / np.exp(c - c.max()).sum()))
        out["s_energy"].append(lse(pos[i]))
        out["s_maxlogit"].append(float(pos[i].max()))
        out["plain"].append(neglabel(i, plain_columns))
        if star is not None:
            kept = len(star) - len(star) % config.groups
            out["star"].append(
                neglabel(i, star[group_order(len(star), config.groups, config.group_seed).numpy()][:kept])
            )
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_the_fused_path_equals_a_float64_loop_on_extreme_rows(temperature):
    inputs = extreme_inputs()
    config = ScoreConfig(groups=6, role_aware=True, mcm_temperature=temperature)
    got = compute_scores(inputs, config)
    expected = brute_force(inputs, config)
    # float32 cosines: |Δcos| ~ 1e-7, so MCM to ~1e-6 relative at T = 0.01, logits to ~1e-5
    np.testing.assert_allclose(got["s_mcm"], expected["s_mcm"], rtol=2e-6, atol=0)
    np.testing.assert_allclose(got["s_energy"], expected["s_energy"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["s_maxlogit"], expected["s_maxlogit"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(got["s_neglabel_plain"], expected["plain"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(got["s_neglabel_star"], expected["star"], rtol=0, atol=2e-6)
    assert np.isfinite(got["s_neglabel_plain"]).all() and np.isfinite(got["s_energy"]).all()


def test_rows_outside_exps_range_take_the_shifted_path(monkeypatch):
    """Overflowing and underflowing rows are recomputed with the maximum subtracted; the others
    are not (the exact path is only a fallback)."""
    calls: list[int] = []
    original = scores_module.group_logsumexp

    def counting(columns, groups, *args, **kwargs):
        calls.append(columns.shape[0])
        return original(columns, groups, *args, **kwargs)

    monkeypatch.setattr(scores_module, "group_logsumexp", counting)
    compute_scores(extreme_inputs(), ScoreConfig(groups=6))
    assert calls and sum(calls) <= 3  # images 0, 1 (overflow) and 2 (underflow), nothing else
    calls.clear()
    ordinary = ScoreInputs(**{**extreme_inputs().__dict__, "images": unit(40, 9).numpy()})
    ordinary.negatives = unit(90, 3)
    compute_scores(ordinary, ScoreConfig(groups=6))
    assert calls == []


def test_log_of_block_sums_equals_logsumexp_and_keeps_nan():
    g = torch.Generator().manual_seed(0)
    logits = (100 * torch.randn(12, 40, generator=g).clamp(-1, 1)).view(12, 4, 10)
    logits[0, 1] = 95.0  # overflow
    logits[1, 2] = -100.0  # underflow: the whole group
    logits[2, 0, 3] = float("nan")
    expected = torch.logsumexp(logits, dim=-1)
    sums = logits.exp().sum(dim=-1)
    got = log_of_block_sums(sums, lambda rows: group_logsumexp(logits[rows].flatten(1), 4))
    torch.testing.assert_close(got, expected, rtol=2e-7, atol=2e-6, equal_nan=True)
    assert torch.isnan(got[2, 0]) and not torch.isnan(got[2, 1:]).any()
    assert float(sums[3:].min()) >= EXP_SUM_MIN  # the other rows took the unshifted path


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.01])
def test_mcm_and_energy_in_one_pass_equal_the_separate_functions(temperature):
    cos = unit(30, 5) @ unit(50, 6).T
    pair = torch.stack([cos, 100 * cos], dim=1)
    s_mcm, s_energy = mcm_and_energy(pair, torch.empty(30, 2, 50, dtype=torch.float64), temperature)
    torch.testing.assert_close(s_mcm, mcm(cos, temperature), rtol=1e-12, atol=0)
    torch.testing.assert_close(s_energy, energy(100 * cos), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- what a chunk does
class Census(TorchDispatchMode):
    """Counts the operators that read or write a tensor of at least ``size`` elements (a pass over
    it), and the fresh tensors of at least ``size`` elements (not written into a given buffer)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.passes: list[str] = []
        self.fresh: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        given = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        made = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        if func.is_view or name == "mm":
            return result
        if any(t.numel() >= self.size for t in given + made):
            self.passes.append(name)
        storages = {t.untyped_storage().data_ptr() for t in given}
        for t in made:
            if t.numel() >= self.size and t.untyped_storage().data_ptr() not in storages:
                self.fresh.append(name)
        return result


def census_per_chunk(config: ScoreConfig, size_of, native: bool = False) -> tuple[list[str], list[str], int]:
    """The torch operators of one chunk, with scoring's torch passes (the block passes), or with
    ``native`` its C passes where they load."""
    n, k, m = 90, 200, 1200
    inputs = ScoreInputs(
        images=unit(n, 11, 32).numpy(),
        classes=unit(k, 12, 32),
        negatives=unit(m, 13, 32),
        class_names=[f"c{i}" for i in range(k)],
        negative_names=[f"n{i}" for i in range(m)],
        star_indices=torch.arange(0, m, 2),
        background=unit(n, 14, 32).numpy(),
        background_valid=torch.ones(n, dtype=torch.bool),
        background_indices=torch.arange(1, m, 2),
    )
    rows = 30
    census = Census(size_of(rows, k, m))
    chunk = scores_module._score_chunk

    def counted(*args, **kwargs):  # what one chunk does (the call's set-up and buffers aside)
        with census:
            return chunk(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scores_module.chunk_rows, "__defaults__", (rows * (k + m),))
        patch.setattr(scores_module, "_score_chunk", counted)
        if not native:
            patch.setattr(scores_module, "native_passes", lambda: None)
        compute_scores(inputs, config)
    return census.passes, census.fresh, n // rows


BLOCK = 10  # rows per block of the block passes in the census below (a chunk is 30 rows)


def census_per_block(config: ScoreConfig, size_of) -> tuple[list[str], list[str], int]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scores_module, "BLOCK_FLOATS", BLOCK * (2 * 1200 + 6 * 200))  # see census_per_chunk
        passes, fresh, chunks = census_per_chunk(config, size_of)
    return passes, fresh, chunks * 30 // BLOCK


def test_a_chunk_reads_its_negative_logits_once_per_block():
    """Each block of a chunk's negative logits is read by its block maxima (which pick the top-k
    candidates, copied by one index_select) and by the exp, taken into a block buffer as
    2^(l·log₂e) (mul, exp2_) and summed per group; nothing else reads them, and no operator
    passes over a whole chunk of them (it was block maxima, exp in place and block sums over the
    whole chunk; before that max, subtract, exp, sum)."""
    passes, _, blocks = census_per_block(ScoreConfig(groups=10), lambda rows, k, m: BLOCK * m)
    chunks = blocks * BLOCK // 30
    # per chunk: ranking the top-k candidates and P_align's top-k of b·N_bg (n × |N_bg|)
    assert passes.count("topk") == 2 * chunks
    assert [p for p in passes if p != "topk"] == ["amax", "index_select", "mul", "exp2_", "sum"] * blocks
    whole, _, _ = census_per_block(ScoreConfig(groups=10), lambda rows, k, m: rows * m)
    assert set(whole) == {"index_select"}, whole  # its input is a view of the rows; it reads k blocks a row


def test_m2_sums_its_columns_from_the_same_exp():
    passes, _, blocks = census_per_block(
        ScoreConfig(groups=10, role_aware=True), lambda rows, k, m: BLOCK * m // 2
    )
    assert passes.count("exp2_") == blocks  # one exp for the plain and the M2 groups
    assert "sub_" not in passes and "sub" not in passes and "logsumexp" not in passes


def test_a_chunk_allocates_no_block_of_its_size():
    """Every n×K and n×M block (cosines, logits, their float64 copies, the M2 gather, b·N_bg) is a
    buffer allocated once per call: fresh large blocks are fresh pages every chunk."""
    _, fresh, _ = census_per_chunk(ScoreConfig(groups=40, role_aware=True), lambda rows, k, m: rows * k)
    # (the top-k candidates, n × 5 blocks of 30, are smaller; scoring's n × |N_bg| has its buffer too)
    assert fresh == [], fresh


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), one_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- the bench
def test_the_bare_gemm_has_the_shapes_of_scorings_matmuls():
    """The bench's reference GEMM runs the matmuls scoring runs per chunk, same shapes, strides
    and dtype (classes as a transposed view, negatives contiguous), and nothing else."""
    from negalign_cli.stages.bench import bare_gemm

    n, k, m = 70, 40, 400
    images, classes, negatives = unit(n, 21, 32), unit(k, 22, 32), unit(m, 23, 32)
    inputs = ScoreInputs(
        images=images.numpy(),
        classes=classes,
        negatives=negatives,
        class_names=[f"c{i}" for i in range(k)],
        negative_names=[f"n{i}" for i in range(m)],
    )

    def matmuls(run) -> list[tuple]:
        seen: list[tuple] = []

        class Mm(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ == "mm":
                    a, b = args[0], args[1]
                    seen.append((tuple(a.shape), tuple(b.shape), b.stride(), a.dtype))
                return func(*args, **(kwargs or {}))

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(scores_module.chunk_rows, "__defaults__", (25 * (k + m),))
            with Mm():
                run()
        return seen

    scoring = matmuls(lambda: compute_scores(inputs, ScoreConfig(groups=10)))
    bare = matmuls(lambda: bare_gemm(images.numpy(), [classes.T, negatives.T.contiguous()]))
    assert len(scoring) == 2 * 3  # two matmuls per chunk of 25 images
    assert bare == scoring


def test_bench_measures_the_full_pipeline_from_image_files(tmp_path):
    """Issue 23's "full NegAlign from JPEG files" row needs a flow: with --images the pipeline
    group decodes the files as `embed images` does, then CAM and every score (here the flow alone;
    `negalign bench --images` adds it to the pipeline group)."""
    from negalign_cli.models import load_model
    from negalign_cli.stages.bench import (
        FULL_FROM_FILES,
        BenchConfig,
        _full_from_files,
        _score_inputs,
        _WarmPairs,
    )
    from tests.helpers.images import make_image_folder

    folder = make_image_folder(tmp_path / "imgs", per_class=2)
    model = load_model("negalign-tiny-test", "random")
    config = BenchConfig(batch_size=2, batches=2, repeats=1, classes=10, negatives=200, images=folder)
    inputs = _score_inputs(3, model.embed_dim, config, torch.Generator().manual_seed(0), "real-like")
    classes = inputs.classes.to(model.device)
    pairs = _WarmPairs(inputs)
    row = _full_from_files(model, config, inputs, classes, pairs, ScoreConfig(groups=100, role_aware=True))
    assert row.flow == FULL_FROM_FILES and row.images == 4 and row.seconds > 0
    assert "PIL decoding" in row.note and pairs.last is not None and pairs.last.encoded > 0
