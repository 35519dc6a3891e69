"""NegRefine's multi-matching by index (a device-side pair table addressed by class and negative):
the same numbers as the string-per-pair implementation it replaced, bit for bit, and each distinct
pair encoded once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

import negalign_cli.compute.scores as scores_module
from negalign_cli.compute.score_columns import pair_text
from negalign_cli.compute.scores import (
    LOGIT_SCALE,
    NegativeLayout,
    PairTable,
    ScoreConfig,
    ScoreInputs,
    _blocks,
    chunk_rows,
    compute_scores,
    multimatch,
    top_columns,
    unit_rows,
)

D = 24


def unit(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(rows, D, generator=g, dtype=torch.float64), dim=1
    ).float()


def text_features(texts: list[str]) -> torch.Tensor:
    """A deterministic stand-in for the text tower: a unit vector per text."""
    return torch.stack([unit(1, int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))[0] for t in texts])


def index_encoder(inputs: ScoreInputs, calls: list[int] | None = None):
    """An encoder by (class, negative) index with the features ``text_features`` gives the texts."""

    def encode(classes: np.ndarray, negatives: np.ndarray) -> torch.Tensor:
        if calls is not None:
            calls.append(len(classes))
        assert len(set(zip(classes.tolist(), negatives.tolist(), strict=True))) == len(classes)
        names = zip(classes.tolist(), negatives.tolist(), strict=True)
        return text_features([pair_text(inputs.class_names[a], inputs.negative_names[b]) for a, b in names])

    return encode


# ----------------------------------------------------------------------------- the former code
def former_multimatch(
    inputs: ScoreInputs, config: ScoreConfig, encode_pairs: Callable[[list[str]], torch.Tensor]
) -> np.ndarray:
    """The implementation this change replaced (strings per pair per chunk), kept verbatim in its
    steps: top-k per score chunk as ``_score_chunk`` took it, then ``_multimatch_column`` with
    ``distinct_pairs`` over chunks of at most 16,384 images."""
    classes, negatives = inputs.classes.float(), inputs.negatives.float()
    n_images = inputs.images.shape[0]
    layout = NegativeLayout.build(negatives, inputs.star_indices, config)
    k_pos = min(config.multimatch_pos, classes.shape[0])
    k_neg = min(config.multimatch_neg, negatives.shape[0])
    top_classes = np.empty((n_images, k_pos), dtype=np.int64)
    top_negatives = np.empty((n_images, k_neg), dtype=np.int64)
    top_logits = np.empty((n_images, k_neg), dtype=np.float32)
    step = min(chunk_rows(negatives.shape[0] + classes.shape[0]), max(1, n_images))
    buffer = torch.empty(step, negatives.shape[0])
    for start in range(0, n_images, step):
        rows = slice(start, min(start + step, n_images))
        x = unit_rows(inputs.images, rows.start, rows.stop)
        pos_logits = LOGIT_SCALE * (x @ classes.T)
        logits = buffer[: x.shape[0]]
        torch.matmul(LOGIT_SCALE * x, layout.weights, out=logits)
        maxes = _blocks(logits[:, : layout.kept], config.groups).amax(dim=-1)
        values, columns = top_columns(logits, k_neg, layout.kept, config.groups, maxes)
        top_negatives[rows] = layout.layout[columns.cpu()].numpy()
        top_logits[rows] = values.cpu().numpy()
        top_classes[rows] = torch.topk(pos_logits, k_pos, dim=-1).indices.cpu().numpy()
    pair_negative_logits = torch.from_numpy(np.tile(top_logits, (1, k_pos)))
    column = np.full(n_images, np.nan)
    rows_per = min(16384, chunk_rows(k_pos * k_neg * classes.shape[1]))
    for start in range(0, n_images, rows_per):
        stop = min(start + rows_per, n_images)
        pair_ids, pair_texts = former_distinct_pairs(
            top_classes[start:stop], top_negatives[start:stop], inputs.class_names, inputs.negative_names
        )
        features = encode_pairs(pair_texts).float()[torch.from_numpy(pair_ids)]
        column[start:stop] = (
            multimatch(unit_rows(inputs.images, start, stop), features, pair_negative_logits[start:stop])
            .cpu()
            .numpy()
        )
    return column


def former_distinct_pairs(
    top_pos: np.ndarray, top_neg: np.ndarray, class_names: Sequence[str], negative_names: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    n_neg = len(negative_names)
    codes = (top_pos[:, :, None] * n_neg + top_neg[:, None, :]).reshape(top_pos.shape[0], -1)
    unique, inverse = np.unique(codes, return_inverse=True)
    texts = [pair_text(class_names[c // n_neg], negative_names[c % n_neg]) for c in unique.tolist()]
    return inverse.reshape(codes.shape), texts


# ----------------------------------------------------------------------------- brute force
def brute_force(inputs: ScoreInputs, config: ScoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """NegRefine's loop, one image and one pair at a time in float64; also which images have an
    unambiguous top-k (no tie across the k-th place), where the loop's choice must match."""
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(inputs.images)).double(), dim=1).numpy()
    p, n = inputs.classes.double().numpy(), inputs.negatives.double().numpy()
    k_pos, k_neg = min(config.multimatch_pos, len(p)), min(config.multimatch_neg, len(n))
    values, clear = np.empty(len(x)), np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        pos, neg = LOGIT_SCALE * x[i] @ p.T, LOGIT_SCALE * x[i] @ n.T
        top_pos, top_neg = np.argsort(-pos, kind="stable"), np.argsort(-neg, kind="stable")
        for sims, order, k in ((pos, top_pos, k_pos), (neg, top_neg, k_neg)):
            if k < len(sims) and abs(sims[order[k - 1]] - sims[order[k]]) < 1e-4:
                clear[i] = False
        best = -np.inf
        for a in top_pos[:k_pos]:
            for b in top_neg[:k_neg]:
                f = text_features([pair_text(inputs.class_names[a], inputs.negative_names[b])])[0].double()
                s = LOGIT_SCALE * x[i] @ f.numpy()
                best = max(best, 1.0 / (1.0 + np.exp(neg[b] - s)))
        values[i] = best
    return values, clear


