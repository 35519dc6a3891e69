"""Model identity without the model: the planning layer's view of ``--model``/``--pretrained``.

Nothing here imports torch, open_clip or numpy on the way to a cache key. A :class:`ModelRef` is
resolved from the options alone: the open_clip architecture (``model_names``), where the weights
come from (:func:`resolve_source`, the one implementation ``models.resolve_weights`` builds on),
and the architecture's JSON config (the project's ``assets/model_configs``, else open_clip's
``model_configs`` folder, found without importing open_clip).

A model's fingerprint (``models.model_fingerprint``: its config, preprocessing and every weight's
bytes) is what cache keys hold. Computing it means building the model; the **fingerprint table**
(``<cache>/models.json``, see :class:`FingerprintTable`) remembers it under a key made of what
determines it without the weights' bytes: the architecture, the config file's digest, the weights'
identity (a checkpoint file's stat; an open_clip tag, whose cached file's stat is checked too; a
random seed with the torch version) and the library versions. :class:`LazyModel` answers the
fingerprint, precision, embed_dim and the description from the table and builds the model only
when something asks for the network itself, which stages do only inside their compute step (run
by the artifact store on a miss). The entry is checked then: a fingerprint that differs means the
entry was stale; it is rewritten and the run stops before storing anything under the stale key.

A process that only plans (the ``launch`` driver) plans under :func:`fingerprint_elsewhere`: a
model the table does not know is built in a child process, which writes its row, so the planning
process itself never imports torch or open_clip.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from negalign_cli.defaults import COMPILED_DIR, DEFAULT_COMPILE, DEFAULT_MODEL, DEFAULT_PRETRAINED
from negalign_cli.errors import NegalignError
from negalign_cli.hashing import canonical_json, sha256_json
from negalign_cli.model_names import LOCAL_DIR, check_model_name, project_model_names, resolve_model_name
from negalign_cli.reporting import NullReporter, Reporter

RANDOM = "random"
DEFAULT_RANDOM_SEED = 0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
TABLE_FILE = "models.json"  # under the cache root
TABLE_VERSION = 1  # bump when the key's recipe or models.model_fingerprint changes


@dataclass(frozen=True)
class ProjectModel:
    """An architecture the project defines itself (config in ``assets/model_configs``)."""

    name: str
    description: str
    seed: int | None = None  # random init from this seed when no --pretrained is given
    checkpoint: str | None = None  # bundled weights (under assets/models) used when no --pretrained is given


PROJECT_MODELS: dict[str, ProjectModel] = {
    "negalign-tiny-test": ProjectModel(
        name="negalign-tiny-test",
        description="ViT 32 px, patch 8, 2 layers, width 64; random init (seed 0); for tests and examples",
        seed=0,
    ),
    "negalign-toy": ProjectModel(
        name="negalign-toy",
        description="ViT 64 px, patch 8, 4 layers, width 128; trained on the toy world (model card: "
        "negalign_cli/assets/models/negalign-toy.md)",
        seed=0,
        checkpoint="models/negalign-toy.pt",
    ),
}


def bundled_checkpoint(project: ProjectModel) -> Path | None:
    if project.checkpoint is None:
        return None
    from negalign_cli.assets import asset_path

    return asset_path(project.checkpoint)


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from, resolved from ``--model`` and ``--pretrained``."""

    description: str  # human-readable, shown in messages and manifests
    tag: str | None = None  # an open_clip tag (downloaded by open_clip)
    checkpoint: Path | None = None  # a local checkpoint file
    seed: int | None = None  # a seeded random init
    local_dir: bool = False  # ``local-dir:`` models carry their own weights
    hub_cached: bool = False  # the tag's weights are in the Hugging Face cache: no network is needed

    @property
    def random(self) -> bool:
        return self.seed is not None


def looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.lower().endswith(CHECKPOINT_SUFFIXES)


def weights_hint(arch: str, tags: list[str]) -> str:
    shown = ", ".join(tags[:6]) + (", …" if len(tags) > 6 else "")
    tag_part = f"an open_clip tag ({shown}) to download, " if tags else ""
    return (
        f"pass --pretrained with {tag_part}a local checkpoint path such as --pretrained /path/to/{arch}.pt, "
        f"or --pretrained random for a seeded random init (speed tests only)"
    )


