"""One copy of a cache's features for the processes of one machine (a sweep's ``--jobs`` workers).

The parent reads each split once (:func:`mdmf_cache.store.read.read_split`, block by block) straight into a file in
shared memory: ``/dev/shm``, or the temporary directory where that is missing or too small (a file there is
shared through the page cache all the same). It hands every worker a :class:`SharedSplit`: the file's name and
the split's small arrays (labels, ids, classes, text). A worker maps the file copy-on-write, a writable mapping
that nothing writes (a write would stay in that process, never reach the others), and builds its
:class:`~mdmf_cache.store.read.FeatureSplit` on it with ``torch.frombuffer``: no copy is made.

Clean-up: once every worker has mapped its files the parent removes their names (:meth:`SharedFeatures.unlink`),
so the memory goes with the last process that maps it, whatever ends them, a SIGKILL included;
:meth:`SharedFeatures.close` (every exit path of the parent, Ctrl-C included) removes the names left and unmaps
the parent's view. Files a killed parent left before its workers mapped them (named after its host and pid)
are removed by the next :class:`SharedFeatures` on that host, and multiprocessing's semaphores (``sem.mp-*``) that
a sweep killed with all its processes left, which no live process has open, by the next ``--jobs`` sweep
(:func:`remove_stale_semaphores`).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdmf_cache.store.read import FeatureSplit, read_split

log = logging.getLogger(__name__)

PREFIX = "mdmf-features-"
MARGIN = 64 << 20  # bytes left free in the chosen directory beyond the file
_NAME = re.compile(rf"^{re.escape(PREFIX)}(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}-[^-]+$")


def directories() -> list[Path]:
    """Where a shared file may go, in order of preference."""
    return [Path("/dev/shm"), Path(tempfile.gettempdir())]


@dataclass
class SharedSplit:
    """A split in a shared file: what a worker needs to map it (picklable; the features are not in it)."""

    cache: str  # the cache's resolved path
    split: str
    file: str  # holds the features, C order
    shape: tuple[int, ...]  # (N, V, T, D)
    dtype: str  # numpy's name, e.g. "float16"
    labels: np.ndarray  # (N,) int64
    video_ids: list[str]
    classes: list[str]
    class_names: list[str]
    text: np.ndarray  # (C, D) float32

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class NoRoom(Exception):
    """No directory of :func:`directories` has room for a split's features."""


class SharedFeatures:
    """The parent's side: ``splits`` of ``cache`` read once into shared files.

    Use as a context manager (``close`` on exit); ``.splits`` are the handles for the workers.

    Raises:
        NoRoom: no directory has room for the features (nothing is left behind).
        CacheError: as :func:`mdmf_cache.store.read.load_split_features`.
    """

    def __init__(self, cache: str | Path, splits: tuple[str, ...]) -> None:
        self.files: list[Path] = []
        self._maps: list[mmap.mmap] = []
        self.splits: list[SharedSplit] = []
        self.unlinked = False
        self.tag = f"{PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        remove_stale()
        try:
            for name in splits:
                fs = read_split(cache, name, allocate=lambda shape, dtype, n=name: self._allocate(n, shape, dtype))
                self.splits.append(SharedSplit(str(Path(cache).resolve()), name, str(self.files[-1]),
                                               tuple(int(x) for x in fs.features.shape), fs.features.dtype.name,
                                               fs.labels, fs.video_ids, fs.classes, fs.class_names, fs.text))
                del fs  # the view of the mapping: ``close`` unmaps it
        except BaseException:
            self.close()
            raise

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.splits)

    def _allocate(self, split: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        size = max(1, count * np.dtype(dtype).itemsize)
        for folder in directories():
            path = folder / f"{self.tag}-{split}"
            try:
                if not folder.is_dir() or _free(folder) < size + MARGIN:
                    continue
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError:
                continue
            self.files.append(path)
            try:
                if hasattr(os, "posix_fallocate"):  # reserved now: a full tmpfs is an error here, not a SIGBUS later
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)  # shared, read-write: the rows are written through it
            except OSError:
                path.unlink(missing_ok=True)
                self.files.pop()
                continue
            finally:
                os.close(fd)
            self._maps.append(mm)
            return np.frombuffer(mm, dtype=dtype, count=count).reshape(shape)
        raise NoRoom(f"no room for {size_text(size)} of {split} features in " + ", ".join(map(str, directories())))

    def unlink(self) -> None:
        """Remove the files' names; the memory stays while a process maps it."""
        for path in self.files:
            path.unlink(missing_ok=True)
        self.unlinked = True

    def close(self) -> None:
        """Remove the names and unmap this process's view (the workers' mappings are theirs)."""
        self.unlink()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a view of it is still alive somewhere: unmapped when that goes
                pass
        self._maps.clear()

    def __enter__(self) -> SharedFeatures:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def attach(handle: SharedSplit):
    """A worker's :class:`~mdmf_cache.store.read.FeatureSplit` on the shared file: CPU tensors, no copy of the features.

    Raises:
        FileNotFoundError: the file is gone (its parent stopped before this worker mapped it).
    """
    import torch

    dtype = getattr(torch, handle.dtype)
    count = int(np.prod(handle.shape, dtype=np.int64))
    if count:
        with open(handle.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), handle.nbytes, access=mmap.ACCESS_COPY)  # copy-on-write: writable, private
        features = torch.frombuffer(mm, dtype=dtype, count=count).view(handle.shape)  # keeps ``mm`` alive
    else:
        features = torch.empty(handle.shape, dtype=dtype)
    return FeatureSplit(features=features, labels=torch.from_numpy(handle.labels), video_ids=handle.video_ids,
                        classes=handle.classes, class_names=handle.class_names, text=torch.from_numpy(handle.text))


