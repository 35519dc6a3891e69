"""The content-addressed artifact store (docs/architecture.md, "The cache").

Layout under the cache root::

    index/                 diskcache Index: key -> record (stage, created, size, params)
    artifacts/<stage>/<key>/manifest.json + output files
    tmp/<key>.<random>/    a run in progress (renamed into artifacts/ when complete)
    locks/<key>.lock       one file lock per key: two processes compute a key once

A stage run is identified by ``StageSpec.key``: the sha256 of the canonical JSON of the stage
name, the stage version, its parameters and the digests of its inputs. Outputs are written to a
temporary folder, digested into ``manifest.json`` and renamed into place, so a killed run never
leaves a visible partial artifact. Every read checks the outputs against the manifest (each file's
size and sha256, the digest through the stat cache ``<cache>/stat.db``: a file whose stat is
unchanged since it was verified is not read again, a changed one is re-hashed); a truncated or
edited file is reported and the artifact recomputed, never used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache
from filelock import FileLock, Timeout

from negalign_cli import __version__
from negalign_cli.cache.diskfull import disk_full, is_disk_full, writing
from negalign_cli.cache.statcache import STAT_CACHE, StatCache, sha256_files
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import canonical_json, read_regular, sha256_text
from negalign_cli.reporting import NullReporter, Reporter

MANIFEST = "manifest.json"
# A key a stage's compute may return: {output name: sha256 of the bytes it wrote there}, for files it
# hashed while writing them; the store then does not read those files back to digest them.
WRITTEN_DIGESTS = "written_digests"
LOCK_POLL_SECONDS = 0.5

ComputeFn = Callable[[Path], Mapping[str, Any] | None]


@dataclass(frozen=True)
class StageSpec:
    """What identifies one stage run. ``inputs`` maps an input name to its content digest."""

    stage: str
    version: int
    params: Mapping[str, Any]
    inputs: Mapping[str, str] = field(default_factory=dict)

    def key_material(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": self.version,
            "params": dict(self.params),
            "inputs": dict(self.inputs),
        }

    @property
    def key(self) -> str:
        return sha256_text(canonical_json(self.key_material()))


def damaged(path: Path, exc: BaseException) -> NegalignError:
    """The one-line error for a cache database SQLite cannot read (or, if the disk is full, for
    one it cannot write: that database is not damaged and `cache repair` would not help)."""
    if is_disk_full(exc, path):
        return disk_full(path)
    return NegalignError(
        f"the cache database in {path} is damaged ({exc}): run `negalign cache repair` "
        "(it rebuilds the index from the artifact folders and keeps every readable vector)"
    )


@dataclass(frozen=True)
class Artifact:
    """A verified, complete artifact folder."""

    key: str
    stage: str
    path: Path
    manifest: dict[str, Any]
    # the store's: export() finds files already in --out by their stat (unchanged ones not re-read)
    stat_cache: StatCache | None = field(default=None, compare=False, repr=False)

    def file(self, name: str) -> Path:
        if name not in self.manifest["outputs"]:
            raise KeyError(f"artifact {self.stage}/{self.key[:12]} has no output {name!r}")
        return self.path / name

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest["outputs"])

    def export(
        self,
        out_dir: str | Path,
        known: Iterable[str] = (),
        reporter: Reporter | None = None,
        inputs: Iterable[str | Path] = (),
    ) -> list[Path]:
        """Copy the outputs and the manifest into ``out_dir`` (the user-facing ``--out``).

        Everything is first copied into a temporary folder inside ``out_dir`` and then renamed
        into place, the manifest last: a failure (disk full, Ctrl-C) leaves no truncated file, and
        a folder without a manifest that matches its files is never taken for a finished one.

        Files an earlier export left there that this artifact does not have are removed before the
        manifest is written: those the old manifest lists, and those named in ``known`` (the file
        names any stage writes, for a folder whose manifest is gone). Nothing else is touched.

        Refused, before anything is written, where one of ``inputs`` (the files the command read:
        ``--out`` naming the folder of its inputs) would be replaced or removed.

        A file already in ``out_dir`` with this artifact's content (its size, then its sha256, taken
        through the stat cache: a file unchanged since it was last hashed is not read) is left as it
        is, not copied again: a cache hit rewrites nothing in an unchanged ``--out``."""
        reporter = reporter or NullReporter()
        out = Path(out_dir)
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
            names = [*self.files, MANIFEST]
            previous = {*listed_outputs(out / MANIFEST), *known} - set(names)
            self._refuse_overwriting(out, {*names, *previous}, inputs)
            unchanged = self._unchanged_in(out)
            if set(names) <= unchanged:
                removed = _remove_stale(out, previous)
                self._removed(removed, out, reporter)
                return [out / name for name in names]
            staging = Path(tempfile.mkdtemp(prefix=".negalign-export-", dir=out))
        changed = [name for name in names if name not in unchanged or name == MANIFEST]
        try:
            for name in changed:
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with writing(out / name):
                    shutil.copyfile(self.path / name, target)
            (out / MANIFEST).unlink(missing_ok=True)  # the old manifest must not vouch for new files
            for name in changed[:-1]:
                final = out / name
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, final)
            removed = _remove_stale(out, previous)
            os.replace(staging / MANIFEST, out / MANIFEST)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._removed(removed, out, reporter)
        return [out / name for name in names]

    def _refuse_overwriting(self, out: Path, touched: set[str], inputs: Iterable[str | Path]) -> None:
        """Refuse an export that would replace or remove one of ``inputs`` (files the command read)."""
        folder = out.resolve()
        for given in inputs:
            path = Path(given).expanduser().resolve()
            if path.parent == folder and path.name in touched and path.is_file():
                raise NegalignError(
                    f"--out {out} holds {path.name}, an input of this {self.stage}: writing the output "
                    "there would replace or remove it; give another folder"
                )

    def _unchanged_in(self, out: Path) -> set[str]:
        """The names (outputs, and the manifest) whose file in ``out`` already holds this
        artifact's bytes: a plain file of the right size whose sha256 (from the stat cache where
        its stat is unchanged) is the manifest's; the manifest itself, byte for byte. A hard link to
        the cache's own file is not one: it is replaced by a copy, so that editing --out never
        edits the cache."""
        outputs = self.manifest["outputs"]
        sized = []
        for name in self.files:
            path = out / name
            with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
                if (
                    not path.is_symlink()
                    and path.stat().st_size == int(outputs[name]["bytes"])
                    and not _hard_link(path, self.path / name)
                ):
                    sized.append(name)
        found = set()
        with contextlib.suppress(OSError):
            digests = sha256_files([out / name for name in sized], self.stat_cache)
            found = {
                name for name, digest in zip(sized, digests, strict=True) if digest == outputs[name]["sha256"]
            }
            manifest = out / MANIFEST
            if (
                not manifest.is_symlink()
                and not _hard_link(manifest, self.path / MANIFEST)
                and read_regular(manifest) == (self.path / MANIFEST).read_bytes()
            ):
                found.add(MANIFEST)
        return found

    def _removed(self, removed: list[str], out: Path, reporter: Reporter) -> None:
        if removed:
            reporter.info(
                f"removed {', '.join(removed)} from {out}: left by an earlier run, not part of this "
                f"{self.stage} output"
            )


def listed_outputs(manifest: Path) -> list[str]:
    """The outputs an existing manifest.json lists (none if it is missing, unreadable or not a
    regular file: a FIFO there would block the read forever)."""
    try:
        outputs = json.loads(read_regular(manifest).decode("utf-8"))["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [name for name in outputs if isinstance(name, str)] if isinstance(outputs, dict) else []


def _hard_link(path: Path, cached: Path) -> bool:
    """Whether ``path`` is another name of the cache's file ``cached`` (the same inode, reached
    by another folder): editing it would edit the cache. The cache's folder itself (``--out``
    naming it) is not."""
    return os.path.samefile(path, cached) and path.parent.resolve() != cached.parent.resolve()


def _remove_stale(out: Path, names: Iterable[str]) -> list[str]:
    """Delete the plain files ``out/NAME`` (only relative names inside ``out``; never a folder)."""
    removed = []
    for name in sorted(names):
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            continue
        path = out / relative
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(name)
    return removed


@dataclass(frozen=True)
class StageResult:
    artifact: Artifact
    hit: bool


@dataclass
class GcReport:
    unreachable_artifacts: list[str] = field(default_factory=list)  # unindexed and failing verification
    reindexed_artifacts: list[str] = field(default_factory=list)  # unindexed but intact: indexed again
    dangling_index_entries: list[str] = field(default_factory=list)
    orphan_temp_folders: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    items_removed: int = 0


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def params_summary(params: Mapping[str, Any], limit: int = 80) -> str:
    parts = []
    for name in sorted(params):
        value = params[name]
        if isinstance(value, (list, tuple)):
            text = f"[{len(value)}]"
        elif isinstance(value, dict):
            text = "{…}"
        else:
            text = str(value)
            if len(text) > 24:
                text = text[:12] + "…"
        parts.append(f"{name}={text}")
    summary = " ".join(parts)
    return summary if len(summary) <= limit else summary[: limit - 1] + "…"


def library_versions() -> dict[str, str]:
    versions = {"negalign": __version__, "python": platform.python_version()}
    for module in ("torch", "open_clip", "numpy"):
        with contextlib.suppress(Exception):
            versions[module] = _module_version(module)
    return versions


def _module_version(module: str) -> str:
    """``module.__version__`` without importing it where it is not loaded yet (torch takes seconds,
    and `evaluate` or `merge` need none): the ``__version__ = '...'`` line of its ``version.py``,
    which holds torch's build suffix (``+cu130``) that the package metadata lacks."""
    loaded = sys.modules.get(module)
    if loaded is None:
        spec = importlib.util.find_spec(module)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = Path(folder, "version.py").read_text(encoding="utf-8")
                found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
                if found:
                    return found.group(1)
        loaded = __import__(module)
    return str(loaded.__version__)


