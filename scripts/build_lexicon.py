#!/usr/bin/env python3
"""Regenerate negalign_cli/assets/lexicon/ from WordNet 3.0 and compare it with a reference copy.

usage: scripts/build_lexicon.py [--wordnet /usr/share/wordnet] [--out DIR] [--compare DIR] [--all]

WordNet 3.0 comes from Debian's `wordnet-base` package (apt-get install wordnet-base). `--compare`
prints, per file, how many of the reference's entries the rebuilt file holds (e.g. against
NegLabel's own txtfiles/). `--all` also writes noun.animal and noun.food, which NegLabel's
lexicon does not have.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from negalign_cli.inputs.lexicon import NEGLABEL_FILES, bundled_lexicon_dir, read_wordnet


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wordnet", default="/usr/share/wordnet")
    parser.add_argument("--out", default=str(bundled_lexicon_dir()))
    parser.add_argument("--compare", default=None)
    parser.add_argument("--all", action="store_true")
    args = parser.parse_args()

    files = read_wordnet(args.wordnet)
    names = [n for n in files if args.all or n in NEGLABEL_FILES]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
        (out / f"{name}.txt").write_text("\n".join(files[name]) + "\n", encoding="utf-8")
    print(f"wrote {len(names)} files, {sum(len(files[n]) for n in names)} words, to {out}")

    if args.compare:
        total_ref = total_common = total_mine = 0
        print(f"{'file':22s} {'reference':>9s} {'rebuilt':>8s} {'common':>7s} {'of ref':>7s}")
        for ref_file in sorted(Path(args.compare).glob("*.txt")):
            name = ref_file.stem
            if name not in files:
                continue
            reference = {
                line.strip() for line in ref_file.read_text(encoding="utf-8").splitlines() if line.strip()
            }
            mine = set(files[name])
            common = len(reference & mine)
            total_ref, total_common, total_mine = (
                total_ref + len(reference),
                total_common + common,
                total_mine + len(mine),
            )
            print(f"{name:22s} {len(reference):9d} {len(mine):8d} {common:7d} {common / len(reference):7.2%}")
        print(
            f"{'total':22s} {total_ref:9d} {total_mine:8d} {total_common:7d} {total_common / total_ref:7.2%}"
        )


if __name__ == "__main__":
    main()
