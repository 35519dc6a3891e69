"""Scoring's fused CPU passes in C (``assets/kernels/score_passes.c``), compiled on first use.

After a chunk's two matmuls, scoring reads every class and negative logit several times: maxima,
exp, group sums, the top classes and negatives. As torch operators each of these is a pass of its
own over cache-sized blocks, on one thread (see ``scores.BLOCK_FLOATS``); here one C loop per row
does them all, and the rows are split over the CPU threads (ctypes releases the GIL). The source
is compiled with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) the first
time a process needs it and kept under ``$NEGALIGN_KERNEL_DIR`` (default
``~/.cache/negalign/kernels``), named by a digest of the source, the flags, the compiler and the
CPU (``-march=native`` code must not run on another CPU model of a shared home directory).

Without a compiler, or with ``NEGALIGN_NATIVE=0``, scoring runs its torch operators: the same
numbers to float32 rounding (``docs/maths.md``: the exp polynomials and the order of the group
sums differ, both within 2 ulp of each term).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from negalign_cli.settings import user_cache_home

NATIVE_ENV = "NEGALIGN_NATIVE"  # 0: scoring's torch operators only
KERNEL_DIR_ENV = "NEGALIGN_KERNEL_DIR"
SOURCE = "score_passes.c"
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
# the first that compiles: OpenMP runs the rows on torch's own OpenMP threads (the loader gives this
# library the libgomp torch loaded), which wait spinning after each matmul: Python threads beside
# them found a core busy and were 1.2x faster than one thread, against 1.9x on an idle machine
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
COMPILE_TIMEOUT = 300.0
MIN_ROWS_PER_THREAD = 16  # fewer rows than this per thread: fewer threads

_i64, _f32, _f64, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_void_p, ctypes.c_int


def kernel_dir() -> Path:
    folder = os.environ.get(KERNEL_DIR_ENV)
    if folder:
        return Path(folder).expanduser()
    return user_cache_home() / "negalign" / "kernels"


def compiler() -> str | None:
    """The C compiler: ``$CC`` (its first word: a path or a name on PATH), else cc, gcc, clang."""
    named = os.environ.get("CC", "").split()
    for name in (named[:1] or []) + ["cc", "gcc", "clang"]:
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.platform() + platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _source() -> bytes:
    return (resources.files("negalign_cli.assets") / "kernels" / SOURCE).read_bytes()


def _compile(cc: str, source: bytes, target: Path) -> str | None:
    """Compiles ``source`` into ``target`` (atomically: a temporary file renamed); None, or why not."""
    target.parent.mkdir(parents=True, exist_ok=True)
    why = "no attempt"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src = Path(tmp) / SOURCE
        src.write_bytes(source)
        out = Path(tmp) / target.name
        for arch in VARIANTS:
            try:
                done = subprocess.run(
                    [cc, *FLAGS, *arch, str(src), "-o", str(out), "-lm"],
                    capture_output=True,
                    text=True,
                    timeout=COMPILE_TIMEOUT,
                )
            except (OSError, subprocess.SubprocessError) as error:
                return f"{cc}: {error}"
            if done.returncode == 0:
                os.replace(out, target)
                return None
            why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return f"{cc}: {why}"


@dataclass
class ScorePasses:
    """The compiled passes (see ``score_passes.c`` for their contracts), rows split over threads."""

    library: ctypes.CDLL
    path: Path

    def __post_init__(self) -> None:
        self._classes = self.library.negalign_class_pass
        self._classes.restype = ctypes.c_int
        self._classes.argtypes = [_ptr, _i64, _i64, _f32, _f64, _f64, _ptr, _ptr, _i64, _ptr, _ptr, _int]
        self._negatives = self.library.negalign_negative_pass
        self._negatives.restype = ctypes.c_int
        self._negatives.argtypes = [
            *(_ptr, _i64, _i64, _i64, _i64, _i64, _f32, _ptr, _i64),
            *(_ptr, _ptr, _ptr, _i64, _ptr, _ptr, _int),
        ]
        self.library.negalign_openmp.restype = ctypes.c_int
        self.openmp = bool(self.library.negalign_openmp())

    def _rows(self, call: Callable[[int, int, int], int], n: int, what: str) -> None:
        """Every row through ``call(lo, hi, threads)`` (0: done, else out of memory): one call on
        torch's thread count (OpenMP), or parts on as many Python threads."""
        failed: list[int] = []

        def run(lo: int, hi: int, threads: int) -> None:
            if call(lo, hi, threads):
                failed.append(1)

        if self.openmp:
            run(0, n, torch.get_num_threads())
        else:
            _python_threads(run, n, torch.get_num_threads())
        if failed:
            raise MemoryError(f"the {what} pass could not allocate its row buffers")

    def class_pass(
        self,
        pair: torch.Tensor,
        logit_scale: float,
        scales: tuple[float, float],
        maxima: torch.Tensor,
        sums: torch.Tensor,
        top: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Rows of ``pair`` (n, 2, K) float32, contiguous, [:, 0] the cosines: [:, 1] = logit_scale
        × cosine; ``maxima`` (n, 2) float32 and ``sums`` (n, 2) float64: each row's largest cosine
        and logit and Σ 2^((v − max) × scale); ``top``: the k largest logits and their classes
        (ties: the smaller class first)."""
        n, _, k_classes = pair.shape
        values, indices = top
        _check(pair, torch.float32, (n, 2, k_classes))
        _check(maxima, torch.float32, (n, 2))
        _check(sums, torch.float64, (n, 2))
        _check(values, torch.float32, (n, values.shape[1]))
        _check(indices, torch.int64, values.shape)
        k = values.shape[1]
        if k < 1:
            raise ValueError("the class pass needs k >= 1")

        self._rows(
            lambda lo, hi, threads: self._classes(
                _at(pair, lo), hi - lo, k_classes, logit_scale, scales[0], scales[1],
                _at(maxima, lo), _at(sums, lo), k, _at(values, lo), _at(indices, lo), threads,
            ),
            n,
            "class",
        )  # fmt: skip

    def negative_pass(
        self,
        logits: torch.Tensor,
        kept: int,
        groups: int,
        scale: float,
        maxes: torch.Tensor,
        sums: torch.Tensor,
        star: tuple[torch.Tensor, torch.Tensor] | None = None,
        top: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Rows of ``logits`` (n, M) float32 with unit column stride: ``maxes``/``sums`` (n, G)
        each group's maximum and Σ 2^(l × scale) over the first ``kept`` columns in ``groups``
        runs; ``star`` (columns, star_sums): the same sums over runs of the gathered columns;
        ``top`` (values, columns) (n, k): the k largest logits (ties: the smaller column first)."""
        n, m = logits.shape
        if logits.dtype != torch.float32 or (m > 1 and logits.stride(1) != 1) or logits.device.type != "cpu":
            raise ValueError("negative logits must be float32 rows with unit column stride, on the CPU")
        if groups < 1 or kept % groups or not 0 <= kept <= m:
            raise ValueError(f"{kept} kept columns do not split into {groups} groups")
        _check(maxes, torch.float32, (n, groups))
        _check(sums, torch.float32, (n, groups))
        columns, star_sums = star if star is not None else (None, None)
        n_star = 0
        if columns is not None and star_sums is not None:
            n_star = columns.shape[0]
            _check(columns, torch.int64, (n_star,))
            _check(star_sums, torch.float32, (n, groups))
            if n_star % groups or (n_star and not 0 <= int(columns.min()) <= int(columns.max()) < m):
                raise ValueError("M2's columns must split into the groups and lie within the logits")
        values, indices = top if top is not None else (None, None)
        k = 0
        if values is not None and indices is not None:
            k = values.shape[1]
            _check(values, torch.float32, (n, k))
            _check(indices, torch.int64, (n, k))
        star_at = None if columns is None else columns.data_ptr()
        self._rows(
            lambda lo, hi, threads: self._negatives(
                _at(logits, lo), hi - lo, logits.stride(0), m, kept, groups, scale, star_at, n_star,
                _at(maxes, lo), _at(sums, lo), _at(star_sums, lo), k, _at(values, lo), _at(indices, lo),
                threads,
            ),
            n,
            "negative",
        )  # fmt: skip


def _check(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape) or tensor.device.type != "cpu":
        got = f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        raise ValueError(f"expected a {dtype} CPU tensor of shape {tuple(shape)}, got {got}")
    if not tensor.is_contiguous():
        raise ValueError("expected a contiguous tensor")


def _at(tensor: torch.Tensor | None, row: int) -> int | None:
    """The address of ``tensor``'s row ``row`` (None stays None)."""
    if tensor is None:
        return None
    return tensor.data_ptr() + row * tensor.stride(0) * tensor.element_size()


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _python_threads(run: Callable[[int, int, int], None], n: int, threads: int) -> None:
    """``run(lo, hi, 1)`` over contiguous parts of ``range(n)`` on ``threads`` Python threads (a
    library built without OpenMP); the calling thread takes the first part."""
    global _pool, _pool_size
    threads = max(1, min(threads, n // MIN_ROWS_PER_THREAD))
    if threads == 1:
        run(0, n, 1)
        return
    bounds = [n * t // threads for t in range(threads + 1)]
    with _pool_lock:
        if _pool is None or _pool_size < threads - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="negalign-passes")
            _pool_size = threads - 1
        pool = _pool
    futures = [pool.submit(run, bounds[t], bounds[t + 1], 1) for t in range(1, threads)]
    try:
        run(bounds[0], bounds[1], 1)
    finally:
        for future in futures:
            future.result()


class NativeUnavailable(RuntimeError):
    pass


@functools.cache
def load() -> ScorePasses | None:
    """The compiled passes, or None (``NEGALIGN_NATIVE=0``, no C compiler, or a compile that
    failed: :func:`why_not` says which). Compiles at most once per process and source."""
    try:
        return _load()
    except NativeUnavailable as error:
        _reason[0] = str(error)
        return None


_reason = ["loaded"]


def why_not() -> str:
    """Why :func:`load` gave None (after it did), or "loaded"."""
    return _reason[0]


def describe() -> str:
    """Which passes scoring runs after its matmuls on a CPU, for ``-v`` and the bench's JSON."""
    passes = load()
    if passes is None:
        return f"torch operators ({why_not()})"
    threads = "OpenMP threads" if passes.openmp else "Python threads"
    return f"fused C passes on {threads} ({passes.path})"


def _load() -> ScorePasses:
    if os.environ.get(NATIVE_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        raise NativeUnavailable(f"{NATIVE_ENV}=0")
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler ($CC, cc, gcc or clang)")
    source = _source()
    digest = hashlib.sha256()
    for part in (source, " ".join(FLAGS + sum(VARIANTS, ())).encode(), cc.encode(), _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    target = kernel_dir() / f"score_passes-{digest.hexdigest()[:24]}.so"
    for attempt in range(2):
        if not target.exists():
            try:
                why = _compile(cc, source, target)
            except OSError as error:  # a read-only or full kernel folder
                why = f"{target.parent}: {error.strerror or error}"
            if why is not None:
                raise NativeUnavailable(f"compiling the scoring kernels failed: {why}")
        try:
            passes = ScorePasses(ctypes.CDLL(str(target)), target)
        except OSError as error:  # a truncated or foreign file: build it again, once
            if attempt:
                raise NativeUnavailable(f"loading {target} failed: {error}") from error
            target.unlink(missing_ok=True)
            continue
        _self_check(passes)
        return passes
    raise NativeUnavailable("unreachable")


def _self_check(passes: ScorePasses) -> None:
    """One small call of each pass against torch: a library that runs but computes wrongly (a
    miscompile, a foreign file under our name) is refused rather than trusted."""
    logits = torch.tensor([[0.0, 1.0, -3.0, 2.0, 0.5, -1.0]])
    maxes, sums = torch.empty(1, 2), torch.empty(1, 2)
    top = (torch.empty(1, 2), torch.empty(1, 2, dtype=torch.int64))
    passes.negative_pass(logits, 6, 2, 1.0, maxes, sums, top=top)
    expected = torch.exp2(logits.double()).view(1, 2, 3).sum(-1)
    pair = torch.tensor([[[0.25, 0.5, -0.5], [0.0, 0.0, 0.0]]])
    maxima, class_sums = torch.empty(1, 2), torch.empty(1, 2, dtype=torch.float64)
    class_top = (torch.empty(1, 1), torch.empty(1, 1, dtype=torch.int64))
    passes.class_pass(pair, 2.0, (1.0, 1.0), maxima, class_sums, class_top)
    cos = pair[0, 0].double()
    class_expected = [torch.exp2(scale * (cos - cos.max())).sum().item() for scale in (1, 2)]
    ok = (
        maxes.tolist() == [[1.0, 2.0]]
        and torch.allclose(sums.double(), expected, rtol=1e-6)
        and top[0].tolist() == [[2.0, 1.0]]
        and top[1].tolist() == [[3, 1]]
        and pair[0, 1].tolist() == [0.5, 1.0, -1.0]
        and maxima.tolist() == [[0.5, 1.0]]
        and torch.allclose(class_sums[0], torch.tensor(class_expected, dtype=torch.float64), rtol=1e-14)
        and class_top[0].tolist() == [[1.0]]
        and class_top[1].tolist() == [[1]]
    )
    if not ok:
        raise NativeUnavailable(f"{passes.path} computes wrong values; delete it or set {NATIVE_ENV}=0")