def verify_folder(
    folder: Path, names: Iterable[str] | None = None, stat_cache: StatCache | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) if ``folder`` holds a readable manifest and every output it lists (or just
    ``names``) matches its size and sha256; else (None, why not). Artifact folders and ``--out``
    exports are checked the same way. With ``stat_cache``, an output whose stat is unchanged since
    its digest was last taken is not read again (a changed one is re-hashed)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None, "manifest.json is missing"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        outputs = manifest["outputs"]
    except (ValueError, KeyError, TypeError):
        return None, "manifest.json is unreadable"
    if not isinstance(manifest, dict) or not isinstance(outputs, dict) or "stage" not in manifest:
        return None, "manifest.json is malformed"
    wanted = None if names is None else set(names)
    if wanted is not None and not wanted <= set(outputs):
        return None, f"its manifest does not list {', '.join(sorted(wanted - set(outputs)))}"
    # Sizes first, file by file; then the digests of the files before the first problem, in one
    # batch (one stat-cache query): the first problem in manifest order is reported, as ever.
    expected: list[tuple[str, Path, str]] = []
    problem = None
    for name, meta in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        path = folder / name
        try:
            size, digest = int(meta["bytes"]), str(meta["sha256"])
        except (KeyError, TypeError, ValueError):
            problem = f"manifest.json is malformed (its entry for {name})"
            break
        if not path.is_file():
            problem = f"{name} is missing"
            break
        if path.stat().st_size != size:
            problem = f"{name} has {path.stat().st_size} bytes, expected {size}"
            break
        expected.append((name, path, digest))
    found = sha256_files([path for _, path, _ in expected], stat_cache)
    for (name, _, digest), actual in zip(expected, found, strict=True):
        if actual != digest:
            return None, f"{name} does not match its digest"
    if problem is not None:
        return None, problem
    return manifest, None


