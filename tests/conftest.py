from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an open_clip tag must fail at once, not after retries
os.environ["COLUMNS"] = "200"  # rich tables must not wrap differently per terminal


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker (and the processes it starts) gets its share of the cores
    for torch's threads, instead of every worker running as many threads as there are cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


_share_the_cores()


def _build_the_cli_once() -> None:
    """Typer's test runner builds the click commands of the whole app (22 commands, ~70 ms) on every
    in-process invocation; a process builds them once, and so does the suite: the same commands,
    made from the same registered functions, reused."""
    import typer.testing

    build = typer.testing._get_command
    built: dict[int, object] = {}

    def once(app):
        if id(app) not in built:
            built[id(app)] = (app, build(app))  # the app is kept, so its id is never reused
        return built[id(app)][1]

    typer.testing._get_command = once


_build_the_cli_once()


@pytest.fixture(scope="session")
def tiny_model():
    from negalign_cli.models import load_model

    return load_model("negalign-tiny-test")


@pytest.fixture(scope="module")
def setup(tiny_model):
    """The image tower's inputs for tests/test_vision.py and tests/test_gpu_paths.py: (the tiny
    model's open_clip module, 6 random 32 px images, 3 random unit class vectors), made once per
    module from seed 0."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    classes = F.normalize(torch.randn(3, 64, generator=g), dim=-1)
    return tiny_model.model, images, classes


@pytest.fixture()
def workspace(tmp_path):
    from negalign_cli.cache.workspace import Workspace

    ws = Workspace.open(tmp_path / "cache")
    yield ws
    ws.close()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test may touch ./.negalign-cache or a user's $NEGALIGN_CACHE; what a command changes
    for its own process (temporary folder, matplotlib's config folder) is undone after each test."""
    import tempfile

    monkeypatch.setenv("NEGALIGN_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.delenv("NEGALIGN_DEVICE", raising=False)
    monkeypatch.delenv("NEGALIGN_DEBUG", raising=False)
    for name in ("TMPDIR", "MPLCONFIGDIR"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])  # recorded: restored after the test
        else:
            monkeypatch.setenv(name, "")  # records "absent", so the test's own value is removed
            monkeypatch.delenv(name)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)


def _run_toy_demo(out):
    """scripts/demo.sh with the bundled toy CLIP (80 ID images, 40 per OOD set) into ``out``."""
    import subprocess
    import sys
    from pathlib import Path

    negalign = Path(sys.executable).with_name("negalign")
    script = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"
    command = ["bash", str(script), str(negalign), str(out), "--n-id", "80", "--n-ood", "40"]
    env = {k: v for k, v in os.environ.items() if k not in ("NEGALIGN_DEVICE", "NEGALIGN_DEBUG")}
    env.update(COLUMNS="160", NEGALIGN_CACHE=str(out.parent / "cache"))  # never a user's cache
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="session")
def toy_demo(tmp_path_factory):
    """One small `make demo` run (scripts/demo.sh with the bundled toy CLIP; 80 ID images, 40 per
    OOD set), shared by the tests that read its output: (its --out folder, the finished process).

    Under pytest-xdist the run is shared by every worker of the session (the first one to ask runs
    it under a file lock in the session's common temporary folder; the others wait and read its
    recorded result), so the suite pays for it once. Its readers only read, or rerun the demo as a
    cache hit, whose exports replace files atomically."""
    import json
    import subprocess

    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = tmp_path_factory.mktemp("toy-demo") / "demo"
        return out, _run_toy_demo(out)
    shared = tmp_path_factory.getbasetemp().parent / "toy-demo-shared"  # common to the session's workers
    record = shared / "done.json"
    with FileLock(str(shared) + ".lock"):
        if not record.is_file():
            shared.mkdir(exist_ok=True)
            done = _run_toy_demo(shared / "demo")
            fields = {
                "args": done.args,
                "returncode": done.returncode,
                "stdout": done.stdout,
                "stderr": done.stderr,
            }
            record.write_text(json.dumps(fields))
    return shared / "demo", subprocess.CompletedProcess(**json.loads(record.read_text()))


@pytest.fixture(autouse=True, scope="module")
def _module_process_state():
    """Module fixtures that run the CLI in-process do so before the per-test isolation above is set
    up; what their commands change for the process (TMPDIR, MPLCONFIGDIR, tempfile's folder) is
    undone when the module ends, so no later test file inherits it."""
    from tests.helpers import in_process

    with in_process():
        yield


@pytest.fixture()
def placeholder_figures(request, monkeypatch):
    """evaluate's roc.png and score_hist.png (and the report's) as small blank PNGs, for the test
    files that check numbers, tables and errors: drawing them is most of an evaluate on small score
    files, and tests/test_figures_cached.py, test_report*.py and test_evaluate.py check the real
    figures. A test marked ``real_figures`` draws them anyway."""
    if request.node.get_closest_marker("real_figures") is None:
        from tests.helpers import placeholder_figures as patch_figures

        patch_figures(monkeypatch)


# Wall seconds of the files with long real runs in one session of every test on 2 cores (3 workers,
# 2026-12-04): only the order in which pytest-xdist hands out files uses them, longest first.
_LONG_FILES = {
    "test_pipeline_incremental.py": 150,
    "test_launch_slurm.py": 100,
    "test_launch.py": 90,
    "test_interruptions.py": 55,
    "test_pipelines.py": 46,
    "test_gpu_paths.py": 46,
    "test_small_fixes.py": 40,
    "test_report_browser.py": 35,
}


def pytest_collection_modifyitems(items):
    """The files with long real runs first, longest first (then the other files marked ``ci`` or
    ``slow``), so that pytest-xdist, which hands out whole files in collection order (``--dist
    loadfile --no-loadscope-reorder``), starts them while the short tests fill the other workers,
    instead of leaving one of them for the end."""
    weight: dict[Path, float] = {}
    for item in items:
        rank = 2 if item.get_closest_marker("ci") else 1 if item.get_closest_marker("slow") else 0
        weight[item.path] = max(weight.get(item.path, 0), _LONG_FILES.get(item.path.name, rank))
    items.sort(key=lambda item: -weight[item.path])  # stable: each file keeps its own order
