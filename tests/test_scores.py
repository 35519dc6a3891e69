from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import negalign_cli.compute.scores as scores_module
from negalign_cli.compute.scores import ScoreConfig, ScoreInputs, compute_scores, group_order

N_IMAGES, K, M, D = 37, 6, 53, 16


def unit(rows, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1
    ).float()


def fake_text_features(texts):
    """A deterministic stand-in for the text tower: a unit vector per text."""
    rows = []
    for text in texts:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        rows.append(unit(1, D, seed)[0])
    return torch.stack(rows)


@pytest.fixture()
def data():
    images = unit(N_IMAGES, D, 1)
    classes = unit(K, D, 2)
    negatives = unit(M, D, 3)
    # make a few images close to classes or negatives so that scores spread out
    images[:5] = torch.nn.functional.normalize(images[:5] + 2 * classes[:5], dim=1)
    images[5:10] = torch.nn.functional.normalize(images[5:10] + 2 * negatives[:5], dim=1)
    background = unit(N_IMAGES, D, 4)
    valid = torch.ones(N_IMAGES, dtype=torch.bool)
    valid[[3, 17]] = False
    return ScoreInputs(
        images=images,
        classes=classes,
        negatives=negatives,
        class_names=[f"class{i}" for i in range(K)],
        negative_names=[f"neg{i}" for i in range(M)],
        star_indices=torch.tensor([0, 2, 3, 5, 8, 9, 11, 12, 13, 20, 21, 22, 30, 31, 40, 41, 42, 50, 51, 52]),
        background=background,
        background_valid=valid,
        background_indices=torch.tensor([1, 4, 6, 7, 10, 14, 15]),
    )


# ----------------------------------------------------------------------------- brute force
def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def neglabel_reference(x, classes, negatives, groups, seed):
    """NegRefine's `_grouping`, one image and one group at a time, in float64."""
    x, classes, negatives = (t.double().numpy() for t in (x, classes, negatives))
    pos = 100 * x @ classes.T
    neg = 100 * x @ negatives.T
    drop = neg.shape[1] % groups
    if drop:
        neg = neg[:, :-drop]
    if groups > 1:
        perm = torch.randperm(neg.shape[1], generator=torch.Generator().manual_seed(seed)).numpy()
        neg = neg[:, perm]
    negs = neg.reshape(neg.shape[0], groups, -1)
    result = []
    for i in range(x.shape[0]):
        per_group = [
            softmax(np.concatenate([pos[i], negs[i, g]]))[: pos.shape[1]].sum() for g in range(groups)
        ]
        result.append(np.mean(per_group))
    return np.array(result)


def test_group_order():
    order = group_order(53, 5, 0)
    assert sorted(order.tolist()) == list(range(50))
    assert torch.equal(order, group_order(53, 5, 0)) and not torch.equal(order, group_order(53, 5, 1))
    assert group_order(10, 1).tolist() == list(range(10))
    with pytest.raises(ValueError):
        group_order(3, 5)