class ArtifactStore:
    """Stage artifacts on disk, indexed by key. Safe for several processes on one local disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.artifacts_dir = self.root / "artifacts"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        for folder in (self.artifacts_dir, self.tmp_dir, self.locks_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(folder) from exc
                raise NegalignError(f"cannot create cache folder {folder}: {exc.strerror}") from exc
        self._index: diskcache.Index | None = None
        # digests of verified outputs by their stat: an unchanged artifact is not read on a hit
        self.stat_cache = StatCache(self.root / STAT_CACHE)

    # ----------------------------------------------------------------- index
    @property
    def index(self) -> diskcache.Index:
        if self._index is None:
            path = self.root / "index"
            if path.exists() and not path.is_dir():
                raise NegalignError(
                    f"{path} is a file where the cache index (a folder) belongs: move it away, "
                    "or run `negalign cache repair`"
                )
            # SQLite set-up is not safe when two processes create the file at the same moment.
            with FileLock(str(self.locks_dir / "index-open.lock")):
                try:
                    self._index = diskcache.Index(str(path))
                except sqlite3.DatabaseError as exc:
                    raise damaged(path, exc) from exc
        return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.cache.close()
            self._index = None

    def _lock(self, key: str) -> FileLock:
        return FileLock(str(self.locks_dir / f"{key}.lock"))

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.artifacts_dir / stage / key

    # ---------------------------------------------------------------- lookup
    def _verify(self, folder: Path) -> tuple[dict[str, Any] | None, str | None]:
        return verify_folder(folder, stat_cache=self.stat_cache)

    def _record(self, key: str, manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
        return {
            "key": key,
            "stage": manifest["stage"],
            "stage_version": manifest["stage_version"],
            "path": str(folder.relative_to(self.root)),
            "created": manifest["created"],
            "bytes": folder_size(folder),
            "params": manifest["params"],
            "params_summary": params_summary(manifest["params"]),
        }

    def _find(self, key: str, stage: str | None) -> tuple[Artifact | None, str | None]:
        """Look ``key`` up; returns (artifact, None), (None, corruption reason) or (None, None)."""
        record = self.index.get(key)
        if record is not None:
            folder = self.root / record["path"]
            stage = record["stage"]
        elif stage is not None:
            folder = self.artifact_dir(stage, key)
            if not folder.exists():
                return None, None
        else:
            return None, None
        if not folder.exists():
            return None, "its folder is missing"
        manifest, reason = self._verify(folder)
        if manifest is None:
            return None, reason
        if record is None:  # complete on disk, not yet indexed (a run stopped between rename and index)
            with self._writing_index():
                self.index[key] = self._record(key, manifest, folder)
        artifact = Artifact(
            key=key, stage=manifest["stage"], path=folder, manifest=manifest, stat_cache=self.stat_cache
        )
        return artifact, None

    def get(self, spec_or_key: StageSpec | str) -> Artifact | None:
        """The verified artifact for a spec or a full key, or None."""
        if isinstance(spec_or_key, StageSpec):
            artifact, _ = self._find(spec_or_key.key, spec_or_key.stage)
        else:
            artifact, _ = self._find(spec_or_key, None)
        return artifact

    def resolve(self, key_prefix: str) -> str:
        """Full key for a unique prefix (at least 4 characters) of a key in the index."""
        prefix = key_prefix.strip().lower()
        if len(prefix) < 4:
            raise NegalignError(f"key prefix {key_prefix!r} is too short: give at least 4 characters")
        matches = [key for key in self.index if key.startswith(prefix)]
        if not matches:
            raise NegalignError(f"no artifact with a key starting {prefix!r} in {self.root}")
        if len(matches) > 1:
            raise NegalignError(f"key prefix {prefix!r} is ambiguous: {len(matches)} artifacts match")
        return matches[0]

    # ------------------------------------------------------------------- run
    @contextlib.contextmanager
    def _holding(self, key: str, stage: str, reporter: Reporter) -> Iterator[None]:
        lock = self._lock(key)
        try:
            lock.acquire(timeout=LOCK_POLL_SECONDS)
        except Timeout:
            reporter.info(f"waiting for another process that is computing {stage} {key[:12]}")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def run(
        self,
        spec: StageSpec,
        compute: ComputeFn,
        reporter: Reporter | None = None,
        revalidate: Callable[[Artifact], str | None] | None = None,
    ) -> StageResult:
        """Return the stored artifact for ``spec``, or run ``compute(tmp_folder)`` and store it.

        ``compute`` writes its output files into the folder it is given and may return a mapping of
        counts and notes for the manifest (``{"counts": {...}, ...}``). ``revalidate`` may refuse a
        stored artifact that is intact but not final (it returns why); it is then computed again.
        """
        reporter = reporter or NullReporter()
        key = spec.key
        reporter.debug(f"{spec.stage} v{spec.version}: key {key}, params {canonical_json(spec.params)}")
        reporter.debug(f"{spec.stage} inputs: {canonical_json(spec.inputs)}")
        artifact, _ = self._find(key, spec.stage)
        stale = revalidate(artifact) if artifact is not None and revalidate is not None else None
        if artifact is not None and stale is None:
            reporter.info(f"cache hit: {spec.stage} {key[:12]} (computed {artifact.manifest['created']})")
            return StageResult(artifact, hit=True)
        with self._holding(key, spec.stage, reporter):
            artifact, reason = self._find(key, spec.stage)
            stale = revalidate(artifact) if artifact is not None and revalidate is not None else None
            if artifact is not None and stale is None:
                reporter.info(f"cache hit: {spec.stage} {key[:12]} (computed by another process)")
                return StageResult(artifact, hit=True)
            if stale is not None:
                reporter.info(f"cached {spec.stage} {key[:12]}: {stale}")
                self._remove(key, self.artifact_dir(spec.stage, key))
            elif reason is not None:
                reporter.warn(f"cached {spec.stage} {key[:12]} is corrupt ({reason}); recomputing it")
                self._remove(key, self.artifact_dir(spec.stage, key))
            artifact = self._compute(spec, key, compute)
        seconds = artifact.manifest["timing"]["seconds"]
        reporter.debug(f"{spec.stage} {key[:12]} computed in {seconds:.2f} s, stored in {artifact.path}")
        return StageResult(artifact, hit=False)

    def _compute(self, spec: StageSpec, key: str, compute: ComputeFn) -> Artifact:
        with writing(self.tmp_dir):
            tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.tmp_dir))
        try:
            with writing(tmp):  # the stage's own writes (np.save, parquet) and the manifest
                manifest = self._fill(spec, key, compute, tmp)
            final = self.artifact_dir(spec.stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._writing_index():
            self.index[key] = self._record(key, manifest, final)
        return Artifact(key=key, stage=spec.stage, path=final, manifest=manifest, stat_cache=self.stat_cache)

    def _writing_index(self) -> contextlib.AbstractContextManager[None]:
        return writing(self.root / "index")

    def _fill(self, spec: StageSpec, key: str, compute: ComputeFn, tmp: Path) -> dict[str, Any]:
        """Run the stage's compute into ``tmp`` and write its manifest there (fsynced)."""
        started = time.perf_counter()
        extra = dict(compute(tmp) or {})
        seconds = time.perf_counter() - started
        # sha256 of files the stage hashed as it wrote them (their bytes were all in memory then)
        hashed: Mapping[str, str] = extra.pop(WRITTEN_DIGESTS, {})
        written = sorted(p for p in tmp.rglob("*") if p.is_file())
        if any(path.relative_to(tmp).as_posix() == MANIFEST for path in written):
            raise RuntimeError(f"stage {spec.stage} must not write {MANIFEST} itself")
        names = [path.relative_to(tmp).as_posix() for path in written]
        # no stat cache: these paths are renamed away next (and their files were just written)
        read = sha256_files([path for path, name in zip(written, names, strict=True) if name not in hashed])
        digests = iter(read)
        outputs = {
            name: {"sha256": hashed[name] if name in hashed else next(digests), "bytes": path.stat().st_size}
            for path, name in zip(written, names, strict=True)
        }
        manifest = {
            "key": key,
            "stage": spec.stage,
            "stage_version": spec.version,
            "params": dict(spec.params),
            "inputs": dict(spec.inputs),
            "outputs": outputs,
            "counts": extra.pop("counts", {}),
            "timing": {"seconds": round(seconds, 4)},
            "created": _now_iso(),
            "versions": library_versions(),
            **extra,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        return manifest

    def _remove(self, key: str, folder: Path | None = None) -> int:
        with self._writing_index():
            record = self.index.pop(key, None)
        if folder is None and record is not None:
            folder = self.root / record["path"]
        freed = 0
        if folder is not None and folder.exists():
            freed = folder_size(folder)
            shutil.rmtree(folder)
        return freed

    def remove(self, key: str) -> int:
        """Delete one artifact (under its lock); returns the bytes freed."""
        with self._lock(key):
            return self._remove(key)

    # ---------------------------------------------------------------- browse
    def records(self) -> list[dict[str, Any]]:
        """Index records, newest first."""
        return sorted(self.index.values(), key=lambda r: r["created"], reverse=True)

    def manifest(self, key: str) -> dict[str, Any]:
        record = self.index.get(key)
        if record is None:
            raise NegalignError(f"no artifact {key[:12]} in the index")
        manifest, reason = self._verify(self.root / record["path"])
        if manifest is None:
            raise NegalignError(f"artifact {key[:12]} is corrupt ({reason}); the next run will recompute it")
        return manifest

    # -------------------------------------------------------------------- gc
    def gc(self, dry_run: bool = False) -> GcReport:
        """Remove artifact folders the index does not reach, index entries whose folder is gone,
        and temporary folders that no running process owns."""
        report = GcReport()
        indexed = set(self.index.keys())
        for key in list(indexed):
            record = self.index.get(key)
            if record is not None and not (self.root / record["path"]).exists():
                report.dangling_index_entries.append(key)
                if not dry_run:
                    with self._writing_index():
                        self.index.pop(key, None)
        for stage_dir in sorted(p for p in self.artifacts_dir.iterdir() if p.is_dir()):
            for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
                if folder.name in indexed:
                    continue
                name = f"{stage_dir.name}/{folder.name}"
                if self._reindex(folder.name, folder, dry_run):
                    report.reindexed_artifacts.append(name)
                elif self._claim(folder.name, folder, report, dry_run):
                    report.unreachable_artifacts.append(name)
        for folder in sorted(p for p in self.tmp_dir.iterdir() if p.is_dir()):
            if self._claim(folder.name.split(".")[0], folder, report, dry_run):
                report.orphan_temp_folders.append(folder.name)
        return report

    def _reindex(self, key: str, folder: Path, dry_run: bool) -> bool:
        """Index an unindexed artifact folder again if it verifies (its index entry was lost, or a
        run was killed between the rename and the index update). True if it did (or would)."""
        manifest, _ = self._verify(folder)
        if (
            manifest is None
            or manifest.get("key") != key
            or not all(field in manifest for field in ("stage", "stage_version", "created", "params"))
        ):
            return False
        if not dry_run:
            with self._writing_index():
                self.index[key] = self._record(key, manifest, folder)
        return True

    def rebuild_index(self) -> tuple[int, int]:
        """A new index from the artifact folders that verify (the damaged one is moved aside).
        Returns (artifacts indexed, damaged folders left out)."""
        self.close()
        path = self.root / "index"
        if path.exists():
            path.rename(self.root / f"index.damaged-{int(time.time())}")
        indexed = damaged_folders = 0
        for stage_dir in sorted(p for p in self.artifacts_dir.iterdir() if p.is_dir()):
            for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
                if self._reindex(folder.name, folder, dry_run=False):
                    indexed += 1
                else:
                    damaged_folders += 1
        return indexed, damaged_folders

    def _claim(self, key: str, folder: Path, report: GcReport, dry_run: bool) -> bool:
        """Remove ``folder`` if no process holds ``key``'s lock. True if it was (or would be) removed."""
        lock = self._lock(key)
        try:
            lock.acquire(timeout=0)
        except (Timeout, RuntimeError):  # RuntimeError: held by this very thread (filelock)
            return False  # a live run owns it
        try:
            if not folder.exists() or (folder.parent.parent == self.artifacts_dir and key in self.index):
                return False
            report.freed_bytes += folder_size(folder)
            if not dry_run:
                shutil.rmtree(folder)
            return True
        finally:
            lock.release()
