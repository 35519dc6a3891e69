"""Negative vocabulary stages: ``mine-negatives`` and ``split-vocab``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from negalign_cli.assets import csp_suffixes
from negalign_cli.cache.statcache import StatCache
from negalign_cli.cache.store import MANIFEST, Artifact, StageResult, StageSpec, verify_folder
from negalign_cli.cache.workspace import Workspace
from negalign_cli.defaults import (
    DEFAULT_EXCLUDE,
    DEFAULT_TAU,
    ROLE_AMBIGUOUS,
    ROLE_BACKGROUND,
    ROLE_OBJECT,
    ROLES,
)
from negalign_cli.errors import NegalignError
from negalign_cli.inputs.lexicon import Lexicon
from negalign_cli.inputs.words import TemplateSet, WordList, load_templates
from negalign_cli.reporting import NullReporter, Reporter
from negalign_cli.stages import files
from negalign_cli.stages.text import text_embeddings

if TYPE_CHECKING:  # a stage gets a modelref.LazyModel (built on first use) or a models.LoadedModel
    import torch

    from negalign_cli.modelref import AnyModel

# torch and the torch-side compute modules (compute/text.py, compute/vocab.py) are imported inside
# the compute steps, which the store runs only on a miss: a cache hit imports no torch.

MINE_STAGE, MINE_VERSION = "mine-negatives", 1
SCORES_STAGE, SCORES_VERSION = "split-scores", 2  # 2: r_scores.parquet (was scores.parquet)
SPLIT_STAGE, SPLIT_VERSION = "split-vocab", 1
ROLE_FILES = {
    ROLE_OBJECT: files.NEG_OBJECT,
    ROLE_BACKGROUND: files.NEG_BACKGROUND,
    ROLE_AMBIGUOUS: files.NEG_AMBIGUOUS,
}


def _write_lines(path, lines: Sequence[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


# ----------------------------------------------------------------------------- mining
def mine_negatives(
    model: AnyModel,
    classes: WordList,
    lexicon: Lexicon,
    workspace: Workspace,
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    top_p: float = 0.15,
    quantile: float = 1.0,
    saturate_above: float = 0.95,
    seed: int = 0,
    noun_templates: TemplateSet | None = None,
    adjective_templates: TemplateSet | None = None,
    suffixes: Sequence[str] | None = None,
    batch_size: int = 1024,
    reporter: Reporter | None = None,
) -> StageResult:
    """NegLabel's negative mining in its CSP form (NegRefine's ``create_initial_negative_labels``):
    keep the ``top_p`` share of nouns and of adjective phrases least similar to the ID classes."""
    reporter = reporter or NullReporter()
    if not 0 < top_p <= 1:
        raise NegalignError(f"--top-p must be in (0, 1], got {top_p}")
    if not 0 <= quantile <= 1:
        raise NegalignError(f"--quantile must be in [0, 1], got {quantile}")
    unknown = sorted(set(exclude) - set(lexicon.files))
    if unknown:
        reporter.warn(f"--exclude names files the lexicon does not have: {', '.join(unknown)}")
    noun_templates = noun_templates or load_templates("noun")
    adjective_templates = adjective_templates or load_templates("adjective")
    suffixes = list(suffixes or csp_suffixes())
    params = {
        "exclude": sorted(exclude),
        "top_p": top_p,
        "quantile": quantile,
        "saturate_above": saturate_above,
        "seed": seed,
        "noun_templates": list(noun_templates.templates),
        "adjective_templates": list(adjective_templates.templates),
        "suffixes": suffixes,
        "precision": model.precision,
    }
    inputs = {"model": model.fingerprint, "classes": classes.digest, "lexicon": lexicon.digest}
    spec = StageSpec(MINE_STAGE, MINE_VERSION, params, inputs)

    def compute(folder):
        import torch

        from negalign_cli.compute.vocab import build_candidates

        candidates = build_candidates(lexicon.files, classes.words, exclude, suffixes, seed)
        if not candidates.nouns and not candidates.phrases:
            raise NegalignError("the lexicon leaves no candidate words after exclusions")

        def embed(words, templates, label="words"):
            return torch.from_numpy(
                text_embeddings(
                    model, words, templates, workspace, batch_size=batch_size, reporter=reporter, label=label
                ).vectors
            )

        class_features = embed(list(classes.words), noun_templates, "classes")
        frames, kept_lists = [], {}
        for kind, words, sources, templates in (
            ("noun", candidates.nouns, candidates.noun_sources, noun_templates),
            ("adj", candidates.phrases, candidates.adjective_sources, adjective_templates),
        ):
            frame = _rank_candidates(
                kind, words, sources, embed, templates, class_features, quantile, saturate_above, top_p
            )
            frames.append(frame)
            kept = frame[frame["kept"]].sort_values("rank")
            kept_lists[kind] = kept["word"].tolist()
        _write_lines(folder / files.NEG_LABELS_NOUN, kept_lists["noun"])
        _write_lines(folder / files.NEG_LABELS_ADJ, kept_lists["adj"])
        pd.concat([f for f in frames if len(f)], ignore_index=True).to_csv(
            folder / files.MINING_SCORES, index=False, float_format="%.8f"
        )
        return {
            "counts": {
                "candidate_nouns": len(candidates.nouns),
                "candidate_adjectives": len(candidates.phrases),
                "kept_nouns": len(kept_lists["noun"]),
                "kept_adjectives": len(kept_lists["adj"]),
                "dropped_as_class_name": candidates.dropped_as_class,
                "duplicates_across_files": candidates.duplicates,
            },
            "sources": {"classes": classes.source, "lexicon": lexicon.source},
            "model": model.describe(),
        }

    return workspace.store.run(spec, compute, reporter)


def _rank_candidates(
    kind: str,
    words: Sequence[str],
    sources: Sequence[str],
    embed,
    templates: TemplateSet,
    class_features: torch.Tensor,
    quantile: float,
    saturate_above: float,
    top_p: float,
) -> pd.DataFrame:
    """mining_scores.csv rows of one kind: each candidate's similarity to the ID classes, whether
    it is kept (the ``top_p`` least similar) and its rank among the kept."""
    if not words:
        return pd.DataFrame(columns=["word", "kind", "source", "similarity", "kept", "rank"])
    from negalign_cli.compute.vocab import class_similarity, least_similar

    label = f"candidate {'nouns' if kind == 'noun' else 'adjectives'}"
    similarity = class_similarity(
        embed(list(words), templates, label), class_features, quantile, saturate_above
    )
    keep = least_similar(similarity, top_p).numpy()
    rank = np.full(len(words), -1)
    rank[keep] = np.arange(len(keep))
    return pd.DataFrame(
        {
            "word": list(words),
            "kind": kind,
            "source": list(sources),
            "similarity": similarity.numpy().astype(np.float64),
            "kept": rank >= 0,
            "rank": rank,
        }
    )


# ----------------------------------------------------------------------------- split
@dataclass(frozen=True)
class VocabEntry:
    words: WordList
    source: str  # "noun" or "adj"


def split_scores(
    model: AnyModel,
    entries: Sequence[VocabEntry],
    workspace: Workspace,
    *,
    object_templates: TemplateSet | None = None,
    background_templates: TemplateSet | None = None,
    batch_size: int = 1024,
    reporter: Reporter | None = None,
) -> StageResult:
    """r-scores of every entry (no threshold): ``scores.parquet`` (word, source, r_score,
    obj_affinity, bg_affinity). Separate from thresholding so that a new tau costs nothing."""
    reporter = reporter or NullReporter()
    if not entries:
        raise NegalignError("split-vocab needs --nouns, --adjs or both")
    bare = load_templates("bare")
    object_templates = object_templates or load_templates("object")
    background_templates = background_templates or load_templates("background")
    params = {
        "bare_templates": list(bare.templates),
        "object_templates": list(object_templates.templates),
        "background_templates": list(background_templates.templates),
        "precision": model.precision,
    }
    inputs = {"model": model.fingerprint, **{f"{e.source}s": e.words.digest for e in entries}}
    spec = StageSpec(SCORES_STAGE, SCORES_VERSION, params, inputs)

    def compute(folder):
        from negalign_cli.compute.text import count_truncated, format_prompts
        from negalign_cli.compute.vocab import role_scores

        words = [w for e in entries for w in e.words.words]
        sources = [e.source for e in entries for _ in e.words.words]
        vectors = [
            text_embeddings(
                model, words, t, workspace, batch_size=batch_size, reporter=reporter, label="vocabulary"
            ).vectors
            for t in (bare, object_templates, background_templates)
        ]
        r, obj, bg = role_scores(*vectors)
        frame = pd.DataFrame(
            {"word": words, "source": sources, "r_score": r, "obj_affinity": obj, "bg_affinity": bg}
        )
        frame.to_parquet(folder / files.R_SCORES, index=False)
        unique = list(dict.fromkeys(words))
        truncated = sum(
            count_truncated(model.tokenizer, format_prompts(unique, t.templates), model.context_length)
            for t in (bare, object_templates, background_templates)
        )
        return {
            "counts": {"entries": len(words), "truncated_prompts": truncated},
            "sources": {e.source: e.words.source for e in entries},
            "model": model.describe(),
        }

    return workspace.store.run(spec, compute, reporter)


def split_vocab(
    scores: Artifact, workspace: Workspace, *, tau: float = DEFAULT_TAU, reporter: Reporter | None = None
) -> StageResult:
    """Threshold stored r-scores at ±tau into ``neg_obj.txt``, ``neg_bg.txt``, ``neg_ambiguous.txt``
    and ``split_scores.csv``."""
    if tau < 0:
        raise NegalignError(
            f"--tau must be ≥ 0 (got {tau}): words with r ≥ tau are objects, r ≤ −tau backgrounds"
        )
    inputs = {"scores": scores.key}
    scored_by = scores.manifest.get("inputs", {}).get("model")
    if scored_by:  # recorded in the split's manifest: `score` and the API refuse it for another model
        inputs["model"] = scored_by
    spec = StageSpec(SPLIT_STAGE, SPLIT_VERSION, {"tau": tau}, inputs)

    def compute(folder):
        from negalign_cli.compute.vocab import assign_roles

        frame = pd.read_parquet(scores.file(files.R_SCORES))
        frame["role"] = assign_roles(frame["r_score"].to_numpy(), tau)
        frame.to_csv(folder / files.SPLIT_SCORES, index=False, float_format="%.8f")
        counts = {}
        for role in ROLES:
            chosen = frame[frame["role"] == role]
            _write_lines(folder / ROLE_FILES[role], chosen["word"].tolist())
            counts[role] = len(chosen)
        return {"counts": counts, "scores_artifact": scores.key}

    return workspace.store.run(spec, compute, reporter)


@dataclass(frozen=True)
class SplitSummary:
    table: pd.DataFrame  # rows: source (+ "all"); columns: count and share per role
    most_object: pd.DataFrame
    most_background: pd.DataFrame


def summarise_split(split: Artifact, top: int = 10) -> SplitSummary:
    frame = pd.read_csv(split.file(files.SPLIT_SCORES), keep_default_na=False)
    rows = []
    for source, group in [*frame.groupby("source", sort=False), ("all", frame)]:
        row = {"source": source, "total": len(group)}
        for role in ROLES:
            n = int((group["role"] == role).sum())
            row[role] = n
            row[f"{role}_pct"] = 100.0 * n / max(len(group), 1)
        rows.append(row)
    ordered = frame.sort_values("r_score", kind="stable")
    columns = ["word", "source", "r_score"]
    return SplitSummary(
        pd.DataFrame(rows),
        ordered[::-1].head(top)[columns].reset_index(drop=True),
        ordered.head(top)[columns],
    )


# ----------------------------------------------------------------------------- negatives for scoring
@dataclass(frozen=True)
class NegativeVocab:
    """Negative labels in scoring order (nouns, then adjective phrases), with roles if split."""

    words: tuple[str, ...]
    sources: tuple[str, ...]  # "noun" or "adj"
    roles: tuple[str, ...] | None
    origin: str
    model: str | None = None  # fingerprint of the model whose r-scores gave the roles (a split's manifest)

    @property
    def digest(self) -> str:
        from negalign_cli.hashing import sha256_json

        return sha256_json({"words": self.words, "sources": self.sources, "roles": self.roles})

    def indices(self, *roles: str) -> np.ndarray:
        if self.roles is None:
            raise NegalignError(
                "this needs negative roles: pass --negatives-split DIR (a split-vocab output)"
            )
        return np.flatnonzero(np.isin(np.array(self.roles), list(roles))).astype(np.int64)


def negatives_from_split(folder, stat_cache: StatCache | None = None) -> NegativeVocab:
    """Read a ``split-vocab`` output folder (``split_scores.csv``) and, from its manifest.json, the
    model that scored it. A manifest that does not vouch for ``split_scores.csv`` is refused; a folder
    without one (a hand-made split) has no recorded model. ``stat_cache``: an unchanged file is not
    read to be checked."""
    from pathlib import Path

    path = Path(folder).expanduser() / files.SPLIT_SCORES
    if not path.is_file():
        raise NegalignError(f"{path} not found: --negatives-split takes a split-vocab --out folder")
    scored_by = None
    if (path.parent / MANIFEST).exists():
        manifest, reason = verify_folder(path.parent, [files.SPLIT_SCORES], stat_cache)
        if manifest is None:
            raise NegalignError(
                f"{path.parent} does not match its manifest.json ({reason}): the split was edited, cut "
                "short or left by another command; rerun `negalign split-vocab --out` (a hand-edited "
                "split without manifest.json is read as it is, but its model cannot be checked)"
            )
        scored_by = manifest.get("inputs", {}).get("model")
    frame = pd.read_csv(path, keep_default_na=False, dtype={"word": str, "source": str, "role": str})
    missing = {"word", "source", "role"} - set(frame.columns)
    if missing:
        raise NegalignError(f"{path} lacks column(s) {', '.join(sorted(missing))}")
    bad = sorted(set(frame["source"]) - {"noun", "adj"}) + sorted(set(frame["role"]) - set(ROLES))
    if bad:
        raise NegalignError(f"{path} has unknown source/role values: {', '.join(bad)}")
    frame = pd.concat([frame[frame["source"] == "noun"], frame[frame["source"] == "adj"]])
    return NegativeVocab(
        tuple(frame["word"]),
        tuple(frame["source"]),
        tuple(frame["role"]),
        f"split {path.parent}",
        scored_by if isinstance(scored_by, str) else None,
    )


def check_split_model(vocab: NegativeVocab, model: AnyModel, reporter: Reporter | None = None) -> None:
    """Roles come from one model's r-scores: a split scored by another model is refused (its
    object/background roles would be another model's). With a ``reporter``, a split that records no
    model (hand-made, or made by an older negalign) is named in a warning."""
    if vocab.roles is None:
        return
    if vocab.model is not None and vocab.model != model.fingerprint:
        raise NegalignError(
            f"the negatives {vocab.origin} were scored by model {vocab.model[:16]}, not by "
            f"{model.describe()}: its object/background roles are another model's. Rerun "
            "`negalign split-vocab` with this --model/--pretrained, or score with the split's model"
        )
    if vocab.model is None and reporter is not None:
        reporter.warn(
            f"the negatives {vocab.origin} do not record the model that scored them (no manifest.json, "
            "or an older negalign): their roles cannot be checked against this model"
        )


def negatives_from_lists(nouns: WordList | None, adjs: WordList | None) -> NegativeVocab:
    words: list[str] = []
    sources: list[str] = []
    for listed, source in ((nouns, "noun"), (adjs, "adj")):
        if listed is not None:
            words.extend(listed.words)
            sources.extend([source] * len(listed))
    if not words:
        raise NegalignError("no negatives: pass --negatives-split DIR, or --nouns and/or --adjs")
    origin = " + ".join(w.source for w in (nouns, adjs) if w is not None)
    return NegativeVocab(tuple(words), tuple(sources), None, origin)


def negative_features(
    model: AnyModel,
    vocab: NegativeVocab,
    workspace: Workspace,
    *,
    noun_templates: TemplateSet | None = None,
    adjective_templates: TemplateSet | None = None,
    batch_size: int = 1024,
    reporter: Reporter | None = None,
) -> np.ndarray:
    """Text features of the negatives in vocab order: nouns with the noun templates, adjective
    phrases with the adjective templates (NegLabel/NegRefine)."""
    check_split_model(vocab, model)  # the API and every other caller: roles of another model are refused
    noun_templates = noun_templates or load_templates("noun")
    adjective_templates = adjective_templates or load_templates("adjective")
    sources = np.array(vocab.sources)
    features = np.zeros((len(vocab.words), model.embed_dim), dtype=np.float32)
    for source, templates in (("noun", noun_templates), ("adj", adjective_templates)):
        rows = np.flatnonzero(sources == source)
        if rows.size:
            words = [vocab.words[i] for i in rows]
            features[rows] = text_embeddings(
                model,
                words,
                templates,
                workspace,
                batch_size=batch_size,
                reporter=reporter,
                label="negatives",
            ).vectors
    return features
