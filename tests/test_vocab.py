from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from negalign_cli.assets import csp_suffixes
from negalign_cli.cli.app import app
from negalign_cli.compute.vocab import (
    assign_roles,
    build_candidates,
    class_similarity,
    least_similar,
    role_scores,
)
from negalign_cli.inputs.lexicon import NEGLABEL_FILES, Lexicon, load_lexicon, read_wordnet
from negalign_cli.inputs.words import WordList, load_negatives, load_templates
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages.vocab import VocabEntry, mine_negatives, split_scores, split_vocab, summarise_split
from tests.helpers import TINY

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

runner = CliRunner()


def encode_one(model, text: str) -> np.ndarray:
    with torch.no_grad():
        return model.model.encode_text(model.tokenizer([text]))[0].double().numpy()


def word_vector(model, word: str, templates) -> np.ndarray:
    mean = np.mean([encode_one(model, t.format(word)) for t in templates], axis=0)
    return mean / np.linalg.norm(mean)


def cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- split
def test_r_score_equals_per_word_brute_force(tiny_model, workspace):
    nouns = WordList("test", ("ocean", "teapot", "brick wall", "sky"))
    adjs = WordList("test", ("rusty thing", "sky"))
    scores = split_scores(tiny_model, [VocabEntry(nouns, "noun"), VocabEntry(adjs, "adj")], workspace)
    frame = pd.read_parquet(scores.artifact.file("r_scores.parquet"))
    assert frame["word"].tolist() == ["ocean", "teapot", "brick wall", "sky", "rusty thing", "sky"]
    assert frame["source"].tolist() == ["noun"] * 4 + ["adj"] * 2
    obj_t, bg_t = load_templates("object").templates, load_templates("background").templates
    for row in frame.itertuples():
        e = encode_one(tiny_model, row.word)
        obj = cos(e, word_vector(tiny_model, row.word, obj_t))
        bg = cos(e, word_vector(tiny_model, row.word, bg_t))
        assert row.obj_affinity == pytest.approx(obj, abs=1e-6)
        assert row.bg_affinity == pytest.approx(bg, abs=1e-6)
        assert row.r_score == pytest.approx(obj - bg, abs=1e-6)


def test_role_scores_formula():
    rng = np.random.default_rng(0)
    e, o, b = rng.normal(size=(3, 5, 4))
    r, obj, bg = role_scores(e, o, b)
    for i in range(5):
        assert obj[i] == pytest.approx(cos(e[i], o[i])) and bg[i] == pytest.approx(cos(e[i], b[i]))
        assert r[i] == pytest.approx(cos(e[i], o[i]) - cos(e[i], b[i]))


def test_roles_at_exactly_plus_minus_tau():
    tau = 0.05
    r = np.array([0.05, -0.05, np.nextafter(0.05, 0), np.nextafter(-0.05, 0), 0.0, 0.7, -0.7])
    assert assign_roles(r, tau).tolist() == ["obj", "bg", "ambiguous", "ambiguous", "ambiguous", "obj", "bg"]
    assert assign_roles(np.array([0.0, 1e-9, -1e-9]), 0.0).tolist() == ["obj", "obj", "bg"]
    with pytest.raises(ValueError):
        assign_roles(r, -0.1)


def test_split_on_the_real_negrefine_lists(tiny_model, workspace):
    nouns, adjs = load_negatives("negrefine-imagenet-noun"), load_negatives("negrefine-imagenet-adj")
    scores = split_scores(tiny_model, [VocabEntry(nouns, "noun"), VocabEntry(adjs, "adj")], workspace)
    split = split_vocab(scores.artifact, workspace, tau=0.05)
    listed = {
        role: split.artifact.file(f"neg_{role}.txt").read_text().splitlines()
        for role in ("obj", "bg", "ambiguous")
    }
    assert sum(len(v) for v in listed.values()) == 6370
    everything = sorted(w for v in listed.values() for w in v)
    assert everything == sorted(nouns.words + adjs.words)  # the three files partition the entries
    csv = pd.read_csv(split.artifact.file("split_scores.csv"), keep_default_na=False)
    assert list(csv.columns) == ["word", "source", "r_score", "obj_affinity", "bg_affinity", "role"]
    assert len(csv) == 6370 and (csv["source"] == "noun").sum() == 4998
    for role, words in listed.items():
        assert csv.loc[csv["role"] == role, "word"].tolist() == words  # CSV and TXT agree, in order
    np.testing.assert_array_equal(assign_roles(csv["r_score"].to_numpy(), 0.05), csv["role"].to_numpy())
    summary = summarise_split(split.artifact)
    assert summary.table.iloc[-1]["total"] == 6370
    assert summary.most_object["r_score"].is_monotonic_decreasing and len(summary.most_background) == 10
    # only the threshold changes: the scores are a hit, the split is recomputed
    reporter = RecordingReporter()
    again = split_scores(
        tiny_model, [VocabEntry(nouns, "noun"), VocabEntry(adjs, "adj")], workspace, reporter=reporter
    )
    assert again.hit
    other = split_vocab(again.artifact, workspace, tau=0.1)
    assert (
        not other.hit
        and other.artifact.manifest["counts"]["ambiguous"] >= split.artifact.manifest["counts"]["ambiguous"]
    )


