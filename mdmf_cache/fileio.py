"""Atomic file writes for run outputs (configs, results, checkpoints), with a clear message when the disk is full,
and the OS file lock that keeps a second writer out of a cache or a run directory.

A kill or a full disk in the middle of a write leaves the previous file (or none), never a truncated
one: the content goes to ``NAME.tmp`` beside the target, then ``os.replace`` renames it, which is
atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mdmf_cache.errors import MdmfError

__all__ = ["DiskFullError", "raise_if_disk_full", "atomic_write_file", "atomic_write_text", "atomic_write_json",
           "atomic_torch_save", "process_lock", "writing"]

_LOW_SPACE = 64 << 20  # below this much free space a failed write is reported as a full disk


class DiskFullError(MdmfError, OSError):
    """No space left where a file was being written (names the path and the free space)."""


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    except OSError:
        return -1


def raise_if_disk_full(path: Path | str, err: BaseException) -> None:
    """Raise :class:`DiskFullError` naming ``path`` and the free space if ``err`` came from a full disk."""
    path = Path(path)
    free = _free(path)
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or 0 <= free < _LOW_SPACE:
        raise DiskFullError(
            f"disk full while writing {path} ({free / 1e6:.0f} MB free on its file system); free some space "
            "and rerun the same command (finished work is kept)"
        ) from err


def _replace(tmp: Path, path: Path, write) -> None:
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            raise_if_disk_full(path, err)
        raise


def atomic_write_file(path: Path | str, write) -> Path:
    """``write(tmp)`` writes the content to ``tmp`` (``path.tmp``), renamed to ``path`` once complete;
    on any failure (a kill included) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    _replace(path.with_name(path.name + ".tmp"), path, write)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (``path.tmp`` then rename)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write_file(path, write)


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """``json.dumps(obj, indent=2)`` to ``path``, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_write_csv(path: Path | str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    """``rows`` as CSV to ``path``, atomically; ``columns`` default to every key of the rows, in order of appearance."""
    import csv
    import io

    cols = columns if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """``torch.save`` to ``path`` atomically; a full disk is a :class:`DiskFullError`, not a torch enforce error."""
    import torch

    return atomic_write_file(path, lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Writes to ``path`` (not atomic: an append, numpy's savez): a full disk is a :class:`DiskFullError` naming it,
    and any other OSError names ``path`` when it named no file (``write`` errors carry none)."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        raise_if_disk_full(path, err)
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


@contextlib.contextmanager
def process_lock(lock: Path, busy: Callable[[str], BaseException],
                 unwritable: Callable[[OSError], BaseException]) -> Iterator[None]:
    """Hold ``lock`` (an OS file lock on that file, released when the process ends, a kill included).

    The holder writes ``pid N on HOST, started HH:MM:SS`` into the file. A second process is refused at
    once with ``busy(holder)``; a file that cannot be opened raises ``unwritable(err)``. Whoever holds the
    lock may delete the file before leaving (an empty run directory removed): a process that opened the
    deleted file takes the lock on the file that is there now instead.
    """
    import fcntl

    while True:
        try:
            f = open(lock, "a+")
        except OSError as e:
            raise unwritable(e) from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder writes its pid right after it takes the lock
                f.seek(0)
                holder = f.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            f.close()
            raise busy(holder or "another process") from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the file was deleted by the previous holder while we opened it: lock the current one
    with f:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
