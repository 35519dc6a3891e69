from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from negalign_cli.assets import template_sets
from negalign_cli.compute.text import count_truncated, encode_texts, format_prompts
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.words import load_classes, load_negatives, load_templates, read_word_file
from negalign_cli.reporting import RecordingReporter
from negalign_cli.stages.text import embed_texts, text_embeddings

WORDS = ["waterbird", "landbird", "a rather long phrase with several words", "café", "x"]


def brute_force(model, tokenizer, words, templates, normalize_prompts=False):
    """One text at a time: average the prompt embeddings (each normalised first if asked), normalise."""
    rows = []
    with torch.no_grad():
        for word in words:
            prompt_vectors = []
            for template in templates:
                tokens = tokenizer([template.format(word)])
                vector = model.encode_text(tokens)[0].double()
                prompt_vectors.append(vector / vector.norm() if normalize_prompts else vector)
            mean = torch.stack(prompt_vectors).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("normalize_prompts", [False, True])
@pytest.mark.parametrize("template_set", ["noun", "adjective", "object", "background"])
def test_encode_texts_equals_per_template_loop(tiny_model, template_set, normalize_prompts):
    templates = template_sets()[template_set]
    expected = brute_force(tiny_model.model, tiny_model.tokenizer, WORDS, templates, normalize_prompts)
    got = encode_texts(
        tiny_model.model,
        tiny_model.tokenizer,
        WORDS,
        templates,
        batch_size=7,
        normalize_prompts=normalize_prompts,
    )
    assert got.dtype == torch.float32 and got.shape == (len(WORDS), tiny_model.embed_dim)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(WORDS)), atol=1e-6, rtol=0)


def test_batch_size_does_not_change_results(tiny_model):
    templates = template_sets()["noun"]
    a = encode_texts(tiny_model.model, tiny_model.tokenizer, WORDS, templates, batch_size=1)
    b = encode_texts(tiny_model.model, tiny_model.tokenizer, WORDS, templates, batch_size=4096)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_progress_callback_counts_words(tiny_model):
    seen = []
    encode_texts(
        tiny_model.model, tiny_model.tokenizer, WORDS, ["{}", "the {}"], batch_size=4, on_batch=seen.append
    )
    assert sum(seen) == len(WORDS) and len(seen) == 3


def test_format_prompts_and_truncation(tiny_model):
    assert format_prompts(["a", "b"], ["x {}", "{}!"]) == ["x a", "a!", "x b", "b!"]
    long_word = " ".join(["word"] * 100)
    assert count_truncated(tiny_model.tokenizer, ["short", long_word], tiny_model.context_length) == 1


def test_text_embeddings_cache(tiny_model, workspace):
    templates = load_templates("noun")
    first = text_embeddings(tiny_model, WORDS, templates, workspace)
    assert first.encoded == len(WORDS)
    second = text_embeddings(tiny_model, WORDS[::-1] + ["new word"], templates, workspace)
    assert second.encoded == 1
    np.testing.assert_array_equal(second.vectors[: len(WORDS)], first.vectors[::-1])
    fresh = encode_texts(tiny_model.model, tiny_model.tokenizer, WORDS, templates.templates).numpy()
    np.testing.assert_allclose(first.vectors, fresh, atol=1e-6)
    other = text_embeddings(tiny_model, WORDS, load_templates("object"), workspace)
    assert other.encoded == len(WORDS)  # another template set is another namespace


def test_embed_texts_stage(tiny_model, workspace, tmp_path):
    negatives_file = tmp_path / "neg.txt"
    negatives_file.write_text("ocean\nforest\n\nocean\ncar\n")
    reporter = RecordingReporter()
    negatives = load_negatives(negatives_file, reporter)
    assert negatives.words == ("ocean", "forest", "car")
    assert "duplicate" in reporter.text() and "blank" in reporter.text()
    classes = load_classes("waterbird")
    result = embed_texts(tiny_model, classes, load_templates("noun"), workspace, negatives=negatives)
    assert not result.hit
    class_vectors = np.load(result.artifact.file("class_embeddings.npy"))
    negative_vectors = np.load(result.artifact.file("negative_embeddings.npy"))
    assert class_vectors.shape == (2, 64) and negative_vectors.shape == (3, 64)
    assert result.artifact.file("classes.txt").read_text().split("\n")[:2] == ["waterbirds", "landbirds"]
    expected = F.normalize(
        brute_force(
            tiny_model.model, tiny_model.tokenizer, ["waterbirds", "landbirds"], template_sets()["noun"]
        ).float(),
        dim=1,
    )
    np.testing.assert_allclose(class_vectors, expected.numpy(), atol=1e-6)
    counts = result.artifact.manifest["counts"]
    assert counts == {
        "classes": 2,
        "negatives": 3,
        "encoded": 5,
        "from_item_cache": 0,
        "truncated_prompts": 0,
    }
    again = embed_texts(tiny_model, classes, load_templates("noun"), workspace, negatives=negatives)
    assert again.hit and again.artifact.key == result.artifact.key
    no_negatives = embed_texts(tiny_model, classes, load_templates("noun"), workspace)
    assert not no_negatives.hit and no_negatives.artifact.manifest["counts"]["encoded"] == 0


def test_class_inputs(tmp_path):
    assert len(load_classes("imagenet")) == 1000
    assert load_classes("waterbird").source == "preset:waterbird"
    with pytest.raises(NegalignError, match="unknown class preset 'imagenet2k'"):
        load_classes("imagenet2k")
    with pytest.raises(NegalignError, match="class file not found"):
        load_classes(str(tmp_path / "missing.txt"))
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\n cat \n")
    with pytest.raises(NegalignError, match="more than once: 'cat'"):
        load_classes(str(dup))
    blanks = tmp_path / "blank.txt"
    blanks.write_text("\ncat\n\n  dog  house \n")
    reporter = RecordingReporter()
    assert load_classes(str(blanks), reporter).words == ("cat", "dog house")
    assert "2 blank line" in reporter.text()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(NegalignError, match="no entries"):
        load_classes(str(empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"cat\ncaf\xe9\n")
    with pytest.raises(NegalignError, match="not UTF-8 text .*line 2"):
        read_word_file(latin)


def test_template_inputs(tmp_path):
    assert load_templates("noun").templates[0] == "a close-up photo of the nice {}."
    assert len(load_templates("noun").templates) == 8 and len(load_templates("adjective").templates) == 4
    custom = tmp_path / "t.txt"
    custom.write_text("a drawing of {}\n")
    assert load_templates(str(custom)).templates == ("a drawing of {}",)
    custom.write_text("a drawing\n")
    with pytest.raises(NegalignError, match="lack"):
        load_templates(str(custom))
    with pytest.raises(NegalignError, match="unknown template set"):
        load_templates("nouns")


def test_trimmed_token_encoding_is_exact(tiny_model):
    from negalign_cli.compute.text import encode_tokens

    prompts = ["a", "the nice waterbird", " ".join(["long"] * 30), "x y"]
    tokens = tiny_model.tokenizer(prompts)
    assert int((tokens != 0).sum(1).max()) < tokens.shape[1]  # there is padding to cut
    with torch.no_grad():
        full = tiny_model.model.encode_text(tokens)
        trimmed = encode_tokens(tiny_model.model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-6, rtol=0)


def test_bundled_negative_lists():
    nouns = load_negatives("negrefine-imagenet-noun")
    adjectives = load_negatives("negrefine-imagenet-adj")
    assert (len(nouns), len(adjectives)) == (4998, 1372)
    assert nouns.source == "preset:negrefine-imagenet-noun" and nouns.words[0] == "external carotid artery"
