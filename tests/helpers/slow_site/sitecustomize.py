"""Slow image batches in every Python process started with this folder on PYTHONPATH and
NEGALIGN_TEST_MARKERS set: each batch (embedding or Grad-CAM) sleeps NEGALIGN_TEST_BATCH_DELAY
seconds (default 1) and then touches MARKERS/task<SLURM_ARRAY_TASK_ID>-<pid>-<n>. SLURM passes the
environment on to a job array's tasks, so a test can requeue or cancel one task after its first
stored batch (tests/test_launch_slurm.py)."""

from __future__ import annotations

import os

MARKERS = os.environ.get("NEGALIGN_TEST_MARKERS")

if MARKERS:
    import functools
    import importlib.abc
    import importlib.util
    import itertools
    import sys
    import time
    from pathlib import Path

    TARGET = "negalign_cli.compute.vision"  # the stages import its functions when a batch runs
    DELAY = float(os.environ.get("NEGALIGN_TEST_BATCH_DELAY", "1"))
    COUNTER = itertools.count(1)

    def _slow(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            time.sleep(DELAY)
            task = os.environ.get("SLURM_ARRAY_TASK_ID", "x")
            (Path(MARKERS) / f"task{task}-{os.getpid()}-{next(COUNTER)}").touch()
            return result

        return wrapper

    class _Patch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.encode_images = _slow(module.encode_images)
                module.cam_batch = _slow(module.cam_batch)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Patch())
