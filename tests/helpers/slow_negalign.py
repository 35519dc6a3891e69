"""`negalign` with slow batches, for the fault suite's interruption tests.

usage: python slow_negalign.py MARKER_DIR negalign-args...

Every image batch (embedding or Grad-CAM) and every text batch sleeps 0.15 s and then touches
MARKER_DIR/batch-<n>, so a test can send a signal after a chosen number of finished batches. With
MARKER_DIR/hold-at holding N, the run waits after batch N until the signal comes: on a loaded
machine the test could otherwise be scheduled after the run had finished its last batches.
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
from pathlib import Path

import negalign_cli.compute.text as text
import negalign_cli.compute.vision as vision

MARKERS = Path(sys.argv[1])
COUNTER = itertools.count(1)


HOLD = MARKERS / "hold-at"
HOLD_AT = int(HOLD.read_text()) if HOLD.exists() else None


def slow(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        time.sleep(0.15)
        batch = next(COUNTER)
        (MARKERS / f"batch-{batch}").touch()
        if batch == HOLD_AT:
            time.sleep(120)  # the test's signal ends this wait (or the test's own timeout fails it)
        return result

    return wrapper


# the stages import these from their compute modules when a batch runs (never at planning time)
vision.encode_images = slow(vision.encode_images)
vision.cam_batch = slow(vision.cam_batch)
text.encode_texts = slow(text.encode_texts)

if __name__ == "__main__":
    import signal

    # a shell without job control starts background jobs with SIGINT ignored, and children inherit
    # that: Ctrl-C must reach this run however the test suite was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from negalign_cli.cli.app import main

    sys.argv = ["negalign", *sys.argv[2:]]
    main()
