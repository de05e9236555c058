"""A fused CPU kernel for the soft-attention step of the scoring engine (SCAN).

:func:`itm.models.align.engine.attend_cosine` computes SCAN's per-query cosines of a block with
about ten tensor passes over the ``[Bc, Kc, N]`` score tensor; that memory traffic costs as much
as 0.6-0.7x of the block's matrix product on a 2-core CPU (``bench/bench_scoring.py``). The C
kernel in ``_attend.c`` does the same computation per context set and 16 query sets at a time,
reading each score once from memory and keeping the rest in registers, so SCAN scoring runs
close to the cost of its matrix product.

The kernel is compiled at first use with the system C compiler (``$CC``, else ``cc``; tested
with gcc 12) into ``$ITM_CACHE_DIR`` (default ``~/.cache/itm``), keyed by the source,
the flags, the compiler and the CPU, written atomically, and loaded with ctypes. Nothing is
needed at install time. Where no compiler is found, the build fails, or ``ITM_FUSED=0`` is set,
:func:`attend_cosine_fused` returns None and the engine uses the tensor kernel (same results
within float32 rounding; a warning says why once per process). Only float32 tensors on the CPU
take this path; float64 and GPU tensors use the tensor kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_attend.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")  # an x86-only flag (AVX-512 where available)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def enabled() -> bool:
    """False when ``ITM_FUSED`` is set to ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get("ITM_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("ITM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "itm"
    )
    return Path(root) / "kernels"


def _cpu_key() -> str:
    """The CPU's model and feature flags (``-march=native`` code must not move between CPUs)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def build(verbose: bool = False) -> Path:
    """Compile ``_attend.c`` into the cache (if not there yet) and return the library's path.

    Raises RuntimeError naming the compiler and its output when the build fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.split("\n", 1)[0]
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{cc} --version failed: {err}") from err
    src = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [src, " ".join(FLAGS).encode(), cc.encode(), version.encode(), _cpu_key().encode()]
        )
    ).hexdigest()[:16]
    out = cache_dir() / f"itm_attend_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run(
            [cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"{cc} failed to build {SOURCE.name} (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-2000:]}"
            )
        os.replace(tmp, out)  # atomic: a concurrent process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if verbose:
        print(f"built {out}")
    return out


def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None when unavailable (warns once)."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        try:
            lib = ctypes.CDLL(str(build()))
            i64, fp = ctypes.c_int64, ctypes.c_void_p
            for fn in (lib.itm_attend_f32, lib.itm_attend_bf16):
                fn.argtypes = [fp, i64, i64, i64, fp, i64, fp, fp, ctypes.c_float]
                fn.argtypes += [ctypes.c_float, fp, i64, i64]
                fn.restype = ctypes.c_int
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _failed = str(err)
            warnings.warn(
                f"itm: the fused attention kernel is unavailable ({_failed}); scoring uses the "
                "tensor kernel (same results, slower). Set ITM_FUSED=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _lib


def reset() -> None:
    """Forget the loaded library and any build failure (tests)."""
    global _lib, _failed
    with _lock:
        _lib, _failed = None, None


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="itm-attend"), n
    return _pool


def usable(s: Tensor) -> bool:
    """Whether the fused kernel may score ``s`` (float32 or bfloat16 on the CPU, not
    disabled)."""
    return s.dtype in (torch.float32, torch.bfloat16) and s.device.type == "cpu" and enabled()


def attend_cosine_fused(
    s: Tensor,
    n_query_sets: int,
    ctx_gram: Tensor,
    ctx_mask: Tensor,
    query_sq: Tensor,
    kind: str,
    lambda_softmax: float,
) -> Tensor | None:
    """Per-query cosines of SCAN soft attention as a ``[Bc, Lq, Bq]`` view of a query-set-major
    ``[Bc, Bq, Lq]`` tensor (ready to pool over items), or None (use the tensor path).

    Same contract as :func:`itm.models.align.engine.attend_cosine` without a ``select`` hook:
    ``s [Bc, Kc, Lq*Bq]`` raw scores, float32 or bfloat16 (query items item-major; padded
    queries zero; the result is float32 either way),
    ``ctx_gram [Bc, >=Kc, Kc]`` context Gram matrices (extra rows such as
    :func:`~itm.models.align.engine.context_gram`'s ones row are ignored), ``ctx_mask [Bc, Kc]``
    bool, ``query_sq [Lq, Bq]``, ``kind`` ``clipped_l2norm`` or ``l2norm``.
    """
    if not usable(s) or kind not in ("clipped_l2norm", "l2norm"):
        return None
    lib = load()
    if lib is None:
        return None
    bc, kc, n = s.shape
    bq = n_query_sets
    lq = n // bq
    s = s.contiguous()
    gram = ctx_gram.to(torch.float32)
    if gram.stride(2) != 1 or gram.stride(1) != kc:
        gram = gram.contiguous()
    mask = ctx_mask.to(torch.uint8).contiguous()
    qsq = query_sq.to(torch.float32).contiguous()
    out = torch.empty(bc, bq, lq, dtype=torch.float32)
    kernel = lib.itm_attend_f32 if s.dtype == torch.float32 else lib.itm_attend_bf16
    slope = 0.1 if kind == "clipped_l2norm" else 1.0
    args = (s.data_ptr(), kc, lq, bq, gram.data_ptr(), gram.stride(0), mask.data_ptr())
    args += (qsq.data_ptr(), slope, float(lambda_softmax), out.data_ptr())
    n_threads = max(1, min(torch.get_num_threads(), bc))
    if n_threads == 1:
        status = [kernel(*args, 0, bc)]
    else:
        bounds = [bc * i // n_threads for i in range(n_threads + 1)]
        status = list(
            _executor(n_threads).map(
                lambda i: kernel(*args, bounds[i], bounds[i + 1]), range(n_threads)
            )
        )
    return out.transpose(1, 2) if all(st == 0 for st in status) else None
