"""Faults found reviewing the day's merges (reader pool, merge writes, pyarrow-only evaluate,
standard results.json, unchanged exports): each test failed on the code before its fix."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from negalign_cli.cache.store import ArtifactStore, StageSpec

SPEC = StageSpec("review", 1, {"n": 1}, {"input": "abc"})


def _compute(folder: Path) -> dict:
    (folder / "metrics.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (folder / "results.json").write_text('{"x": 1}', encoding="utf-8")
    return {}


# --- 1. an --out file hard-linked to the cache's own file is replaced by a copy -----------------


def test_an_export_does_not_leave_an_out_file_sharing_the_caches_inode(tmp_path):
    """An --out file that is a hard link to the artifact's file in the cache (``cp -al``, ``rsync
    --link-dest``, ``ln``) holds the artifact's bytes, so the unchanged-export check used to leave
    it: --out and the cache then shared one inode, and a later in-place edit of the --out file
    (``>>`` a note to metrics.csv) rewrote the cached artifact. Now such a file is copied: after the
    export it is its own inode, and editing it leaves the cache as it was."""
    store = ArtifactStore(tmp_path / "cache")
    artifact = store.run(SPEC, _compute).artifact
    out = tmp_path / "out"
    artifact.export(out)
    cached = artifact.path / "metrics.csv"
    for name in ("metrics.csv", "manifest.json"):  # the --out files are the cache's inodes
        (out / name).unlink()
        os.link(artifact.path / name, out / name)
    artifact.export(out)
    for name in ("metrics.csv", "manifest.json"):
        assert not os.path.samefile(out / name, artifact.path / name), name
    assert (out / "metrics.csv").read_bytes() == cached.read_bytes()
    with open(out / "metrics.csv", "a", encoding="utf-8") as handle:
        handle.write("a note\n")
    assert cached.read_text(encoding="utf-8") == "a,b\n1,2\n"
    assert store.get(SPEC) is not None  # the artifact still verifies


# --- 2. a results.json trimmed by hand (jq) is still read ---------------------------------------


def test_a_trimmed_results_json_with_its_nonfinite_block_is_a_calibration_file(tmp_path, placeholder_figures):
    """``--calibration`` takes a results.json or its calibration block. A results.json cut down
    with jq (``jq '{calibration, nonfinite}'``) keeps a ``nonfinite`` block whose paths name values
    no longer in the file: reading it raised KeyError ("unexpected KeyError ... please report it",
    exit 1). Now a listed value whose place is gone is passed over, and the statistics are used;
    a malformed block is one `cannot read calibration file` line."""
    import json

    import numpy as np
    import pandas as pd

    from tests.faults.helpers import cli, one_line_error
    from tests.helpers.synthetic import write_scores

    ood = write_scores(tmp_path / "ood.parquet", 20, 1, shift=0.1)
    frame = pd.read_parquet(ood)
    frame.loc[3, "s_energy"] = np.inf  # a statistic of s_energy is inf: results.json has a nonfinite block
    frame.to_parquet(ood, index=False)
    ids = write_scores(tmp_path / "id.parquet", 20, 0, shift=0.3)
    argv = ["evaluate", "--id", str(ids), "--ood", f"far={ood}", "--scale-stabilize"]
    argv += ["--cache-dir", str(tmp_path / "c")]
    done = cli(*argv, "--out", str(tmp_path / "r"))
    assert done.exit_code == 0, done.output
    results = json.loads((tmp_path / "r" / "results.json").read_text(encoding="utf-8"))
    assert results["nonfinite"]["values"], results.get("nonfinite")
    trimmed = tmp_path / "calibration.json"
    trimmed.write_text(json.dumps({"calibration": results["calibration"], "nonfinite": results["nonfinite"]}))
    again = cli(*argv, "--calibration", str(trimmed), "--out", str(tmp_path / "r2"))
    assert again.exit_code == 0, again.output
    used = json.loads((tmp_path / "r2" / "results.json").read_text(encoding="utf-8"))["calibration"]
    assert {k: used[k] for k in results["calibration"] if k != "source"} == {
        k: v for k, v in results["calibration"].items() if k != "source"
    }
    trimmed.write_text(json.dumps({"calibration": results["calibration"], "nonfinite": {"values": [7]}}))
    one_line_error(cli(*argv, "--calibration", str(trimmed)), "cannot read calibration file")


def test_an_export_into_the_artifacts_own_folder_rewrites_nothing(tmp_path):
    """--out naming the cache's artifact folder itself (through a link): its files are the
    artifact's, not copies sharing its inodes, so nothing is rewritten (no moment without the
    cache's manifest)."""
    store = ArtifactStore(tmp_path / "cache")
    artifact = store.run(SPEC, _compute).artifact
    (tmp_path / "out").symlink_to(artifact.path)
    before = {p.name: p.stat().st_ino for p in artifact.path.iterdir()}
    artifact.export(tmp_path / "out")
    assert {p.name: p.stat().st_ino for p in artifact.path.iterdir()} == before
    assert store.get(SPEC) is not None