def _open_clip_tags(name: str) -> list[str]:
    """open_clip's weight tags of ``name`` (imports open_clip: only for an error's hint or to check
    a tag when a model is built)."""
    from negalign_cli.models import open_clip_tags

    return open_clip_tags(name)


def resolve_source(name: str, pretrained: str | None) -> WeightsSource:
    """Where the weights of architecture ``name`` come from, without importing open_clip: a
    ``local-dir:`` folder, a bundled checkpoint, a seeded random init, a checkpoint file, or else an
    open_clip tag. The tag is not checked against open_clip's list here: ``models.resolve_weights``
    does that (and whether its weights are cached) before a model is built.

    Raises :class:`NegalignError` with a one-line explanation for anything the user can fix."""
    if name.startswith(LOCAL_DIR):
        folder = name[len(LOCAL_DIR) :]
        if pretrained:
            raise NegalignError("a local-dir: model carries its own weights; drop --pretrained")
        if not Path(folder).is_dir():
            raise NegalignError(f"model folder not found: {folder}")
        return WeightsSource(folder, local_dir=True)
    project = PROJECT_MODELS.get(name)
    if project is None and config_path(name) is None:
        check_model_name(name)  # an unknown name: the error names the closest known ones
        raise NegalignError(f"unknown model architecture {name!r}: `negalign models` lists the known ones")
    if not pretrained:
        if project is not None and project.checkpoint is not None:
            checkpoint = bundled_checkpoint(project)
            if checkpoint is None or not checkpoint.is_file():
                raise NegalignError(
                    f"the bundled {name} checkpoint is missing ({checkpoint}); regenerate it with "
                    "`negalign toy train --install` or pass --pretrained PATH"
                )
            return WeightsSource(f"bundled checkpoint {project.checkpoint}", checkpoint=checkpoint)
        if project is None or project.seed is None:
            raise NegalignError(f"model {name} needs weights: {weights_hint(name, _open_clip_tags(name))}")
        return WeightsSource(f"random init, seed {project.seed}", seed=project.seed)
    if pretrained.lower() == RANDOM:
        seed = project.seed if project is not None and project.seed is not None else DEFAULT_RANDOM_SEED
        return WeightsSource(f"random init, seed {seed}", seed=seed)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return WeightsSource(str(path.resolve()), checkpoint=path.resolve())
    if looks_like_path(pretrained) and not path.exists():
        raise NegalignError(f"checkpoint not found: {pretrained}")
    return WeightsSource(f"open_clip tag {pretrained}", tag=pretrained)  # checked when built


# --------------------------------------------------------------------------- configs
@functools.cache
def _open_clip_config_dirs() -> tuple[Path, ...]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(Path(location) / "model_configs" for location in spec.submodule_search_locations)


def config_path(name: str) -> Path | None:
    """The JSON config of architecture ``name``: the project's own, else open_clip's (the files
    ``open_clip.get_model_config`` reads), found without importing open_clip."""
    from negalign_cli.assets import model_config_dir

    folders = (model_config_dir(),) if name in project_model_names() else ()
    for folder in (*folders, *_open_clip_config_dirs()):
        path = folder / f"{name}.json"
        if path.is_file():
            return path
    return None


def library_version(distribution: str) -> str | None:
    """An installed distribution's version, from its metadata (nothing imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_stat(path: str | Path) -> dict[str, Any] | None:
    """What says a file is unchanged without reading it: the stat cache's identity of a file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


