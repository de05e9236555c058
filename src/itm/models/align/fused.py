"""A fused CPU kernel for the soft-attention step of the scoring engine (SCAN).

:func:`itm.models.align.engine.attend_cosine` computes SCAN's per-query cosines of a block with
about ten tensor passes over the ``[Bc, Kc, N]`` score tensor; that memory traffic costs as much
as 0.6-0.7x of the block's matrix product on a 2-core CPU (``bench/bench_scoring.py``). The C
kernel in ``_attend.c`` does the same computation per context set and 16 query sets at a time,
reading each score once from memory and keeping the rest in registers, so SCAN scoring runs
close to the cost of its matrix product.

The kernel is compiled at first use with the system C compiler (``$CC``, else ``cc``; tested
with gcc 12) for the CPU it runs on (``-march=native``; ``-mcpu=native`` on ARM), written
atomically into ``$ITM_CACHE_DIR/kernels`` (default ``~/.cache/itm/kernels``) and loaded with
ctypes. Nothing is needed at install time. Where no compiler is found, the build fails, or
``ITM_FUSED=0`` is set, :func:`attend_cosine_fused` returns None and the engine uses the tensor
kernel (same results within float32 rounding; a warning says why once per process). Only float32
tensors on the CPU take this path; float64 and GPU tensors use the tensor kernel.

Why a first-use build and not a compiled wheel: ``-march=native`` code for the researcher's own
CPU is what makes the kernel fast (AVX-512 where present), a pure-Python wheel installs on every
platform, and a machine without a compiler loses nothing but speed. What makes the cache safe:

- the cache key covers the source, the flags, the compiler and its version, the instruction-set
  macros the compiler defines for ``-march=native`` here, and the CPU's own feature list
  (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS): a binary built for AVX-512 is never loaded
  on a CPU without it (a shared home directory across cluster nodes gets one file per CPU kind);
- a read-only or unusable cache directory falls back to a private per-user directory under the
  system's temporary directory (a kernel already present in the read-only cache is still used);
- a file lock makes processes that start together (DDP ranks, DataLoader workers, a sweep)
  build once and the others wait and load that file;
- the worker threads that split a block between cores are forgotten in a forked child
  (``os.register_at_fork``), which starts its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from itm.io import atomic_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock (and no cc/gcc toolchain either)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_attend.c")
_ARM = platform.machine().lower() in ("arm64", "aarch64")
FLAGS = ["-O3", "-mcpu=native" if _ARM else "-march=native", "-fno-math-errno", "-fPIC", "-shared"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.insert(2, "-mprefer-vector-width=512")  # an x86-only flag (AVX-512 where available)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _after_fork_in_child() -> None:
    """A forked child inherits the pool object but not its threads: forget it (and the lock,
    which another thread may have held at the fork)."""
    global _pool, _pool_size, _lock
    _pool, _pool_size = None, 0
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def enabled() -> bool:
    """False when ``ITM_FUSED`` is set to ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get("ITM_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """The configured kernel cache: ``$ITM_CACHE_DIR/kernels`` (default ``~/.cache/itm``)."""
    root = os.environ.get("ITM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "itm"
    )
    return Path(root) / "kernels"


def fallback_cache_dir() -> Path:
    """A private per-user directory under the system's temporary directory."""
    uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"itm-{uid}" / "kernels"


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> str:
    """The first processor's identity and feature lines of a Linux ``/proc/cpuinfo`` (x86:
    ``model name``, ``flags``; ARM: ``CPU implementer`` / ``part``, ``Features``)."""
    keys = ("vendor_id", "model name", "flags", "cpu implementer", "cpu part", "features")
    found: dict[str, str] = {}
    with open(path) as fh:
        for line in fh:
            name, sep, value = line.partition(":")
            name = name.strip().lower()
            if sep and name in keys and name not in found:
                found[name] = " ".join(value.split())
    return "\n".join(f"{k}: {found[k]}" for k in keys if k in found)


def cpu_features() -> str:
    """The CPU's model and feature flags as the OS reports them: Linux ``/proc/cpuinfo``,
    macOS ``sysctl`` (``machdep.cpu.*`` on Intel, ``hw.optional`` on Apple silicon); elsewhere
    the platform's processor string."""
    system = platform.system()
    if system == "Linux":
        with contextlib.suppress(OSError):
            return read_cpuinfo()
    if system == "Darwin":
        parts = [
            _run(["sysctl", "-n", f"machdep.cpu.{k}"])
            for k in ("brand_string", "features", "leaf7_features")
        ]
        parts.append(_run(["sysctl", "hw.optional"]))
        text = "\n".join(p.strip() for p in parts if p.strip())
        if text:
            return text
    return f"{platform.processor()} {platform.machine()}"


def native_macros(cc: str) -> str:
    """The predefined macros of ``cc`` with this module's target flags (``__AVX512F__``, ...):
    the instruction sets the compiled kernel may use on this CPU."""
    target = [f for f in FLAGS if "native" in f]
    return "\n".join(sorted(_run([cc, *target, "-dM", "-E", "-x", "c", os.devnull]).splitlines()))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def kernel_name(cc: str) -> str:
    """The cache file name of the kernel built by ``cc`` for this CPU (see the module doc)."""
    version = _run([cc, "--version"]).split("\n", 1)[0]
    if not version:
        raise RuntimeError(f"{cc} --version failed")
    parts = [
        SOURCE.read_bytes(),
        " ".join(FLAGS).encode(),
        cc.encode(),
        version.encode(),
        native_macros(cc).encode(),
        cpu_features().encode(),
    ]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return f"itm_attend_{digest}.so"


def _usable_dir(directory: Path, private: bool) -> Path:
    """``directory`` created. A ``private`` one (``<tmp>/itm-<uid>/kernels``) and its parent
    must be ours and not writable by others, since a library loaded from there runs as our code.
    Raises OSError when unusable."""
    if private:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if private and hasattr(os, "getuid"):
        for d in (directory.parent, directory):
            st = d.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise PermissionError(f"{d} is not a private directory of this user")
    return directory


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created; kept afterwards), held while in the block."""
    with open(path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _compile(cc: str, out: Path) -> None:
    """Compile ``SOURCE`` into ``out`` atomically (:func:`itm.io.atomic_path`: a concurrent reader
    sees no file or the whole file; a failed build leaves nothing)."""
    with atomic_path(out) as tmp:
        res = subprocess.run(
            [cc, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"{cc} failed to build {SOURCE.name} (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-2000:]}"
            )


def build(verbose: bool = False) -> Path:
    """Compile ``_attend.c`` into the cache (if not there yet) and return the library's path.

    The first usable of :func:`cache_dir` and :func:`fallback_cache_dir` receives the build,
    under a lock (one build when processes start together); a kernel already in either is
    reused. Raises RuntimeError naming the compiler and its output when the build fails, or the
    directories tried when none is writable."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    name = kernel_name(cc)
    candidates = [(cache_dir(), False), (fallback_cache_dir(), True)]
    for directory, _ in candidates:
        if (directory / name).is_file():
            return directory / name
    problems = []
    for directory, private in candidates:
        try:
            _usable_dir(directory, private)
            lock = _file_lock(directory / f".{name}.lock")
            lock.__enter__()
        except OSError as err:
            problems.append(f"{directory}: {err.strerror or err}")
            continue
        try:
            out = directory / name
            if not out.is_file():  # another process may have built it while we waited
                if problems:
                    log.warning(
                        "kernel cache %s", "; ".join(problems) + f"; building in {directory}"
                    )
                _compile(cc, out)
                (log.info if verbose else log.debug)("built %s", out)
            return out
        finally:
            lock.__exit__(None, None, None)
    raise RuntimeError("no writable kernel cache directory (" + "; ".join(problems) + ")")


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
    args: tuple[int | float, ...] = (s.data_ptr(), kc, lq, bq, gram.data_ptr(), gram.stride(0))
    args += (mask.data_ptr(),)
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