# --- 3. evaluate's score file is read from one open file ----------------------------------------


def test_a_score_file_replaced_while_evaluate_reads_it_is_not_mixed_in(tmp_path):
    """evaluate reads a parquet score file's columns when first used. Each column used to open
    the path again, so a file replaced there meanwhile (`score --out` rerun into the same folder,
    an os.replace) gave S* from the old file and P_align from the new one, the same row count and
    no error, cached under the old file's digest. Now every column (and the DataFrame path's
    frame) comes from the file opened first."""
    import numpy as np
    import pandas as pd

    from negalign_cli.stages.score_table import ScoreTable

    old = pd.DataFrame(
        {"s_neglabel_star": np.arange(6.0), "p_align": np.arange(6.0) / 10, "pred_name": list("abcdef")}
    )
    new = old.assign(
        s_neglabel_star=-old["s_neglabel_star"], p_align=-old["p_align"], pred_name=list("uvwxyz")
    )
    path = tmp_path / "scores.parquet"
    old.to_parquet(path, index=False)
    new.to_parquet(tmp_path / "new.parquet", index=False)
    table = ScoreTable.read(path)
    assert table.numeric("s_neglabel_star").tolist() == old["s_neglabel_star"].tolist()
    os.replace(tmp_path / "new.parquet", path)  # a new `score --out` into the same folder
    assert table.numeric("p_align").tolist() == old["p_align"].tolist()
    assert table.series("pred_name").tolist() == list("abcdef")  # the DataFrame path's columns too
    assert table.filter(np.arange(6) % 2 == 0).to_frame()["p_align"].tolist() == [0.0, 0.2, 0.4]


# --- 4. a FIFO named manifest.json in --out ------------------------------------------------------


def test_an_export_over_a_fifo_named_manifest_json_does_not_block(tmp_path):
    """--out's manifest.json was read with a plain open (the old one's list of outputs, and the
    unchanged-export check): a FIFO there blocked the export forever. It is read only when it is a
    regular file (``open_regular``): the FIFO is replaced by the manifest, the outputs exported."""
    import threading

    store = ArtifactStore(tmp_path / "cache")
    artifact = store.run(SPEC, _compute).artifact
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    failed: list[BaseException] = []

    def export() -> None:
        try:
            artifact.export(out)
        except BaseException as exc:  # reported below
            failed.append(exc)

    worker = threading.Thread(target=export, daemon=True)
    worker.start()
    worker.join(10)
    blocked = worker.is_alive()
    if blocked:  # let the blocked open end (a writer opens the FIFO), so no thread is left behind
        os.close(os.open(out / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert not blocked, "export blocked on a FIFO named manifest.json in --out"
    assert not failed, failed
    assert (out / "manifest.json").read_bytes() == (artifact.path / "manifest.json").read_bytes()
    assert (out / "metrics.csv").read_bytes() == (artifact.path / "metrics.csv").read_bytes()


def test_evaluate_out_over_a_fifo_named_manifest_json_does_not_block(tmp_path, placeholder_figures):
    """The same through the CLI: `evaluate --out` read the folder's old manifest.json (its key,
    for the figures drawn there) with a plain open too."""
    import threading

    from tests.faults.helpers import cli
    from tests.helpers.synthetic import write_scores

    ids = write_scores(tmp_path / "id.parquet", 20, 0, shift=0.3)
    ood = write_scores(tmp_path / "ood.parquet", 20, 1, shift=0.1)
    out = tmp_path / "r"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    done: list = []
    argv = ["evaluate", "--id", str(ids), "--ood", f"far={ood}", "--cache-dir", str(tmp_path / "c")]
    worker = threading.Thread(target=lambda: done.append(cli(*argv, "--out", str(out))), daemon=True)
    worker.start()
    worker.join(20)
    blocked = worker.is_alive()
    while worker.is_alive():  # unblock each plain open of the FIFO, so no thread is left behind
        with contextlib.suppress(OSError):
            os.close(os.open(out / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(1)
    assert not blocked, "evaluate --out blocked on a FIFO named manifest.json"
    assert done and done[0].exit_code == 0, done[0].output if done else None
    assert (out / "manifest.json").is_file() and (out / "results.json").is_file()
