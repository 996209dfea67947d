"""Token shards streamed from an object store: each process reads only its own shards, a few at a time.

Process p of P owns shards p, p + P, p + 2P, ... of the manifest. Each epoch it visits its shards in a
seeded order, `window` shards at a time, and shuffles the documents within each window; index i of its
stream is a pure function of (seed, i), so the grain iterator state resumes exactly. A `ShardCache`
downloads the shards of the current window and, in a background thread, those of the next one (each
checked against its SHA-256 while it is downloaded) into a private local directory and deletes the rest:
local disk and memory stay at most 2 x window shards, whatever the size of the corpus.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import weakref
from typing import Any

import numpy as np

from ouro_jax import paths
from ouro_jax.errors import ShardCorruptError

DEFAULT_WINDOW = 2  # shards whose documents are shuffled together


@dataclasses.dataclass(frozen=True)
class ShardFile:
    path: str
    sha256: str
    documents: int
    bytes: int


class ShardCache:
    """Local copies of remote shards: `prefetch(keys)` starts downloads in the background, `get(key)`
    returns a reader (waiting for its download), `keep(keys)` deletes the others."""

    def __init__(self, shards: list[ShardFile]):
        self.shards = shards
        self.directory = tempfile.mkdtemp(prefix=f"streamed-{os.getpid()}-", dir=_cache_root())
        weakref.finalize(self, shutil.rmtree, self.directory, True)  # also at exit
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-download")
        self._lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._readers: dict[int, Any] = {}
        self.downloaded: list[int] = []  # every shard fetched, in order (a shard may be fetched again)
        self.peak_bytes = 0

    def prefetch(self, keys) -> None:
        with self._lock:
            for key in keys:
                if key not in self._readers and key not in self._pending:
                    self._pending[key] = self._pool.submit(self._download, key)

    def get(self, key: int):
        self.prefetch([key])
        with self._lock:
            reader = self._readers.get(key)
            future = self._pending.get(key)
        if reader is not None:
            return reader
        reader = future.result()
        with self._lock:
            if self._pending.get(key) is future:
                del self._pending[key]
                self._readers[key] = reader
            return self._readers[key]

    def keep(self, keys) -> None:
        """Closes and deletes every local shard not in `keys` (downloads of others finish, then go too)."""
        keys = set(keys)
        with self._lock:
            for key in [k for k in self._pending if k not in keys]:
                self._readers[key] = self._pending.pop(key).result()
            for key in [k for k in self._readers if k not in keys]:
                self._readers.pop(key).close()
                os.unlink(self._local(key))

    def _local(self, key: int) -> str:
        return os.path.join(self.directory, f"{key:05d}.array_record")

    def _download(self, key: int):
        from array_record.python.array_record_module import ArrayRecordReader

        shard, target = self.shards[key], self._local(key)
        digest = hashlib.sha256()
        with paths.as_path(shard.path).open("rb") as src, open(target, "wb") as dst:
            for block in iter(lambda: src.read(1 << 22), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != shard.sha256:
            os.unlink(target)
            raise ShardCorruptError(f"{shard.path}: does not match the SHA-256 in its manifest (corrupted or "
                                    "replaced); prepare the data again")
        self.downloaded.append(key)
        self.peak_bytes = max(self.peak_bytes, _tree_bytes(self.directory))
        return ArrayRecordReader(target)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.keep(())
        shutil.rmtree(self.directory, ignore_errors=True)


def _cache_root() -> str:
    """The local cache directory, without the shard copies of streaming processes that died (SIGKILL)."""
    root = paths.cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(root):
        pid = entry.name.split("-")[1] if entry.name.startswith("streamed-") else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
    return os.fspath(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_bytes(directory: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())


@dataclasses.dataclass(frozen=True)
class _Window:
    start: int            # first index of the window within its epoch
    shards: tuple          # keys into this process's shard list
    order: np.ndarray      # document order within the window
    cumulative: np.ndarray  # documents before each shard of the window


class StreamedDocuments:
    """This process's documents of a remote shard directory, as a random-access source for grain
    (`len` is the documents of `num_epochs` passes; None: endless). Records are raw bytes."""

    def __init__(self, shards: list[ShardFile], *, seed: int, shuffle: bool, num_epochs: int | None,
                 window: int = DEFAULT_WINDOW):
        if window < 1:
            raise ValueError(f"the streaming window must be >= 1 shard, got {window}")
        self.shards, self.seed, self.shuffle, self.window = shards, seed, shuffle, window
        self.per_epoch = sum(s.documents for s in shards)
        self.num_epochs = num_epochs
        self._cache: ShardCache | None = None
        self._epochs: dict[int, list[_Window]] = {}  # the windows of the epochs being read

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.per_epoch

    def __getstate__(self):  # grain workers get a copy without the cache (each opens its own)
        return {**self.__dict__, "_cache": None}

    @property
    def cache(self) -> ShardCache:
        if self._cache is None:
            self._cache = ShardCache(self.shards)
        return self._cache

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(index)
        epoch, offset = divmod(index, self.per_epoch)
        windows = self._windows(epoch)
        w = bisect.bisect_right([win.start for win in windows], offset) - 1
        win = windows[w]
        following = ()
        if w + 1 < len(windows):
            following = windows[w + 1].shards
        elif self.num_epochs is None or epoch + 1 < self.num_epochs:
            following = self._windows(epoch + 1)[0].shards
        self.cache.keep(win.shards + following)
        self.cache.prefetch(following)
        position = int(win.order[offset - win.start])
        i = int(np.searchsorted(win.cumulative, position, side="right")) - 1
        return self.cache.get(win.shards[i]).read([position - int(win.cumulative[i])])[0]

    def _windows(self, epoch: int) -> list[_Window]:
        if epoch not in self._epochs:
            if len(self._epochs) >= 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = self._layout(epoch)
        return self._epochs[epoch]

    def _layout(self, epoch: int) -> list[_Window]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        windows, start = [], 0
        for first in range(0, len(order), self.window):
            keys = tuple(int(k) for k in order[first:first + self.window])
            counts = np.array([self.shards[k].documents for k in keys])
            total = int(counts.sum())
            docs = rng.permutation(total) if self.shuffle else np.arange(total)
            windows.append(_Window(start, keys, docs, np.concatenate([[0], np.cumsum(counts)[:-1]])))
            start += total
        return windows


def process_shards(shards: list[ShardFile], process_index: int, process_count: int) -> list[ShardFile]:
    """The shards process `process_index` of `process_count` reads (every process needs at least one)."""
    if len(shards) < process_count:
        raise ValueError(f"{len(shards)} shards cannot be streamed by {process_count} processes (each reads whole "
                         "shards of its own): prepare the data again with a smaller --max-shard-tokens")
    return shards[process_index::process_count]
