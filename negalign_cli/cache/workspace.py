"""The cache root as a whole: the artifact store plus the per-item vector store."""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import diskcache
from filelock import FileLock, Timeout

from negalign_cli.cache.items import ItemRepair, ItemStore, database_healthy
from negalign_cli.cache.statcache import STAT_CACHE, StatCache
from negalign_cli.cache.store import ArtifactStore, GcReport, folder_size
from negalign_cli.errors import NegalignError
from negalign_cli.settings import SCRATCH, SCRATCH_OWNER


@dataclass
class RepairReport:
    index_rebuilt: bool = False
    artifacts_indexed: int = 0
    artifacts_damaged: int = 0
    items: ItemRepair = field(default_factory=ItemRepair)


SCRATCH_AGE = 86400.0  # a scratch entry untouched for a day belongs to a run that died

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise NegalignError(f"cannot read age {text!r}: use a number and a unit, e.g. 90s, 15m, 12h, 30d, 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Workspace:
    root: Path
    store: ArtifactStore
    items: ItemStore

    @classmethod
    def open(cls, root: str | Path) -> Workspace:
        root = Path(root)
        return cls(root, ArtifactStore(root), ItemStore(root))

    @property
    def stat_cache(self) -> StatCache:
        """Digests of files by their stat (``<cache>/stat.db``): unchanged files are not re-read."""
        return StatCache(self.root / STAT_CACHE)

    def close(self) -> None:
        self.store.close()
        self.items.close()

    def repair(self) -> RepairReport:
        """Rebuild a damaged artifact index from the folders that verify, and salvage a damaged
        per-item store (every readable vector is kept; the rest is recomputed when needed)."""
        report = RepairReport()
        if not database_healthy(self.root / "index", lambda: diskcache.Index(str(self.root / "index"))):
            report.index_rebuilt = True
            report.artifacts_indexed, report.artifacts_damaged = self.store.rebuild_index()
        else:
            gc = self.store.gc(dry_run=False) if (self.root / "index").exists() else GcReport()
            report.artifacts_indexed = len(gc.reindexed_artifacts)
        report.items = self.items.repair()
        return report

    def _clean_scratch(self, report: GcReport, dry_run: bool, older_than: float = SCRATCH_AGE) -> None:
        """Temporary folders of commands that ended or died: a running command holds its folder's
        owner lock; a folder without one (a stray file) is removed once a day old."""
        scratch = self.root / SCRATCH
        if not scratch.is_dir():
            return
        cutoff = time.time() - older_than
        for entry in sorted(scratch.iterdir()):
            with contextlib.suppress(OSError):
                owner = entry / SCRATCH_OWNER
                if owner.is_file():
                    lock = FileLock(str(owner))
                    try:
                        lock.acquire(timeout=0)
                    except (Timeout, RuntimeError):  # held (RuntimeError: by this thread)
                        continue  # a live command's folder
                    lock.release()
                elif entry.lstat().st_mtime >= cutoff:
                    continue
                report.freed_bytes += folder_size(entry) if entry.is_dir() else entry.lstat().st_size
                report.orphan_temp_folders.append(f"scratch/{entry.name}")
                if not dry_run:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()

    def gc(
        self, items_older_than: float | None = None, items_model: str | None = None, dry_run: bool = False
    ) -> GcReport:
        report = self.store.gc(dry_run=dry_run)
        self._clean_scratch(report, dry_run)
        report.freed_bytes += self.items.remove_legacy(dry_run)  # vectors of an older store format
        if items_model:
            report.items_removed += self.items.evict_model(items_model, dry_run=dry_run)
        if items_older_than is not None:
            report.items_removed += self.items.evict_older_than(items_older_than, dry_run=dry_run)
        return report