@pytest.mark.parametrize("groups", [1, 5, 10])
def test_neglabel_plain_equals_per_group_softmax(data, groups):
    got = compute_scores(data, ScoreConfig(groups=groups))
    expected = neglabel_reference(data.images, data.classes, data.negatives, groups, 0)
    np.testing.assert_allclose(got["s_neglabel_plain"], expected, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(got["s_neglabel_star"], got["s_neglabel_plain"])  # all switches off


def test_mcm(data):
    got = compute_scores(data, ScoreConfig(groups=5, mcm_temperature=1.0))
    cos = (data.images.double() @ data.classes.double().T).numpy()
    np.testing.assert_allclose(got["s_mcm"], [softmax(row).max() for row in cos], atol=1e-6)
    sharp = compute_scores(data, ScoreConfig(groups=5, mcm_temperature=0.01))
    np.testing.assert_allclose(sharp["s_mcm"], [softmax(row / 0.01).max() for row in cos], atol=1e-5)
    np.testing.assert_array_equal(got["pred_class"], cos.argmax(axis=1))


def test_m1_topk(data):
    got = compute_scores(data, ScoreConfig(groups=5, neg_topk=7))
    x, p, n = (t.double().numpy() for t in (data.images, data.classes, data.negatives))
    for i in range(N_IMAGES):
        pos, neg = 100 * x[i] @ p.T, np.sort(100 * x[i] @ n.T)[::-1][:7]
        assert got["s_neglabel_star"][i] == pytest.approx(
            softmax(np.concatenate([pos, neg]))[:K].sum(), abs=2e-6
        )


def test_m2_role_aware_grouped_and_with_m1(data):
    subset = data.negatives[data.star_indices]
    got = compute_scores(data, ScoreConfig(groups=4, role_aware=True))
    np.testing.assert_allclose(
        got["s_neglabel_star"], neglabel_reference(data.images, data.classes, subset, 4, 0), atol=2e-6
    )
    both = compute_scores(data, ScoreConfig(groups=4, role_aware=True, neg_topk=3))
    x, p, n = (t.double().numpy() for t in (data.images, data.classes, subset))
    for i in range(N_IMAGES):
        pos, neg = 100 * x[i] @ p.T, np.sort(100 * x[i] @ n.T)[::-1][:3]
        assert both["s_neglabel_star"][i] == pytest.approx(
            softmax(np.concatenate([pos, neg]))[:K].sum(), abs=2e-6
        )
    # the plain score never changes with the switches
    np.testing.assert_array_equal(
        both["s_neglabel_plain"], compute_scores(data, ScoreConfig(groups=4))["s_neglabel_plain"]
    )


def test_multimatching_equals_negrefine_loop(data):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return fake_text_features(texts)

    got = compute_scores(data, ScoreConfig(groups=5), encode_pairs=encode)
    assert len(calls) == 1 and len(set(calls[0])) == len(calls[0])  # each distinct pair encoded once
    x, p, n = (t.double().numpy() for t in (data.images, data.classes, data.negatives))
    for i in range(N_IMAGES):
        pos_sim, neg_sim = 100 * x[i] @ p.T, 100 * x[i] @ n.T
        top_pos = np.argsort(-pos_sim, kind="stable")[:5]
        top_neg = np.argsort(-neg_sim, kind="stable")[:5]
        texts, neg_values = [], []
        for a in top_pos:
            for b in top_neg:
                texts.append(f"class{a} and neg{b}")
                neg_values.append(neg_sim[b])
        sim = 100 * fake_text_features(texts).double().numpy() @ x[i]
        expected = np.max(np.exp(sim) / (np.exp(sim) + np.exp(np.array(neg_values))))
        assert got["s_multimatch"][i] == pytest.approx(expected, abs=2e-6)
    np.testing.assert_allclose(got["s_negrefine"], got["s_neglabel_plain"] + 2 * got["s_multimatch"])
    assert np.isnan(compute_scores(data, ScoreConfig(groups=5))["s_multimatch"]).all()


def test_p_align_equals_loop(data):
    got = compute_scores(data, ScoreConfig(groups=5))
    x, p, b = (t.double().numpy() for t in (data.images, data.classes, data.background))
    n_bg = data.negatives[data.background_indices].double().numpy()
    for i in range(N_IMAGES):
        c_hat = int(np.argmax(x[i] @ p.T))
        pos = b[i] @ p[c_hat]
        neg = np.sort(b[i] @ n_bg.T)[::-1][:5].mean()
        assert got["s_bg_pos"][i] == pytest.approx(pos, abs=1e-6)
        assert got["s_bg_neg"][i] == pytest.approx(neg, abs=1e-6)
        assert got["p_align"][i] == pytest.approx(pos - neg, abs=1e-6)  # fallback: invalid rows too
    invalid = ~data.background_valid.numpy()
    assert invalid.sum() == 2
    zero = compute_scores(data, ScoreConfig(groups=5, invalid_cam="zero"))
    exclude = compute_scores(data, ScoreConfig(groups=5, invalid_cam="exclude"))
    assert (zero["p_align"][invalid] == 0).all() and np.isnan(exclude["p_align"][invalid]).all()
    for policy in (zero, exclude):
        np.testing.assert_array_equal(policy["p_align"][~invalid], got["p_align"][~invalid])
        assert np.isnan(policy["s_bg_pos"][invalid]).all() and np.isnan(policy["s_bg_neg"][invalid]).all()
    no_background = ScoreInputs(**{**data.__dict__, "background": None})
    assert np.isnan(compute_scores(no_background, ScoreConfig(groups=5))["p_align"]).all()


def test_chunking_does_not_change_results(data, monkeypatch):
    whole = compute_scores(data, ScoreConfig(groups=5, neg_topk=4), encode_pairs=fake_text_features)
    monkeypatch.setattr(scores_module, "MEMORY_BUDGET_FLOATS", 200)  # a handful of images per chunk
    monkeypatch.setattr(scores_module.chunk_rows, "__defaults__", (200,))
    chunks = []
    small = compute_scores(
        data, ScoreConfig(groups=5, neg_topk=4), encode_pairs=fake_text_features, on_chunk=chunks.append
    )
    assert len(chunks) > 5 and sum(chunks) == N_IMAGES
    for name, values in whole.items():
        np.testing.assert_allclose(small[name], values, atol=5e-6, err_msg=name)  # fp32 matmul blocking


# ----------------------------------------------------------------------------- saturation
def test_saturated_scores_keep_their_order(data):
    """Clearly-OOD images (every negative far closer than any class) drive NegLabel's softmax mass
    below float32's range: computed in float32 they all tie at exactly 0. The float64 aggregation
    keeps them distinct and in the order of the float64 brute force."""
    g = torch.Generator().manual_seed(7)
    eye = torch.eye(D)
    classes = eye[:K]  # the classes span the first K axes, the negatives the others
    negatives = torch.nn.functional.normalize(torch.randn(M, D, generator=g) * (torch.arange(D) >= K), dim=1)
    # images on a negative, pointing away from every class: LSE(pos) − LSE(neg) ≈ −110 … −130
    away = torch.rand(20, 1, generator=g) * 0.1 + 0.15
    far = torch.nn.functional.normalize(negatives[:20] - away * classes.sum(0), dim=1)
    inputs = ScoreInputs(
        **{
            **data.__dict__,
            "images": far,
            "classes": classes,
            "negatives": negatives,
            "background": None,
            "background_valid": None,
        }
    )
    got = compute_scores(inputs, ScoreConfig(groups=1))["s_neglabel_plain"]
    expected = neglabel_reference(far, classes, negatives, 1, 0)
    assert expected.max() < 1e-40  # float32 would return exactly 0.0 for all of them
    assert (got > 0).all() and len(np.unique(got)) == len(got)
    np.testing.assert_allclose(got, expected, rtol=1e-4)  # float32 logits: |Δd| ~ 1e-5
    np.testing.assert_array_equal(np.argsort(got), np.argsort(expected))
    top = compute_scores(inputs, ScoreConfig(groups=1, neg_topk=3))["s_neglabel_star"]
    assert (top > 0).all() and len(np.unique(top)) == len(top)


def test_unsaturated_scores_move_less_than_1e_6_from_float32(data):
    """The float64 aggregation changes nothing that float32 could represent (< 1e-6)."""
    x = torch.nn.functional.normalize(data.images, dim=1)
    pos = 100 * x @ data.classes.T
    neg = (100 * x @ data.negatives.T)[:, group_order(M, 5, 0)]
    pos_lse = torch.logsumexp(pos, -1, keepdim=True)
    neg_lse = torch.logsumexp(neg.reshape(N_IMAGES, 5, -1), -1)
    float32 = torch.sigmoid(pos_lse - neg_lse).mean(-1).numpy()
    got = compute_scores(data, ScoreConfig(groups=5))["s_neglabel_plain"]
    assert got.dtype == np.float64
    assert np.abs(got - float32).max() < 1e-6


def test_energy_and_maxlogit_equal_loops(data):
    """Energy (logsumexp of the class logits, T = 1) and MaxLogit (the largest class logit), on the
    zero-shot logits 100·cos, against a per-image loop."""
    got = compute_scores(data, ScoreConfig(groups=5))
    x, p = (t.double().numpy() for t in (data.images, data.classes))
    for i in range(N_IMAGES):
        logits = [100 * float(np.dot(x[i], p[k])) for k in range(K)]
        top = max(logits)
        assert got["s_energy"][i] == pytest.approx(
            top + np.log(sum(np.exp(v - top) for v in logits)), abs=1e-4
        )
        assert got["s_maxlogit"][i] == pytest.approx(top, abs=1e-4)
    assert (got["s_energy"] >= got["s_maxlogit"]).all()  # logsumexp ≥ max


def test_group_logsumexp_in_place_equals_torch():
    generator = torch.Generator().manual_seed(5)
    logits = 100 * torch.randn(37, 600, generator=generator).clamp(-1, 1)
    logits[0, :6] = -1e30  # a group far below the rest
    logits[1] = -150.0
    expected = torch.logsumexp(logits.unflatten(-1, (100, -1)), dim=-1)
    scratch = torch.cat([logits, torch.zeros(37, 5)], dim=1)  # the buffer is wider than the groups
    got = scores_module.group_logsumexp(scratch[:, :600], 100, overwrite=True)
    assert torch.equal(got, expected)  # the same operations: the same bits
    assert torch.equal(scores_module.group_logsumexp(logits, 100), expected)


@pytest.mark.parametrize("kept,groups,k", [(600, 100, 5), (600, 6, 5), (590, 10, 5), (600, 3, 5), (0, 1, 3)])
def test_top_columns_equal_a_full_topk(kept, groups, k):
    generator = torch.Generator().manual_seed(kept + groups)
    logits = torch.randn(50, 607, generator=generator)
    if kept:
        logits[3, kept:] = 9.0 + torch.arange(607 - kept)  # the largest values among the dropped columns
        logits[4, :12] = 8.0 + torch.arange(12.0)  # all in the first blocks
    values, columns = scores_module.top_columns(logits, k, kept, groups)
    expected_values, expected_columns = torch.topk(logits, k, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(columns, expected_columns)  # no ties in these values
    assert torch.equal(torch.gather(logits, 1, columns), values)
