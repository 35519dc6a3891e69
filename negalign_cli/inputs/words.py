"""Reading the user's word lists: class presets or files, negative-label files, template sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from negalign_cli.assets import class_presets, negative_presets, template_sets
from negalign_cli.defaults import PLACEHOLDER
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import sha256_lines
from negalign_cli.reporting import NullReporter, Reporter


@dataclass(frozen=True)
class WordList:
    """An ordered, duplicate-free list of words and where it came from."""

    source: str  # "preset:NAME" or a file path
    words: tuple[str, ...]
    blank_lines: int = 0
    duplicates: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return sha256_lines(self.words)

    def __len__(self) -> int:
        return len(self.words)


def read_word_file(path: str | Path, what: str = "word list") -> WordList:
    """One entry per line; surrounding spaces stripped; blank lines skipped; duplicates counted
    and dropped (first occurrence kept). Errors are one line and name the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NegalignError(f"{what} file not found: {path}")
    if not path.is_file():
        raise NegalignError(f"{what} path is not a file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        number = raw[: exc.start].count(b"\n") + 1
        raise NegalignError(f"{what} file {path} is not UTF-8 text (bad byte at line {number})") from exc
    words: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    blank = 0
    for line in text.splitlines():
        word = " ".join(line.split())
        if not word:
            blank += 1
        elif word in seen:
            duplicates.append(word)
        else:
            seen.add(word)
            words.append(word)
    if not words:
        raise NegalignError(f"{what} file {path} holds no entries")
    return WordList(str(path), tuple(words), blank, tuple(duplicates))


def load_classes(spec: str, reporter: Reporter | None = None) -> WordList:
    """A preset name (``imagenet``, ``waterbird``, ...) or a text file with one class a line.

    A class file with duplicate names is an error (class indices would be ambiguous); blank lines
    are skipped with a warning.
    """
    reporter = reporter or NullReporter()
    presets = class_presets()
    if spec in presets:
        return WordList(f"preset:{spec}", presets[spec])
    candidate = Path(spec).expanduser()
    if not candidate.exists() and "/" not in spec and "." not in spec:
        raise NegalignError(
            f"unknown class preset {spec!r} and no such file; presets: {', '.join(sorted(presets))}"
        )
    classes = read_word_file(candidate, "class")
    if classes.duplicates:
        shown = ", ".join(repr(d) for d in dict.fromkeys(classes.duplicates))
        raise NegalignError(f"class file {candidate} lists a class more than once: {shown}")
    if classes.blank_lines:
        reporter.warn(f"class file {candidate}: skipped {classes.blank_lines} blank line(s)")
    return classes


def load_negatives(path: str | Path, reporter: Reporter | None = None) -> WordList:
    """A negative-label file or a bundled list (``negrefine-imagenet-noun``, ``negrefine-imagenet-adj``);
    duplicates are reported and dropped, blank lines skipped."""
    reporter = reporter or NullReporter()
    presets = negative_presets()
    if str(path) in presets:
        listed = read_word_file(presets[str(path)], "negatives")
        return WordList(f"preset:{path}", listed.words)
    if not Path(path).expanduser().exists() and "/" not in str(path) and "." not in str(path):
        raise NegalignError(
            f"unknown bundled negative list {str(path)!r} and no such file; bundled lists: "
            f"{', '.join(sorted(presets))}"
        )
    negatives = read_word_file(path, "negatives")
    if negatives.duplicates:
        reporter.warn(
            f"{path}: dropped {len(negatives.duplicates)} duplicate entr(y/ies), kept the first of each"
        )
    if negatives.blank_lines:
        reporter.warn(f"{path}: skipped {negatives.blank_lines} blank line(s)")
    return negatives


@dataclass(frozen=True)
class TemplateSet:
    name: str
    templates: tuple[str, ...]

    @property
    def digest(self) -> str:
        """What cache keys and manifests record of the prompts (the templates, not the set's name)."""
        return sha256_lines(self.templates)


def load_templates(spec: str) -> TemplateSet:
    """A named template set (``noun``, ``adjective``, ``object``, ``background``, ``bare``) or a file
    with one template a line, each containing ``{}`` where the word goes."""
    sets = template_sets()
    if spec in sets:
        return TemplateSet(spec, sets[spec])
    candidate = Path(spec).expanduser()
    if not candidate.exists() and "/" not in spec and "." not in spec:
        raise NegalignError(
            f"unknown template set {spec!r} and no such file; sets: {', '.join(sorted(sets))}"
        )
    listed = read_word_file(candidate, "template")
    bad = [t for t in listed.words if PLACEHOLDER not in t]
    if bad:
        raise NegalignError(f"template file {candidate}: {len(bad)} template(s) lack '{{}}', e.g. {bad[0]!r}")
    return TemplateSet(str(candidate), listed.words)
