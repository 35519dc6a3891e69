"""Text embeddings: per-word cache (``text_embeddings``) and the ``embed texts`` stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from negalign_cli.cache.items import Namespace
from negalign_cli.cache.store import StageResult, StageSpec
from negalign_cli.cache.workspace import Workspace
from negalign_cli.inputs.words import TemplateSet, WordList
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files

if TYPE_CHECKING:  # a stage gets a modelref.LazyModel (built on first use) or a models.LoadedModel
    from negalign_cli.modelref import AnyModel

TEXT_ITEMS_VERSION = 2  # 2: raw prompt embeddings averaged (NegLabel recipe)
EMBED_TEXTS_STAGE = "embed-texts"
EMBED_TEXTS_VERSION = 2


@dataclass(frozen=True)
class TextEmbeddings:
    vectors: np.ndarray  # (n, D) float32, L2-normalised
    encoded: int  # words encoded now (the rest came from the cache)
    truncated: int  # prompts longer than the context, among those encoded now


def text_embeddings(
    model: AnyModel,
    words: Sequence[str],
    templates: TemplateSet,
    workspace: Workspace,
    *,
    batch_size: int = 1024,
    reporter: Reporter | None = None,
    label: str = "words",
) -> TextEmbeddings:
    """Embeddings of ``words`` under ``templates``; only words not cached for this model,
    precision and template set are encoded. ``label`` names the words in the progress bar
    (``classes imagenet``, ``negatives``)."""
    reporter = reporter or NullReporter()
    namespace = workspace.items.namespace(
        "text",
        model.fingerprint,
        {"templates": list(templates.templates), "precision": model.precision, "version": TEXT_ITEMS_VERSION},
        dim=model.embed_dim,
        dtype="float32",
    )
    with workspace.items.lease(namespace):
        return _fill_texts(model, words, templates, namespace, batch_size, reporter, label)


def _fill_texts(
    model: AnyModel,
    words: Sequence[str],
    templates: TemplateSet,
    namespace: Namespace,
    batch_size: int,
    reporter: Reporter,
    label: str = "words",
) -> TextEmbeddings:
    vectors, found = namespace.get_many(words)
    if namespace.corrupt:
        reporter.warn(f"{namespace.corrupt} cached text vector(s) failed their checksum; recomputing them")
    missing_rows = np.flatnonzero(~found)
    missing = list(dict.fromkeys(words[int(i)] for i in missing_rows))
    truncated = 0
    if missing:  # the torch side only when something is encoded: a hit imports no torch
        from negalign_cli.compute.text import count_truncated, encode_texts, format_prompts

        truncated = count_truncated(
            model.tokenizer, format_prompts(missing, templates.templates), model.context_length
        )
        # one forward batch of prompts at a time, each stored as soon as it is done: an
        # interrupted run keeps every finished word
        step = max(1, batch_size // max(1, len(templates.templates)))
        parts = []
        with reporter.progress(
            f"embedding texts: {label} "
            f"({len(missing)} × {len(templates.templates)} {templates.name} templates)",
            len(missing),
        ) as advance:
            for start in range(0, len(missing), step):
                chunk = missing[start : start + step]
                part = encode_texts(
                    model.model, model.tokenizer, chunk, templates.templates, batch_size=batch_size
                ).numpy()
                namespace.put_many(chunk, part)
                parts.append(part)
                advance(len(chunk))
        encoded = np.concatenate(parts)
        position = {word: row for row, word in enumerate(missing)}
        vectors[missing_rows] = encoded[[position[words[int(i)]] for i in missing_rows]]
    return TextEmbeddings(vectors, len(missing), truncated)


def embed_texts(
    model: AnyModel,
    classes: WordList,
    templates: TemplateSet,
    workspace: Workspace,
    *,
    negatives: WordList | None = None,
    negative_templates: TemplateSet | None = None,
    batch_size: int = 1024,
    reporter: Reporter | None = None,
) -> StageResult:
    """The ``embed texts`` stage: ``class_embeddings.npy`` + ``classes.txt`` (and
    ``negative_embeddings.npy`` + ``negatives.txt`` when negatives are given)."""
    reporter = reporter or NullReporter()
    negative_templates = negative_templates or templates
    params = {
        "model": model.name,
        "precision": model.precision,
        "templates": list(templates.templates),
        "negative_templates": list(negative_templates.templates) if negatives is not None else None,
    }
    inputs = {"model": model.fingerprint, "classes": classes.digest}
    if negatives is not None:
        inputs["negatives"] = negatives.digest
    spec = StageSpec(EMBED_TEXTS_STAGE, EMBED_TEXTS_VERSION, params, inputs)

    def compute(folder):
        counts = {"classes": len(classes)}
        encoded = truncated = 0
        groups = [("class", classes, templates)]
        if negatives is not None:
            groups.append(("negative", negatives, negative_templates))
        for name, words, group_templates in groups:
            result = text_embeddings(
                model,
                words.words,
                group_templates,
                workspace,
                batch_size=batch_size,
                reporter=reporter,
                label=f"{'classes' if name == 'class' else 'negatives'} {list_name(words.source)}",
            )
            vectors, listing = (
                (files.CLASS_EMBEDDINGS, files.CLASS_LIST)
                if name == "class"
                else (files.NEGATIVE_EMBEDDINGS, files.NEGATIVE_LIST)
            )
            np.save(folder / vectors, result.vectors)
            (folder / listing).write_text("\n".join(words.words) + "\n", encoding="utf-8")
            encoded += result.encoded
            truncated += result.truncated
        if negatives is not None:
            counts["negatives"] = len(negatives)
        counts["encoded"] = encoded
        counts["from_item_cache"] = len(classes) + (len(negatives) if negatives else 0) - encoded
        counts["truncated_prompts"] = truncated
        return {"counts": counts, "model": model.describe(), "sources": _sources(classes, negatives)}

    return workspace.store.run(spec, compute, reporter)


def list_name(source: str) -> str:
    """A word list's short name: ``preset:imagenet`` -> ``imagenet``, ``/x/cls.txt`` -> ``cls.txt``."""
    return source.removeprefix("preset:").rstrip("/").rsplit("/", 1)[-1] or source


def _sources(classes: WordList, negatives: WordList | None) -> dict[str, str]:
    sources = {"classes": classes.source}
    if negatives is not None:
        sources["negatives"] = negatives.source
    return sources