# ----------------------------------------------------------------------------- mining
TINY_LEXICON = {
    "noun.artifact": ("teapot", "brick wall", "waterbirds", "kettle", "sail"),
    "noun.object": ("ocean", "sky", "kettle", "desert"),
    "noun.person": ("sailor", "baker"),
    "adj.all": ("rusty", "blue", "sky", "shiny", "wet"),
    "adj.pert": ("oceanic",),
    "verb.motion": ("run",),
}


def test_candidates_follow_negrefine_rules():
    suffixes = csp_suffixes()
    c = build_candidates(
        TINY_LEXICON, ["waterbirds", "landbirds"], ["noun.person", "adj.pert"], suffixes, seed=0
    )
    # files are read in sorted order: adj.all first, so "sky" is an adjective and the noun "sky" a duplicate
    assert c.adjectives == ["rusty", "blue", "sky", "shiny", "wet"]
    assert c.nouns == ["teapot", "brick wall", "kettle", "sail", "ocean", "desert"]
    assert c.noun_sources[:2] == ["noun.artifact", "noun.artifact"] and c.noun_sources[-1] == "noun.object"
    assert c.dropped_as_class == 1 and c.duplicates == 2  # "kettle" again, "sky" again
    rng = random.Random(0)
    assert c.phrases == [rng.choice(list(suffixes)).format(a) for a in c.adjectives]
    again = build_candidates(TINY_LEXICON, ["waterbirds"], ["noun.person", "adj.pert"], suffixes, seed=0)
    other = build_candidates(TINY_LEXICON, ["waterbirds"], ["noun.person", "adj.pert"], suffixes, seed=1)
    assert again.phrases == c.phrases and other.phrases != c.phrases


def test_class_similarity_against_brute_force():
    rng = np.random.default_rng(1)
    words = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(50, 8))), dim=1).float()
    classes = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(6, 8))), dim=1).float()
    words[3] = classes[2]  # a near-synonym of a class saturates to 1.0
    for q in (1.0, 0.5, 0.9):
        got = class_similarity(words, classes, quantile=q, chunk_size=7)
        for i in range(50):
            cosines = sorted(float(words[i] @ classes[k]) for k in range(6))
            expected = 1.0 if max(cosines) > 0.95 else float(np.quantile(cosines, q))
            assert float(got[i]) == pytest.approx(expected, abs=1e-6)
        assert float(got[3]) == 1.0


def test_least_similar_keeps_floor_top_p():
    similarity = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 0.2, 0.8])
    for top_p in (0.15, 0.3, 0.5, 1.0):
        keep = least_similar(similarity, top_p)
        n = int(7 * top_p)
        assert len(keep) == n
        assert keep.tolist() == sorted(range(7), key=lambda i: (float(similarity[i]), i))[:n]


def test_mine_negatives_end_to_end(tiny_model, workspace):
    lexicon = Lexicon("tiny", TINY_LEXICON)
    classes = WordList("test", ("waterbirds", "landbirds"))
    result = mine_negatives(tiny_model, classes, lexicon, workspace, top_p=0.5, seed=3)
    scores = pd.read_csv(result.artifact.file("mining_scores.csv"), keep_default_na=False)
    nouns = scores[scores["kind"] == "noun"]
    kept_nouns = result.artifact.file("neg_labels_noun.txt").read_text().splitlines()
    assert len(kept_nouns) == int(len(nouns) * 0.5)
    brute = nouns.sort_values("similarity", kind="stable")["word"].tolist()[: len(kept_nouns)]
    assert kept_nouns == brute
    assert set(nouns.loc[nouns["kept"], "word"]) == set(kept_nouns)
    # similarity is the max cosine of the noun (noun templates) to the classes (noun templates)
    noun_t = load_templates("noun").templates
    class_vectors = [word_vector(tiny_model, c, noun_t) for c in classes.words]
    for row in nouns.itertuples():
        expected = max(cos(word_vector(tiny_model, row.word, noun_t), v) for v in class_vectors)
        assert row.similarity == pytest.approx(1.0 if expected > 0.95 else expected, abs=1e-6)
    adjectives = scores[scores["kind"] == "adj"]
    kept_adj = result.artifact.file("neg_labels_adj.txt").read_text().splitlines()
    assert len(kept_adj) == int(len(adjectives) * 0.5) and set(kept_adj) <= set(adjectives["word"])
    assert mine_negatives(tiny_model, classes, lexicon, workspace, top_p=0.5, seed=3).hit
    reseeded = mine_negatives(tiny_model, classes, lexicon, workspace, top_p=0.5, seed=4)
    assert not reseeded.hit