# ----------------------------------------------------------------------------- data
def real_like(n_images: int, n_classes: int, n_negatives: int, seed: int, ties: bool = False) -> ScoreInputs:
    """Images as noisy mixtures of a few class and negative features (pairs repeat across images,
    as in real data), some images duplicated; with ``ties``, duplicated class and negative
    features (exactly tied logits)."""
    classes, negatives = unit(n_classes, seed), unit(n_negatives, seed + 1)
    if ties:
        classes[1] = classes[0]
        classes[3] = classes[2]
        negatives[5:9] = negatives[4]
    g = torch.Generator().manual_seed(seed + 2)
    c = torch.randint(0, n_classes, (n_images,), generator=g)
    m = torch.randint(0, n_negatives, (n_images, 2), generator=g)
    mix = 2.0 * classes[c] + negatives[m].sum(1) + 0.6 * torch.randn(n_images, D, generator=g)
    images = torch.nn.functional.normalize(mix, dim=1)
    images[n_images // 2 :: 7] = images[0].clone()  # exact duplicates: every pair of image 0 repeats
    return ScoreInputs(
        images=images.numpy(),
        classes=classes,
        negatives=negatives,
        class_names=[f"class{i}" for i in range(n_classes)],
        negative_names=[f"neg{i}" for i in range(n_negatives)],
    )


CASES = {
    "repeated pairs": (real_like(300, 12, 80, 10), ScoreConfig(groups=8)),
    "ties": (real_like(200, 10, 60, 20, ties=True), ScoreConfig(groups=6)),
    "k > classes": (real_like(120, 3, 40, 30), ScoreConfig(groups=4)),
    "k > negatives": (real_like(90, 9, 3, 40), ScoreConfig(groups=1, multimatch_pos=7)),
    "one image": (real_like(1, 5, 30, 50), ScoreConfig(groups=3)),
}


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", CASES)
def test_the_pair_table_gives_the_former_numbers_bit_for_bit(case, monkeypatch):
    inputs, config = CASES[case]
    got = compute_scores(inputs, config, text_features)["s_multimatch"]
    expected, clear = brute_force(inputs, config)
    assert clear.mean() > 0.5
    np.testing.assert_allclose(got[clear], expected[clear], rtol=0, atol=1e-5)
    if case == "ties":
        # among exactly equal logits the C passes take the smaller class or column first, where
        # torch.topk (the former code's) has an order of its own: that choice picks another pair
        monkeypatch.setattr(scores_module, "native_passes", lambda: None)
        got = compute_scores(inputs, config, text_features)["s_multimatch"]
    np.testing.assert_array_equal(got, former_multimatch(inputs, config, text_features))


@pytest.mark.parametrize("case", CASES)
def test_an_index_encoder_gives_the_same_numbers(case):
    inputs, config = CASES[case]

    table = PairTable(index_encoder(inputs), len(inputs.negative_names))
    got = compute_scores(inputs, config, table)["s_multimatch"]
    np.testing.assert_array_equal(got, compute_scores(inputs, config, text_features)["s_multimatch"])


def test_each_distinct_pair_is_encoded_once_across_chunks(monkeypatch):
    inputs, config = CASES["repeated pairs"]
    whole = compute_scores(inputs, config, text_features)
    monkeypatch.setattr(scores_module, "MEMORY_BUDGET_FLOATS", 2000)  # ~20 images per chunk
    monkeypatch.setattr(scores_module.chunk_rows, "__defaults__", (2000,))
    asked: list[list[str]] = []
    chunks: list[int] = []

    def encode(texts: list[str]) -> torch.Tensor:
        asked.append(texts)
        return text_features(texts)

    small = compute_scores(inputs, config, encode, on_chunk=chunks.append)
    texts = [t for call in asked for t in call]
    assert len(chunks) > 10
    assert len(texts) == len(set(texts))  # a pair seen in an earlier chunk is not encoded again
    assert 1 < len(asked) <= len(chunks)  # at most one batch per chunk
    np.testing.assert_allclose(small["s_multimatch"], whole["s_multimatch"], rtol=0, atol=1e-6)
    # every pair that some image's top-k forms, and only those
    x = torch.nn.functional.normalize(torch.as_tensor(inputs.images), dim=1)
    top_pos = torch.topk(x @ inputs.classes.T, 5).indices
    top_neg = torch.topk(x @ inputs.negatives.T, 5).indices
    formed = {
        pair_text(inputs.class_names[a], inputs.negative_names[b])
        for i in range(len(x))
        for a in top_pos[i].tolist()
        for b in top_neg[i].tolist()
    }
    assert len(formed ^ set(texts)) <= 0.02 * len(formed)  # fp32 near-ties may swap a k-th place
    assert len(texts) < 0.6 * 25 * len(x)  # the data repeats pairs


def test_a_kept_table_encodes_nothing_the_second_time():
    inputs, config = CASES["repeated pairs"]
    calls: list[int] = []

    table = PairTable(index_encoder(inputs, calls), len(inputs.negative_names))
    first = compute_scores(inputs, config, table)["s_multimatch"]
    encoded = table.encoded
    assert encoded == sum(calls) == len(table) > 0
    second = compute_scores(inputs, config, table)["s_multimatch"]
    assert table.encoded == encoded and sum(calls) == encoded  # all from the table
    np.testing.assert_array_equal(first, second)


def test_a_full_table_starts_afresh_with_the_same_numbers(monkeypatch):
    inputs, config = CASES["repeated pairs"]
    monkeypatch.setattr(scores_module.chunk_rows, "__defaults__", (3000,))
    monkeypatch.setattr(scores_module, "MEMORY_BUDGET_FLOATS", 3000)

    roomy = compute_scores(inputs, config, PairTable(index_encoder(inputs), len(inputs.negative_names)))
    small = PairTable(index_encoder(inputs), len(inputs.negative_names), max_floats=60 * D)
    tight = compute_scores(inputs, config, small)
    assert small.resets > 0 and len(small) * D <= max(60 * D, 25 * 30 * D)
    np.testing.assert_array_equal(tight["s_multimatch"], roomy["s_multimatch"])


def test_pair_ids_address_class_and_negative():
    table = PairTable(lambda c, n: torch.zeros(len(c), D), 7)
    ids = table.pair_ids(torch.tensor([[2, 0]]), torch.tensor([[6, 1, 3]]))
    assert ids.tolist() == [[2 * 7 + 6, 2 * 7 + 1, 2 * 7 + 3, 6, 1, 3]]  # positive-major, as NegRefine


def test_the_score_stage_keeps_its_numbers_through_the_text_cache(
    tiny_model, workspace, tmp_path, monkeypatch
):
    """The `score` stage, its texts from the per-word cache: s_multimatch equals the former
    string path over the same cache bit for bit, and each "p and n" text is asked for once."""
    import pandas as pd

    from negalign_cli.inputs.words import WordList
    from negalign_cli.stages import scoring
    from negalign_cli.stages.scoring import (
        TextEncoder,
        _load_images,
        open_image_set,
        score_images,
        score_inputs,
    )
    from negalign_cli.stages.vocab import negatives_from_lists
    from tests.helpers.synthetic import write_image_set

    images = write_image_set(tmp_path / "imgs", n=40, dim=64, seed=3)
    classes = WordList("t", tuple(f"bird {i}" for i in range(7)))
    vocab = negatives_from_lists(WordList("n", tuple(f"thing {i}" for i in range(30))), None)
    config = ScoreConfig(groups=5)
    asked: list[str] = []
    original = TextEncoder.pairs

    def counting(self, texts):
        asked.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(scoring.TextEncoder, "pairs", counting)
    monkeypatch.setattr(scores_module.chunk_rows, "__defaults__", (37 * 8,))  # 8 images per chunk
    result = score_images(tiny_model, open_image_set(images), classes, vocab, workspace, config)
    frame = pd.read_parquet(result.artifact.file("scores.parquet"))
    assert len(asked) == len(set(asked)) > 0
    image_set = open_image_set(images)
    _, embeddings, _, _ = _load_images(image_set)
    texts = TextEncoder(tiny_model, workspace, 64, scoring.NullReporter())
    inputs = score_inputs(embeddings, None, None, classes, vocab, config, texts)
    former = former_multimatch(inputs, config, texts.words)
    np.testing.assert_array_equal(frame.sort_values("row")["s_multimatch"].to_numpy(), former)