# --------------------------------------------------------------------------- the reference
@dataclass(frozen=True)
class ModelRef:
    """A model as the options name it, resolved without building it (no torch)."""

    name: str  # the open_clip architecture
    pretrained: str | None  # as resolved (OpenAI's names and the default model get their weights)
    source: WeightsSource
    config: dict[str, Any]  # the architecture's JSON config as shipped (before quick_gelu)
    config_digest: str | None  # sha256 of the config file's bytes
    device: str
    precision: str

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def vision_cfg(self) -> dict[str, Any]:
        return dict(self.config.get("vision_cfg", {}))

    @property
    def image_size(self) -> int:
        size = self.vision_cfg.get("image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def patch_size(self) -> int | None:
        patch = self.vision_cfg.get("patch_size")
        return None if patch is None else int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    @property
    def grid(self) -> tuple[int, int] | None:
        patch = self.patch_size
        return None if patch is None else (self.image_size // patch, self.image_size // patch)

    @property
    def vision_layers(self) -> int | None:
        layers = self.vision_cfg.get("layers")
        return layers if isinstance(layers, int) else None  # a list: a ResNet tower

    @property
    def context_length(self) -> int:
        return int(self.config.get("text_cfg", {}).get("context_length", 77))

    def weights_identity(self) -> dict[str, Any] | None:
        """What fixes the weights' bytes, without reading them; None where nothing cheap does
        (``local-dir:`` folders: such a model is always built to be fingerprinted)."""
        source = self.source
        open_clip = library_version("open_clip_torch")
        if source.checkpoint is not None:
            stat = file_stat(source.checkpoint)
            return None if stat is None else {"checkpoint": stat, "open_clip": open_clip}
        if source.seed is not None:
            return {"seed": source.seed, "torch": library_version("torch"), "open_clip": open_clip}
        if source.tag is not None:  # the cached file's stat is recorded in the entry and checked on lookup
            return {"tag": source.tag, "open_clip": open_clip}
        return None

    @property
    def table_key(self) -> str | None:
        """The fingerprint table's key; None where the model must be built to know its fingerprint."""
        weights = self.weights_identity()
        if weights is None or self.config_digest is None:
            return None
        return sha256_json(
            {
                "table": TABLE_VERSION,
                "architecture": self.name,
                "config": self.config_digest,
                "weights": weights,
            }
        )


def resolve_ref(name: str, pretrained: str | None, device: str = "cpu", precision: str = "fp32") -> ModelRef:
    """The :class:`ModelRef` of ``--model``/``--pretrained`` (OpenAI's names and the default model's
    weights as ``models.check_weights`` resolves them), with no torch and no open_clip import."""
    from negalign_cli.settings import check_precision

    name, pretrained = resolve_model_name(name, pretrained)
    if name == DEFAULT_MODEL and not pretrained:
        pretrained = DEFAULT_PRETRAINED
    source = resolve_source(name, pretrained)
    path = None if source.local_dir else config_path(name)
    config: dict[str, Any] = {}
    digest = None
    if path is not None:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        config = json.loads(data)
    elif source.local_dir:
        try:
            folder = Path(name[len(LOCAL_DIR) :])
            config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]
        except (OSError, ValueError, KeyError, TypeError):
            config = {}
    return ModelRef(name, pretrained, source, config, digest, str(device), check_precision(precision))


# --------------------------------------------------------------------------- the table
def _checksum(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(entry).encode()).hexdigest()[:32]


class FingerprintTable:
    """``<cache>/models.json``: table key → what cache keys and messages need of a model
    (fingerprint, resolved config, preprocessing, embed_dim, vision tower sizes, weights
    description, random flag). Each row carries a checksum of its value: a damaged or edited row
    is ignored (the model is built and the row written again). The file is replaced atomically;
    two processes writing at once lose at most a row, which the next run fills again."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / TABLE_FILE

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        rows = data.get("rows") if isinstance(data, dict) and data.get("version") == TABLE_VERSION else None
        return rows if isinstance(rows, dict) else {}

    def get(self, ref: ModelRef) -> dict[str, Any] | None:
        """The row of ``ref``, or None (no key, no row, a damaged row, or a tag whose cached
        weights file changed since the row was written)."""
        key = ref.table_key
        if key is None:
            return None
        row = self._read().get(key)
        if not isinstance(row, dict) or not isinstance(row.get("entry"), dict):
            return None
        entry = row["entry"]
        if row.get("checksum") != _checksum(entry) or not isinstance(entry.get("fingerprint"), str):
            return None
        recorded = entry.get("weights_file")
        if recorded is not None and file_stat(recorded["path"]) != recorded:
            return None
        return entry

    def put(self, ref: ModelRef, entry: dict[str, Any]) -> None:
        key = ref.table_key
        if key is None:
            return
        rows = self._read()
        rows[key] = {"entry": entry, "checksum": _checksum(entry)}
        text = json.dumps({"version": TABLE_VERSION, "rows": rows}, indent=1, sort_keys=True)
        import tempfile

        tmp: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{TABLE_FILE}.", suffix=".tmp", dir=self.path.parent)
            tmp = Path(name)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError:  # an unwritable cache: the next run builds the model again
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def table_entry(ref: ModelRef, loaded: Any) -> dict[str, Any]:
    """The table row of a built model (``models.LoadedModel``)."""
    from negalign_cli.models import tag_weights_file, vision_summary

    weights_file = None
    if ref.source.tag is not None:
        found = tag_weights_file(ref.name, ref.source.tag)
        weights_file = None if found is None else file_stat(found)
    return {
        "fingerprint": loaded.fingerprint,
        "config": loaded.config,
        "preprocess_cfg": loaded.preprocess_cfg,
        "embed_dim": loaded.embed_dim,
        "weights": loaded.weights,
        "random": bool(loaded.random_weights),
        "vision": vision_summary(loaded.model),
        "weights_file": weights_file,
    }


# --------------------------------------------------------------------------- the lazy model
class LazyModel:
    """What stages are given: a model that is built on first use of anything that needs the
    network (``model``, ``tokenizer``, ``to_input``, ``input_dtype``, ``context_length``…), and
    answers its identity (``fingerprint``, ``precision``, ``embed_dim``, ``name``, ``device``,
    ``describe()``, ``preprocess_cfg``, the vision tower's sizes) from the fingerprint table without
    building it; ``image_transform()`` needs open_clip but not the model."""

    def __init__(
        self,
        ref: ModelRef,
        entry: dict[str, Any],
        table: FingerprintTable | None,
        *,
        loaded: Any = None,
        reporter: Reporter | None = None,
        compile: str = DEFAULT_COMPILE,
        compile_cache: Path | None = None,
    ) -> None:
        from negalign_cli.settings import DeviceName

        self.ref = ref
        self.compile = compile  # `--compile` of the model built on first use (models.ImageTower)
        self.compile_cache = compile_cache
        self._entry = entry
        self._table = table
        self._loaded = loaded
        self._reporter = reporter or NullReporter()
        self.name = ref.name
        self.pretrained = ref.pretrained
        self.device = DeviceName(ref.device)
        self.precision = ref.precision

    # ---- identity, from the table
    @property
    def fingerprint(self) -> str:
        return str(self._entry["fingerprint"])

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:16]

    @property
    def weights(self) -> str:
        return self.ref.source.description

    @property
    def random_weights(self) -> bool:
        return self.ref.source.random

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._entry["config"])

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """As open_clip gives it (sizes and channel statistics as tuples; JSON kept them as lists)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self._entry["preprocess_cfg"].items()}

    @property
    def embed_dim(self) -> int:
        return int(self._entry["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self._entry["preprocess_cfg"]["size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _vision(self) -> dict[str, Any]:
        vision = self._entry.get("vision") or {}
        if "error" in vision:
            raise NegalignError(str(vision["error"]))
        return vision

    @property
    def vision_blocks(self) -> int:
        """The number of transformer blocks of the ViT image tower (a one-line error otherwise)."""
        return int(self._vision()["blocks"])

    @property
    def grid(self) -> tuple[int, int]:
        """The ViT image tower's patch grid (a one-line error for a tower Grad-CAM cannot use)."""
        grid = self._vision()["grid"]
        return (int(grid[0]), int(grid[1]))

    def describe(self) -> str:
        where = f"{self.device}, {self.precision}"
        return f"{self.name} ({self.weights}; fingerprint {self.short_fingerprint}; {where})"

    def image_transform(self) -> Any:
        """open_clip's evaluation preprocessing: from the preprocessing config, no model built
        (imports open_clip, so only a compute step calls it)."""
        if self._loaded is not None:
            return self._loaded.image_transform()
        from negalign_cli.models import preprocess_transform

        return preprocess_transform(self.preprocess_cfg)

    def row(self) -> dict[str, Any]:
        """The fingerprint table's row of this model."""
        return dict(self._entry)

    @property
    def built(self) -> bool:
        return self._loaded is not None

    # ---- the network, built on first use
    @property
    def loaded(self) -> Any:
        """The ``models.LoadedModel``, built now if it was not; its fingerprint is checked
        against the table's row."""
        if self._loaded is None:
            from negalign_cli.models import load_model

            loaded = load_model(
                self.ref.name,
                self.ref.pretrained,
                self.ref.device,
                self.ref.precision,
                compile=self.compile,
                compile_cache=self.compile_cache,
            )
            entry = table_entry(self.ref, loaded)
            if entry["fingerprint"] != self.fingerprint:
                if self._table is not None:
                    self._table.put(self.ref, entry)
                message = (
                    f"the fingerprint table ({TABLE_FILE} in the cache) had a stale entry for {self.name} "
                    f"({self.weights}): {self.short_fingerprint}, but the model built now is "
                    f"{loaded.short_fingerprint}; the entry is rewritten and nothing was stored under the "
                    "stale key: rerun the command"
                )
                self._reporter.warn(message)
                raise NegalignError(message)
            self._loaded = loaded
        return self._loaded

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_") or attribute in (
            "ref",
            "name",
            "pretrained",
            "device",
            "precision",
            "compile",
            "compile_cache",
        ):
            raise AttributeError(attribute)
        return getattr(self.loaded, attribute)


# rows built by a child process in this planning process, by (name, pretrained, precision): a
# `local-dir:` model has no table row to keep them
_ELSEWHERE: ContextVar[dict[tuple[str, str | None, str], dict[str, Any]] | None] = ContextVar(
    "negalign_fingerprint_elsewhere", default=None
)

# the child: plan_model as usual (builds the model on the CPU, writes its row), prints the row
_CHILD = """
import json, sys
from pathlib import Path
from negalign_cli.errors import NegalignError
from negalign_cli.modelref import plan_model
name, pretrained, cache_dir, precision = json.loads(sys.argv[1])
try:
    row = plan_model(name, pretrained, Path(cache_dir), "cpu", precision).row()
except NegalignError as exc:
    sys.stderr.write(f"error: {exc}\\n")
    sys.exit(2)
print(json.dumps(row))
"""


@contextmanager
def fingerprint_elsewhere() -> Iterator[None]:
    """Within this block, :func:`plan_model` builds a model the fingerprint table does not know in a
    child process (which writes the row, as a first run would) instead of in this one: planning
    imports no torch. For the ``launch`` driver, which only plans before it queues the shards."""
    token = _ELSEWHERE.set({})
    try:
        yield
    finally:
        _ELSEWHERE.reset(token)


def planning_elsewhere() -> bool:
    return _ELSEWHERE.get() is not None


def _row_from_child(name: str, pretrained: str | None, cache_dir: Path, precision: str) -> dict[str, Any]:
    """The table row of a model built by a child process (a user-fixable failure there, e.g.
    weights that cannot be found, is the same one-line error here)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([name, pretrained, str(cache_dir), precision])],
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        lines = done.stdout.strip().splitlines()
        try:
            row = json.loads(lines[-1]) if lines else None
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("fingerprint"), str):
            return row
    told = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if told:
        raise NegalignError(told[-1].removeprefix("error:").strip())
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise NegalignError(
        f"building {name} to fingerprint it failed in its own process (exit {done.returncode}): {last}"
    )


def plan_model(
    name: str,
    pretrained: str | None,
    cache_dir: Path,
    device: str = "cpu",
    precision: str = "fp32",
    reporter: Reporter | None = None,
    compile: str = DEFAULT_COMPILE,
) -> LazyModel:
    """The model of a command, for planning: from the fingerprint table when it has a row for it
    (nothing built, nothing imported), else built now and its row written (a first run, a changed
    checkpoint, a ``local-dir:`` model); under :func:`fingerprint_elsewhere`, built by a child
    process instead. ``compile`` is ``--compile``; compiled artifacts go to the cache's ``compiled``
    folder."""
    ref = resolve_ref(name, pretrained, device, precision)
    compile_cache = Path(cache_dir) / COMPILED_DIR
    table = FingerprintTable(cache_dir)
    entry = table.get(ref)
    if entry is not None:
        return LazyModel(ref, entry, table, reporter=reporter, compile=compile, compile_cache=compile_cache)
    built_elsewhere = _ELSEWHERE.get()
    if built_elsewhere is not None:
        known = (ref.name, ref.pretrained, ref.precision)
        if known not in built_elsewhere:
            built_elsewhere[known] = _row_from_child(name, pretrained, Path(cache_dir), ref.precision)
        row = built_elsewhere[known]
        return LazyModel(ref, row, table, reporter=reporter, compile=compile, compile_cache=compile_cache)
    from negalign_cli.models import load_model

    loaded = load_model(
        ref.name, ref.pretrained, ref.device, ref.precision, compile=compile, compile_cache=compile_cache
    )
    entry = table_entry(ref, loaded)
    table.put(ref, entry)
    return LazyModel(
        ref, entry, table, loaded=loaded, reporter=reporter, compile=compile, compile_cache=compile_cache
    )


if TYPE_CHECKING:
    from negalign_cli.models import LoadedModel

    AnyModel: TypeAlias = LoadedModel | LazyModel  # what stages take: built, or built on first use