# ----------------------------------------------------------------------------- lexicon
def test_read_wordnet_on_a_small_data_file(tmp_path):
    header = "  1 This software and database is being provided\n"
    (tmp_path / "data.noun").write_text(
        header
        + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists\n"
        + "00002000 06 n 02 Teapot 0 tea_kettle 0 000 | a pot\n"
        + "00002001 06 n 01 teapot 1 000 | again\n"
        + "00002002 05 n 01 cat 0 000 | animal\n"
    )
    (tmp_path / "data.adj").write_text(
        header
        + "00000001 00 a 01 able 0 000 | x\n"
        + "00000002 00 s 01 upper(a) 0 000 | y\n"
        + "00000003 44 a 01 used 0 000 | z\n"
    )
    files = read_wordnet(tmp_path)
    assert files == {
        "noun.Tops": ["entity"],
        "noun.artifact": ["teapot"],
        "noun.animal": ["cat"],
        "adj.all": ["able", "upper"],
        "adj.ppl": ["used"],
    }


def test_bundled_lexicon():
    lexicon = load_lexicon()
    assert sorted(lexicon.files) == sorted(NEGLABEL_FILES) and len(lexicon.files) == 27
    assert len(lexicon) == 80389
    assert "noun.animal" not in lexicon.files


def test_a_lexicon_file_with_a_bom_and_odd_spacing(tmp_path):
    """A BOM (a Windows editor's UTF-8) is not part of the first word, and runs of spaces or
    underscores read as one space, as in every other word list. Before: "\ufeffbirds" was not the
    class "birds" and stayed a negative."""
    (tmp_path / "noun.artifact.txt").write_bytes(
        "\ufeffbirds\r\nsea  horse\nsea__lion\n\n teapot \n".encode()
    )
    (tmp_path / "adj.all.txt").write_text("red\n")
    lexicon = load_lexicon(tmp_path)
    assert lexicon.files["noun.artifact"] == ("birds", "sea horse", "sea lion", "teapot")


@pytest.mark.skipif(
    not (SHARED / "neglabel-wordnet-lexicon").is_dir(), reason="reference lexicon not present"
)
def test_bundled_lexicon_matches_neglabel():
    ours, theirs = load_lexicon(), load_lexicon(SHARED / "neglabel-wordnet-lexicon")
    assert sorted(ours.files) == sorted(theirs.files)
    common = sum(len(set(ours.files[n]) & set(theirs.files[n])) for n in theirs.files)
    assert common / len(theirs) > 0.996  # 79,188 of 79,455 when measured


# ----------------------------------------------------------------------------- CLI
def test_split_vocab_cli_and_tau_rerun(tmp_path):
    nouns, adjs = tmp_path / "n.txt", tmp_path / "a.txt"
    nouns.write_text("ocean\nteapot\n\nocean\nforest\n")
    adjs.write_text("rusty thing\nblue sky view\n")
    base = [
        "split-vocab",
        "--nouns",
        str(nouns),
        "--adjs",
        str(adjs),
        "--cache-dir",
        str(tmp_path / "c"),
        *TINY,
    ]
    first = runner.invoke(app, [*base, "--out", str(tmp_path / "d")])
    assert first.exit_code == 0, first.output
    assert "duplicate" in first.output and "roles at tau = 0.05" in first.output
    assert "most background-leaning" in first.output
    written = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert written == ["manifest.json", "neg_ambiguous.txt", "neg_bg.txt", "neg_obj.txt", "split_scores.csv"]
    second = runner.invoke(app, [*base, "--tau", "0.1"])
    assert second.exit_code == 0 and "cache hit: split-scores" in second.output
    assert "roles at tau = 0.1" in second.output
    bad = runner.invoke(app, [*base, "--tau", "-0.1"])
    assert bad.exit_code != 0 and "--tau" in bad.output
    none = runner.invoke(app, ["split-vocab", "--cache-dir", str(tmp_path / "c")])
    assert none.exit_code != 0 and "--nouns" in none.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["split-vocab", "--nouns", str(empty), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code != 0 and "holds no entries" in result.output


def test_long_words_are_counted_as_truncated(tmp_path):
    nouns = tmp_path / "n.txt"
    nouns.write_text("ocean\n" + " ".join(["word"] * 90) + "\n")
    result = runner.invoke(
        app, ["split-vocab", "--nouns", str(nouns), "--cache-dir", str(tmp_path / "c"), *TINY]
    )
    assert result.exit_code == 0 and "6 prompt(s) were longer" in result.output


def test_mine_negatives_cli(tmp_path):
    lexicon = tmp_path / "lex"
    lexicon.mkdir()
    for name, words in TINY_LEXICON.items():
        (lexicon / f"{name}.txt").write_text("\n".join(w.replace(" ", "_") for w in words) + "\n")
    args = [
        "mine-negatives",
        "--classes",
        "waterbird",
        "--lexicon",
        str(lexicon),
        "--top-p",
        "0.5",
        *TINY,
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "d"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "kept 3 of 6 nouns" in result.output
    assert (tmp_path / "d" / "neg_labels_noun.txt").read_text().count("\n") == 3
    assert "cache hit" in runner.invoke(app, args).output
    bad = runner.invoke(app, [*args[:-2], "--top-p", "1.5"])
    assert bad.exit_code != 0 and "--top-p" in bad.output
