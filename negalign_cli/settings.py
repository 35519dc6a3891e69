"""Resolution of the options every command shares: cache folder, device, precision.

torch is imported only where a device or dtype is resolved, so that the CLI starts without it.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from negalign_cli.defaults import CACHE_ENV, DEFAULT_CACHE_DIR, DEVICE_ENV, PRECISIONS
from negalign_cli.errors import NegalignError

if TYPE_CHECKING:
    import torch

__all__ = ["CACHE_ENV", "DEVICE_ENV", "Runtime", "resolve_cache_dir", "resolve_device", "resolve_precision"]


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (``fp32``, ``fp16``, ``bf16``)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$NEGALIGN_CACHE``, else ``./.negalign-cache``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    path = Path(chosen).expanduser()
    if path.exists() and not path.is_dir():
        raise NegalignError(f"cache folder {path} exists and is not a folder")
    return path


def user_cache_home() -> Path:
    """The user's cache folder for tools: ``$XDG_CACHE_HOME``, else ``~/.cache``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


SCRATCH = "scratch"  # under the cache root: one folder of temporary files per running command
SCRATCH_OWNER = ".owner.lock"  # held by the command for its lifetime: gc removes only free folders
_held: dict[str, Any] = {}  # the owner locks of this process (kept referenced, so they stay held)


def _remove_scratch(folder: Path, owner: Any) -> None:
    owner.release()
    shutil.rmtree(folder, ignore_errors=True)


# DataLoader workers pass tensors through a Unix socket that multiprocessing creates under the
# temporary folder (…/pymp-xxxxxxxx/listener-xxxxxxxx); a socket path longer than 107 bytes cannot
# be bound, and the worker's result is then lost. The cache's scratch folder is used only when
# that path stays short enough; otherwise temporary files stay in the system's temporary folder.
MAX_SCRATCH_PATH = 70


def contain_writes(cache_dir: Path) -> None:
    """Keep a command's side files under its cache: temporary files (DataLoader workers'
    ``pymp-*`` folders included) in ``<cache>/scratch/<pid>`` when that path is short enough for a
    Unix socket (``MAX_SCRATCH_PATH``), matplotlib's font cache in ``<cache>/matplotlib``."""
    import tempfile

    from filelock import FileLock

    os.environ.setdefault("MPLCONFIGDIR", str((cache_dir / "matplotlib").resolve()))
    scratch = cache_dir / SCRATCH / str(os.getpid())
    if len(os.fsencode(scratch.resolve())) > MAX_SCRATCH_PATH:
        return
    if str(scratch) not in _held:  # a second command in the same process reuses its folder
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            owner = FileLock(str(scratch / SCRATCH_OWNER))
            owner.acquire()
        except OSError:
            return  # an unwritable cache is reported by the command that needs it, in one line
        _held[str(scratch)] = owner
        atexit.register(_remove_scratch, scratch, owner)
    os.environ["TMPDIR"] = str(scratch.resolve())
    tempfile.tempdir = str(scratch.resolve())


# …/pymp-xxxxxxxx/listener-xxxxxxxx adds 32 bytes to the temporary folder; a socket path holds 107
UNIX_SOCKET_PATH_MAX, LISTENER_SUFFIX = 107, 32
SHORT_TEMP_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")


def loader_sharing(workers: int) -> None:
    """Before DataLoader workers start: they pass tensors through a Unix socket under the
    temporary folder, and with a ``TMPDIR`` too long a path for one, every worker's first batch was
    lost and the command waited for the loader's timeout (10 minutes). Then this process's
    temporary files go to a private folder under the first writable of ``SHORT_TEMP_ROOTS``
    (removed at exit); with none, one clear error."""
    if workers <= 0:
        return
    import tempfile

    longest = UNIX_SOCKET_PATH_MAX - LISTENER_SUFFIX
    current = tempfile.gettempdir()
    if len(os.fsencode(current)) <= longest:
        return
    for root in SHORT_TEMP_ROOTS:
        if len(os.fsencode(root)) + 20 > longest or not os.access(root, os.W_OK | os.X_OK):
            continue
        try:
            folder = tempfile.mkdtemp(prefix="negalign-", dir=root)
        except OSError:
            continue
        atexit.register(shutil.rmtree, folder, True)
        os.environ["TMPDIR"] = folder
        tempfile.tempdir = folder
        return
    raise NegalignError(
        f"the temporary folder {current} is too long a path for DataLoader workers' socket "
        f"({len(os.fsencode(current))} bytes, at most {longest}): set TMPDIR to a shorter folder, "
        "or use --workers 0"
    )


