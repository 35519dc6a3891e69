"""The WordNet lexicon NegLabel mines negatives from: one word list per lexicographer file.

``read_wordnet`` rebuilds NegLabel's ``txtfiles/`` from WordNet 3.0's ``data.noun`` and
``data.adj``: the first (head) lemma of every synset, grouped by lexicographer file, lower-cased,
``_`` read as a space, adjective markers such as ``(a)`` removed, de-duplicated within a file in
the order the data file lists them. ``scripts/build_lexicon.py`` writes the package copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from negalign_cli.assets import asset_path
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import sha256_lines

# WordNet's fixed table of lexicographer files (lexnames(5WN)): number -> name.
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
# NegLabel's txtfiles/ hold these; it has no noun.animal or noun.food (ImageNet's own domains).
NEGLABEL_FILES = tuple(
    name
    for name in LEXNAMES
    if (name.startswith("noun.") or name.startswith("adj.")) and name not in ("noun.animal", "noun.food")
)
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def read_wordnet(wordnet_dir: str | Path) -> dict[str, list[str]]:
    """Head lemmas of every noun and adjective synset, per lexicographer file."""
    folder = Path(wordnet_dir)
    files: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for pos in ("noun", "adj"):
        path = folder / f"data.{pos}"
        if not path.is_file():
            raise NegalignError(f"WordNet data file not found: {path} (Debian: apt-get install wordnet-base)")
        with open(path, encoding="latin-1") as handle:
            for line in handle:
                if line.startswith("  "):  # licence header
                    continue
                fields = line.split(" ", 5)
                name = LEXNAMES[int(fields[1])]
                word = _ADJ_MARKER.sub("", fields[4]).replace("_", " ").lower()
                bucket = seen.setdefault(name, set())
                if word not in bucket:
                    bucket.add(word)
                    files.setdefault(name, []).append(word)
    return files


@dataclass(frozen=True)
class Lexicon:
    """Word lists by lexicographer file name (``noun.artifact``, ``adj.all``, ...)."""

    source: str
    files: Mapping[str, tuple[str, ...]]

    @property
    def digest(self) -> str:
        lines = []
        for name in sorted(self.files):
            lines.append(f"## {name}")
            lines.extend(self.files[name])
        return sha256_lines(lines)

    def __len__(self) -> int:
        return sum(len(words) for words in self.files.values())


def bundled_lexicon_dir() -> Path:
    return asset_path("lexicon")


def load_lexicon(folder: str | Path | None = None) -> Lexicon:
    """A folder of ``<lexname>.txt`` files (NegLabel's ``txtfiles/`` or the bundled copy).

    Only files named ``noun.*.txt`` or ``adj.*.txt`` are read (UTF-8, a BOM ignored); ``_`` is
    read as a space, runs of spaces as one, lines are stripped, blank lines skipped.
    """
    path = Path(folder).expanduser() if folder is not None else bundled_lexicon_dir()
    if not path.is_dir():
        raise NegalignError(f"lexicon folder not found: {path}")
    files: dict[str, tuple[str, ...]] = {}
    for file in sorted(path.glob("*.txt")):
        name = file.name[: -len(".txt")]
        if not name.startswith(("noun.", "adj.")):
            continue
        try:
            text = file.read_text(encoding="utf-8-sig")  # a BOM is not part of the first word
        except UnicodeDecodeError as exc:
            raise NegalignError(f"lexicon file {file} is not UTF-8 text") from exc
        # spaces collapsed as in every other word list, so "sea  horse" is the class "sea horse"
        words = tuple(
            w for w in (" ".join(line.replace("_", " ").split()) for line in text.splitlines()) if w
        )
        files[name] = words
    if not files:
        raise NegalignError(f"lexicon folder {path} holds no noun.*.txt or adj.*.txt files")
    return Lexicon("bundled WordNet 3.0" if folder is None else str(path), files)
