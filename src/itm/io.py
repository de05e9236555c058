"""Atomic file output: every file itm writes appears under its final name only when complete.

A writer gets a temporary file in the SAME directory as the target (``.<name>.tmp-<pid>-<rand>``,
hidden, so globs such as ``*.ckpt`` / ``*.npy`` never match it); on success the data are flushed
and ``fsync``-ed, the temporary file is renamed over the target with :func:`os.replace` (atomic on
POSIX and Windows within one file system) and the directory entry is ``fsync``-ed. On any error,
``KeyboardInterrupt`` included, the temporary file is removed and the target is left as it was
(absent, or its previous complete content). A process killed with SIGKILL can leave only a
temporary file behind, never a partial file under the final name; :func:`remove_stale_temps`
clears such leftovers of dead processes.

Usage::

    from itm.io import atomic_write, atomic_path

    with atomic_write(out_dir / "results.json", "w") as fh:     # a file object
        json.dump(results, fh)

    with atomic_write(out_dir / "sims.npy") as fh:              # binary by default
        np.save(fh, sims)

    with atomic_path(out_dir / "store.h5") as tmp:              # for libraries that want a name
        with h5py.File(tmp, "w") as f:
            ...
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "is_temp_name", "remove_stale_temps", "temp_name"]

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def temp_name(path: str | Path) -> Path:
    """A fresh temporary name next to ``path``: ``<dir>/.<name>.tmp-<pid>-<random hex>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(path: str | Path) -> bool:
    """Whether ``path`` is a temporary name made by :func:`temp_name`."""
    return _TMP_RE.match(Path(path).name) is not None


def _fsync(path: Path) -> None:
    """fsync a file, or a directory to make a rename in it durable (best effort: not every
    platform / file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    For libraries that open the file themselves (h5py, ``shutil.copyfile``). The caller must
    have closed the file when the ``with`` block ends. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: nothing was written to {tmp} (for {path})")
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(
    path: str | Path,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
    fsync: bool = True,
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; rename it to ``path`` on success.

    Args:
        path: the final name.
        mode: ``"wb"`` (default) or ``"w"`` (text; ``encoding`` defaults to UTF-8).
        encoding, newline: as for :func:`open` (text mode only).
        fsync: flush the data and the directory entry to disk before returning.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(
            f"atomic_write writes a whole new file: mode must be 'w' or 'wb', got {mode!r}"
        )
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with (
        atomic_path(path, fsync=False) as tmp,
        open(tmp, mode, encoding=encoding, newline=newline) as fh,
    ):
        yield fh
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    if fsync:
        _fsync(Path(path).parent)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` left in ``directory`` by processes
    that no longer run (a run killed while writing). Returns the removed paths."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TMP_RE.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group("pid"))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
