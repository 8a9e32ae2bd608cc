"""Reading a split's cached tokens within a memory bound: :class:`TokenReader`.

A token head (``HeadSpec.tokens`` set) reads, per episode, the tokens of its videos and views from the split's
token arrays (``tokens_<layer>`` ``(N, V, T, P, Dt)`` float16, one row per chunk: :mod:`mdmf_cache.tokens`).
A UCF101 train split of ViT-B/16 ``last`` tokens is 20 GB, so they are never loaded whole, unlike the features
(:mod:`mdmf_cache.store.read`). The reader keeps

* an LRU of decoded rows (all V views and L layers of a row, float16) holding at most ``budget`` bytes, whatever
  the split's size (``--token-cache-mb``, default :data:`~mdmf_cache.configs.TOKEN_CACHE_MB`); a read of more
  rows than the budget holds still works: the rows that do not fit are read from disk straight into the result
  (every time), and a warning says so once;
* one background thread that reads the rows of the *next* update or evaluation chunk (:meth:`TokenReader.prefetch`,
  told by whoever samples the episodes) into the LRU while the head computes the current one, so the head rarely
  waits on the disk. It warms only as many rows as fit beside each other in the budget, and stops when the reader
  is closed (:meth:`TokenReader.close`, or the ``with`` block's end, on an exception or Ctrl-C too).

Rows are the split's usable rows, as the feature readers count them (:func:`~mdmf_cache.store.read.usable_rows`):
row ``i`` of an episode is row ``i`` of the split's :class:`~mdmf_cache.store.read.FeatureSplit`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np

from mdmf_cache.configs import TOKEN_CACHE_MB
from mdmf_cache.data.episodes import Episodes
from mdmf_cache.errors import CacheError
from mdmf_cache.store.cache import CacheStore
from mdmf_cache.store.read import usable_rows
from mdmf_cache.tokens import TokenInfo, array_name

log = logging.getLogger(__name__)

__all__ = ["TokenReader", "DEFAULT_BUDGET", "token_info", "missing_tokens", "episode_tokens", "episode_rows"]

#: The reader's LRU bound in bytes when none is given (``--token-cache-mb``'s default).
DEFAULT_BUDGET = TOKEN_CACHE_MB << 20


def missing_tokens(store: CacheStore, split: str, spec: str | None) -> str:
    """The one line for a split without token arrays: what to run to add them."""
    dataset = (store.fingerprint.get("video") or {}).get("dataset") or "<dataset>"
    return (f"{store.path} split {split} has no token arrays, which a token head reads; extract them: "
            f"mdmf-cache extract {dataset} ... --tokens {spec or 'SPEC'}")


def token_info(store: CacheStore, split: str, spec: str | None = None) -> TokenInfo:
    """What the split's token arrays hold (its ``tokens`` attribute).

    Args:
        spec: the head's ``SPEC.tokens``, named in the error.

    Raises:
        CacheError: the split is absent, or has no token arrays (one line naming ``extract --tokens``).
    """
    if split not in store.splits:
        raise CacheError(f"{store.path} has no split {split!r} (has: {', '.join(store.splits) or 'none'})")
    g = store.root[split]
    info = store.tokens_info(split)
    if info is None:
        raise CacheError(missing_tokens(store, split, spec))
    if any(array_name(layer) not in g for layer in info.layers):
        raise CacheError(missing_tokens(store, split, spec))
    return info


class TokenReader:
    """A split's tokens by (row, view), through a bounded LRU and a prefetch thread (module docstring).

    Thread-safe: :meth:`read` may be called while the prefetch thread fills the LRU.

    Args:
        path: the cache group (``*.zarr``).
        split: ``train``, ``val`` or ``test``.
        budget: the LRU's bound in bytes (0: nothing kept, every read from disk).
        spec: the head's ``SPEC.tokens``, named when the split has no token arrays.
        prefetch: start the background thread on the first :meth:`prefetch` (False: :meth:`prefetch` does nothing).

    Attributes:
        info: the split's :class:`~mdmf_cache.tokens.TokenInfo`.
        views, frames: V and T of the arrays; ``shape``: ``(T, L, P, Dt)`` of one (row, view).
        row_bytes: what one row (V views, L layers, float16) holds in the LRU.
        hits, misses: rows found in the LRU / read from disk by :meth:`read`; ``wait_s``: seconds :meth:`read`
            waited for a prefetch to finish.

    Raises:
        CacheError: the split or its token arrays are missing, or their shapes disagree with their attribute.
    """

    def __init__(self, path: Path | str, split: str, budget: int = DEFAULT_BUDGET, spec: str | None = None,
                 prefetch: bool = True) -> None:
        if budget < 0:
            raise ValueError(f"budget {budget}: must be >= 0 bytes")
        self.store = store = CacheStore(path)
        self.split = split
        self.info = token_info(store, split, spec)
        g = store.root[split]
        self.arrays = [g[array_name(layer)] for layer in self.info.layers]
        n = store.num_rows(split)
        shapes = {tuple(a.shape[1:]) for a in self.arrays}
        v, t, p, dt = self.arrays[0].shape[1:] if len(shapes) == 1 else (0, 0, 0, 0)
        if len(shapes) != 1 or any(a.shape[0] < n for a in self.arrays) or (p, dt) != (self.info.patches, self.info.dim):
            raise CacheError(f"{store.path} split {split}: the token arrays' shapes "
                             f"{', '.join(str(tuple(a.shape)) for a in self.arrays)} do not fit their attribute "
                             f"({n} rows, P={self.info.patches}, Dt={self.info.dim}); extract the tokens again "
                             f"(mdmf-cache extract ... --tokens {self.info.spec} --overwrite)")
        self.rows = usable_rows(store, split)  # split row -> array row
        lacking = int((~store.tokens_done_mask(split)[self.rows]).sum())
        if lacking:  # an extension with --tokens not finished yet
            raise CacheError(f"{store.path} split {split}: {lacking} of {len(self.rows)} videos have no tokens yet; "
                             f"rerun the same mdmf-cache extract ... --tokens {self.info.spec} command to finish them")
        self.views, self.frames = int(v), int(t)
        self.shape = (self.frames, len(self.arrays), int(p), int(dt))  # (T, L, P, Dt)
        self.row_bytes = self.views * int(np.prod(self.shape)) * 2
        self.budget = int(budget)
        self.hits = self.misses = 0
        self.wait_s = 0.0
        self._lru: OrderedDict[int, np.ndarray] = OrderedDict()  # array row -> (V, T, L, P, Dt) float16
        self._held = self._peak = 0
        self._lock = threading.Lock()  # the LRU and its counters
        self._cond = threading.Condition()  # the prefetch job and the thread's state
        self._job: list[int] | None = None
        self._busy = self._stop = False
        self._thread: threading.Thread | None = None
        self._prefetch = prefetch
        self._warned = False

    # ---- memory ----------------------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Bytes the LRU holds now (at most ``budget``)."""
        with self._lock:
            return self._held

    @property
    def peak_bytes(self) -> int:
        """The most bytes the LRU has held."""
        with self._lock:
            return self._peak

    @property
    def rows_held(self) -> int:
        with self._lock:
            return len(self._lru)

    def chunk_episodes(self, rows_per_episode: int, limit: int) -> int:
        """Episodes per evaluation chunk: at most ``limit``, and few enough that a chunk's rows fit the LRU and its
        float32 tokens ``(E, S + Q, T, L, P, Dt)`` the budget (at least one episode)."""
        per = rows_per_episode * max(self.row_bytes, int(np.prod(self.shape)) * 4)  # LRU rows, float32 result
        return max(1, min(limit, self.budget // max(per, 1)))

    # ---- reading ---------------------------------------------------------------------------------------
    def _decode(self, r: int) -> np.ndarray:
        """Array row ``r``: ``(V, T, L, P, Dt)`` float16, checked."""
        try:
            parts = [np.asarray(a[r]) for a in self.arrays]  # L x (V, T, P, Dt)
        except Exception as e:  # a garbled chunk: named
            raise CacheError(f"{self.store.path} split {self.split}: the tokens of row {r} cannot be read ({e}); "
                             f"run mdmf-cache verify {self.store.path}") from e
        for layer, part in zip(self.info.layers, parts):
            bits = part.view(np.uint16)  # float16 bits: a tenth of isfinite's and any's time on a row
            if ((bits & 0x7C00) == 0x7C00).any():  # exponent all ones: inf or NaN
                raise CacheError(f"{self.store.path} split {self.split}: the {layer} tokens of row {r} hold NaN or inf; "
                                 f"run mdmf-cache verify {self.store.path}, then rerun mdmf-cache extract ... --tokens "
                                 f"{self.info.spec} (it extracts the damaged rows again)")
            if not (bits & 0x7FFF).any():  # all +-0, the fill value: the chunk was never written
                raise CacheError(f"{self.store.path} split {self.split}: row {r} has no {layer} tokens (all zero); "
                                 f"run mdmf-cache verify {self.store.path}, then rerun mdmf-cache extract ... --tokens "
                                 f"{self.info.spec}")
        return np.stack(parts, axis=2)  # (V, T, L, P, Dt)

    def _cached(self, r: int) -> np.ndarray | None:
        with self._lock:
            block = self._lru.get(r)
            if block is not None:
                self._lru.move_to_end(r)
            return block

    def _insert(self, r: int, block: np.ndarray, protect: set[int]) -> bool:
        """Keep ``block`` in the LRU, evicting the least recently used rows outside ``protect``; False (nothing
        evicted, nothing kept) when it cannot fit so."""
        size = block.nbytes
        with self._lock:
            if r in self._lru:
                return True
            free = self.budget - self._held
            if size > self.budget:
                return False
            victims = []
            for key, old in self._lru.items():  # oldest first
                if free >= size:
                    break
                if key not in protect:
                    victims.append(key)
                    free += old.nbytes
            if free < size:
                return False
            for key in victims:
                self._held -= self._lru.pop(key).nbytes
            self._lru[r] = block
            self._held += size
            self._peak = max(self._peak, self._held)
            return True

    def read(self, rows: Iterable[int] | np.ndarray, views: Iterable[int] | np.ndarray) -> np.ndarray:
        """The tokens of split rows ``rows`` at ``views`` (pairs): ``(B, T, L, P, Dt)`` float32, layers in the
        cache's order.

        Waits for a prefetch in flight first (its rows are then in the LRU, not read twice).

        Raises:
            IndexError: a row or view out of range.
            CacheError: a row's tokens are unreadable, not finite or missing.
        """
        rows = np.asarray(rows, dtype=np.int64).ravel()
        views = np.asarray(views, dtype=np.int64).ravel()
        if rows.shape != views.shape:
            raise ValueError(f"{len(rows)} rows but {len(views)} views")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.rows)):
            raise IndexError(f"rows must be in [0, {len(self.rows)}) (the split's usable rows)")
        if len(views) and (views.min() < 0 or views.max() >= self.views):
            raise IndexError(f"views must be in [0, {self.views})")
        t0 = time.perf_counter()
        self._wait_idle()
        self.wait_s += time.perf_counter() - t0
        out = np.empty((len(rows), *self.shape), dtype=np.float32)  # (B, T, L, P, Dt)
        uniq, inv = np.unique(self.rows[rows], return_inverse=True)
        if len(uniq) * self.row_bytes > self.budget and not self._warned:
            self._warned = True
            log.warning("tokens of %s: a read of %d rows (%d MiB) exceeds the token cache of %d MiB; the rows beyond "
                        "it are read from disk every time (raise --token-cache-mb)", self.split, len(uniq),
                        len(uniq) * self.row_bytes >> 20, self.budget >> 20)
        order = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
        protect = set(uniq.tolist())  # this read's rows: never evicted for one another
        for i, r in enumerate(uniq.tolist()):
            block = self._cached(r)
            if block is None:
                block = self._decode(r)
                self._insert(r, block, protect)
                self.misses += 1
            else:
                self.hits += 1
            sel = order[bounds[i]:bounds[i + 1]]
            out[sel] = block[views[sel]]  # float16 -> float32
        return out

    # ---- prefetch --------------------------------------------------------------------------------------
    def prefetch(self, rows: Iterable[int] | np.ndarray) -> None:
        """Read split rows ``rows`` into the LRU in the background (the next :meth:`read`'s); replaces a job not
        started yet. Out-of-range rows are left to :meth:`read` to refuse."""
        if not self._prefetch or self.budget < self.row_bytes:
            return
        rows = np.asarray(rows, dtype=np.int64).ravel()
        rows = rows[(rows >= 0) & (rows < len(self.rows))]
        job = list(dict.fromkeys(self.rows[rows].tolist()))  # array rows, first use first, once each
        with self._cond:
            if self._stop:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"tokens-{self.split}", daemon=True)
                self._thread.start()
            self._job = job
            self._cond.notify_all()

    def _worker(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job, self._job, self._busy = self._job, None, True
            try:
                self._warm(job)
            except Exception as e:  # noqa: BLE001 -- the read that needs the row reads it again and says why
                log.debug("token prefetch of %s stopped: %s", self.split, e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _warm(self, job: list[int]) -> None:
        protect: set[int] = set()
        for r in job:
            if self._stop:
                return
            protect.add(r)
            if self._cached(r) is not None:
                continue
            if not self._insert(r, self._decode(r), protect):
                return  # the budget is full of this job's rows: the rest are read when asked

    def _wait_idle(self) -> None:
        with self._cond:
            while (self._job is not None or self._busy) and not self._stop:
                self._cond.wait()

    def close(self) -> None:
        """Stop the prefetch thread (it finishes the row it is reading) and drop the LRU; idempotent."""
        with self._cond:
            self._stop = True
            self._job = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            self._lru.clear()
            self._held = 0

    @property
    def prefetching(self) -> bool:
        """The prefetch thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "TokenReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def episode_rows(ep: Episodes) -> np.ndarray:
    """Every split row ``ep`` reads (supports, then queries), for :meth:`TokenReader.prefetch`."""
    return np.concatenate([ep.support.ravel(), ep.query.ravel()])


def episode_tokens(reader: TokenReader, ep: Episodes, device=None):
    """The tokens of ``ep``'s videos and views: support ``(E, S, T, L, P, Dt)``, query ``(E, Q, T, L, P, Dt)``,
    float32 torch tensors on ``device`` (one :meth:`TokenReader.read`)."""
    import torch

    e, s = ep.support.shape
    q = ep.query.shape[1]
    x = torch.from_numpy(reader.read(episode_rows(ep), np.concatenate([ep.support_view.ravel(), ep.query_view.ravel()])))
    x = x.to(device) if device is not None else x
    return x[: e * s].reshape(e, s, *reader.shape), x[e * s:].reshape(e, q, *reader.shape)