def remove_stale() -> list[Path]:
    """Remove shared files of this host whose process is gone (a parent killed before its workers mapped them)."""
    host, removed = socket.gethostname(), []
    for folder in directories():
        try:
            names = [p for p in folder.iterdir() if p.name.startswith(PREFIX)]
        except OSError:
            continue
        for path in names:
            m = _NAME.match(path.name)
            if m is None or m["host"] != host or _alive(int(m["pid"])):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s, left by a sweep that was killed", path)
    return removed


SEMAPHORES = Path("/dev/shm")  # where Linux keeps POSIX named semaphores, as sem.NAME files
SEM_PREFIX = "sem.mp-"  # multiprocessing's (a --jobs sweep's events and its resource tracker's own)


def remove_stale_semaphores(folder: Path | None = None) -> list[Path]:
    """Remove multiprocessing's semaphores (``sem.mp-*``) that no live process has open: what a sweep whose every
    process was SIGKILLed (``kill -9 -PGID``, a scheduler's cancel) left, its resource tracker killed with it.

    A semaphore's file is mapped by every process that has it open (``/proc/PID/maps``, by device and inode: its
    creator maps it under a temporary name before giving it its own), from the moment its name exists; one that no
    process maps is dead. Only this user's files are looked at, against the mappings of this user's processes (one
    that even its user cannot read, a non-dumpable one, is passed over: a sweep's processes are readable); nothing
    is removed where there is no ``/proc``.
    """
    folder = SEMAPHORES if folder is None else folder
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        names = {p: p.lstat() for p in folder.iterdir() if p.name.startswith(SEM_PREFIX)}
    except OSError:
        return []
    names = {p: st for p, st in names.items() if st.st_uid == uid}
    if not names:
        return []
    in_use = _mapped_by_this_user(uid)
    if in_use is None:
        return []
    removed = []
    for path, st in names.items():
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in in_use:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    if removed:
        log.info("removed %d semaphore(s) from %s, left by a sweep that was killed", len(removed), folder)
    return removed


def _mapped_by_this_user(uid: int | None) -> set[tuple[int, int, int]] | None:
    """(major, minor, inode) of the files mapped by the readable processes of ``uid``; None without /proc."""
    proc = Path("/proc")
    if uid is None or not (proc / "self" / "maps").is_file():
        return None
    mapped: set[tuple[int, int, int]] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            text = (entry / "maps").read_text()
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            continue
        except PermissionError:  # not readable even by its user (a non-dumpable process): not a sweep's
            continue
        except OSError:
            return None
        for line in text.splitlines():
            parts = line.split(None, 5)  # address perms offset major:minor inode [path]
            if len(parts) < 5 or parts[4] == "0":
                continue
            try:
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                mapped.add((major, minor, int(parts[4])))
            except ValueError:
                continue
    return mapped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def size_text(nbytes: int) -> str:
    """``4.39 GB``, ``2.5 MB``."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


__all__ = ["SharedFeatures", "SharedSplit", "NoRoom", "attach", "remove_stale", "remove_stale_semaphores", "directories",
           "size_text"]