def resolve_device(device: str | None = None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:i``. Under torchrun
    (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean this process's own GPU, ``cuda:LOCAL_RANK``."""
    import torch

    name = (device or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    local_rank = os.environ.get("LOCAL_RANK", "")
    if name in ("auto", "cuda") and local_rank.isdigit() and torch.cuda.is_available():
        name = f"cuda:{int(local_rank) % max(1, torch.cuda.device_count())}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise NegalignError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise NegalignError(f"device {name} asked for, but CUDA is not available here: use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise NegalignError(
            f"device {name} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return torch.device("cuda", index)


class DeviceName(str):
    """A device as torch spells it (``cpu``, ``cuda``, ``cuda:1``), known without importing torch:
    a ``str``, so torch takes it wherever it takes a device name, with a ``type`` like
    ``torch.device``'s."""

    @property
    def type(self) -> str:
        return self.split(":", 1)[0]


def no_gpu_driver() -> bool:
    """True when this machine has no GPU driver torch could use: no NVIDIA driver
    (``/proc/driver/nvidia``, ``/dev/nvidia*``) and no ROCm one (``/dev/kfd``). CUDA is then
    unavailable for sure, and ``auto`` means the CPU without asking torch."""
    if os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/kfd"):
        return False
    try:
        return not any(name.startswith("nvidia") for name in os.listdir("/dev"))
    except OSError:
        return False


def resolve_device_name(device: str | None = None) -> DeviceName:
    """:func:`resolve_device` without importing torch where the answer is sure: ``cpu`` always, and
    ``auto`` on a machine with no GPU driver (:func:`no_gpu_driver`). Anything else asks torch."""
    name = (device or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if name == "cpu" or (name == "auto" and no_gpu_driver()):
        return DeviceName("cpu")
    if name != "auto" and not re.fullmatch(r"cuda(?::(\d+))?", name):
        raise NegalignError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if no_gpu_driver():
        raise NegalignError(f"device {name} asked for, but CUDA is not available here: use --device cpu")
    return DeviceName(str(resolve_device(device)))


def check_precision_on(precision: str, device: str) -> str:
    """The normalised precision name, checked against the device (no torch): fp16 only on CUDA."""
    key = check_precision(precision)
    if key == "fp16" and DeviceName(device).type != "cuda":
        raise NegalignError("--precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    return key


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """fp32 everywhere; fp16 only on CUDA (CPU kernels for it are slow or missing); bf16 anywhere."""
    return torch_dtype(check_precision_on(precision, str(device)))


def check_precision(precision: str) -> str:
    """The normalised precision name, or a one-line error naming the valid ones."""
    key = precision.strip().lower()
    if key not in PRECISIONS:
        raise NegalignError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    return key


@dataclass(frozen=True)
class Runtime:
    """Where and how a command runs; built once by the CLI from flags, environment and defaults."""

    cache_dir: Path
    device: DeviceName  # resolved without torch where possible (resolve_device_name)
    precision: str
    batch_size: int

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.precision)

    @classmethod
    def create(
        cls,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 256,
    ) -> Runtime:
        if batch_size < 1:
            raise NegalignError(f"--batch-size must be at least 1 (got {batch_size})")
        resolved_device = resolve_device_name(device)
        check_precision_on(precision, resolved_device)
        return cls(resolve_cache_dir(cache_dir), resolved_device, precision.strip().lower(), batch_size)
