"""Runs one stage in its own process, for the store's crash and concurrency tests.

usage: store_worker.py ROOT MODE MARKER_DIR
  MODE=slow   compute writes half a file, touches MARKER_DIR/started, sleeps (to be killed)
  MODE=count  compute sleeps a little, appends a line to MARKER_DIR/computed, writes the output
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from negalign_cli.cache.store import ArtifactStore, StageSpec

SPEC = StageSpec("demo", 1, {"n": 3, "names": ["a", "b"], "tau": 0.05}, {"input": "abc"})


def main() -> None:
    root, mode, marker_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def compute(folder: Path):
        if mode == "slow":
            with open(folder / "data.bin", "wb") as handle:
                handle.write(b"x" * 1000)
                handle.flush()
                (marker_dir / "started").touch()
                time.sleep(60)
        else:
            time.sleep(0.5)
            with open(marker_dir / "computed", "a") as handle:
                handle.write("1\n")
            (folder / "data.bin").write_bytes(b"y" * 1000)
        return {"counts": {"n": 1}}

    result = ArtifactStore(root).run(SPEC, compute)
    print("HIT" if result.hit else "COMPUTED", result.artifact.key)


if __name__ == "__main__":
    main()
