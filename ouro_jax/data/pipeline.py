"""grain pipelines: sources -> shuffle -> per-process shard -> mixture -> packed batches -> prefetch.

`make_batch_iterator(...)` returns a grain `DatasetIterator` of batches (the contract is in the
package docstring). `get_state()` is JSON-able and `set_state()` resumes with exactly the batches
an uninterrupted run gives, with or without worker processes; orbax
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` save and restore it.

Stages, all deterministic given `seed`:
- each source yields documents `{"input_ids" int32 [n], "target_weight" int32 [n]}` (1 where a
  token counts as a prediction target: every token of text, the assistant tokens of chat shards);
  finite sources (token shards, a finite task) are shuffled globally, reshuffled each epoch, and
  repeated `num_epochs` times (None: forever); endless task streams draw a fresh example per index;
- several sources are interleaved by `weights` (grain `MapDataset.mix`, a deterministic
  interleave in those proportions; with `num_epochs` it ends when any source runs out); each
  source is sharded by process before the mixture (`[process_index::process_count]`; shards on an
  object store: whole shards per process, streamed, `streaming.py`) and, with `num_workers`, by worker;
- packing (`packing.py`): "concat" for text (no token lost, no padding), "first_fit" for tasks
  (examples never split); "auto" picks first_fit when any source is a task or chats (shards with a
  target mask: a conversation stays in one row unless it is longer than a row).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import grain.experimental
import numpy as np

from ouro_jax.data.capo import Capo
from ouro_jax.data.mano import Mano
from ouro_jax.data.multihop import MultiHopQA
from ouro_jax.data.packing import MODES, PackedBatchIterDataset
from ouro_jax.data.shards import TokenShards
from ouro_jax.data.tasks import SyntheticTask
from ouro_jax.paths import as_path

PACKINGS = ("auto", *MODES)
DOCS_PER_READ = 32


class Source(Protocol):
    """A pipeline source: a token-shard directory (`TokenShards`) or a synthetic task."""

    vocab_size: int
    is_finite: bool  # False: an endless, index-addressed stream (never shuffled or repeated)
    keep_whole: bool  # True: documents must never be split across rows (task examples)

    def documents(self, seed: int) -> Any:  # grain.MapDataset of {"input_ids", "target_weight"}
        ...


class InMemoryDocuments:
    """A finite source of token arrays held in memory (e.g. chats from `encode_chat`, small corpora).

    `target_weights[i]` (default all ones) marks the tokens of document i that count as targets;
    `keep_whole=True` forbids splitting documents across rows (they must fit in seq_len).
    """

    is_finite = True

    def __init__(self, documents: Sequence[np.ndarray], target_weights: Sequence[np.ndarray] | None = None,
                 *, keep_whole: bool = False, vocab_size: int | None = None):
        self._docs = [np.asarray(d, np.int32).reshape(-1) for d in documents]
        if target_weights is None:
            self._weights = [np.ones(len(d), np.int32) for d in self._docs]
        else:
            self._weights = [np.asarray(w, np.int32).reshape(-1) for w in target_weights]
            pairs = zip(self._weights, self._docs)
            if len(self._weights) != len(self._docs) or any(len(w) != len(d) for w, d in pairs):
                raise ValueError("target_weights must give one weight per token of every document")
        if not self._docs:
            raise ValueError("InMemoryDocuments needs at least one document")
        self.keep_whole = keep_whole
        self.max_example_len = max(len(d) for d in self._docs)
        self.vocab_size = vocab_size if vocab_size is not None else int(max(d.max(initial=0) for d in self._docs)) + 1

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"input_ids": self._docs[index], "target_weight": self._weights[index]}

    def __repr__(self) -> str:
        return f"InMemoryDocuments({len(self._docs)} documents, keep_whole={self.keep_whole})"

    def documents(self, seed: int):
        del seed
        return grain.MapDataset.source(self)


def make_task(name: str, **kwargs: Any) -> SyntheticTask:
    """Task by name: "mano" (kwargs of `Mano`), "multihop_qa" (of `MultiHopQA`) or "capo" (of `Capo`)."""
    tasks: Mapping[str, type] = {"mano": Mano, "multihop_qa": MultiHopQA, "capo": Capo}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(tasks)}")
    return tasks[name](**kwargs)


def make_source(spec: Any) -> Source:
    """A source from an object, a mapping `{"kind": ..., **kwargs}`, or a string.

    Strings: a prepared directory, or `"<task>"` / `"<task>:key=value,..."` with task "mano",
    "multihop_qa" or "capo", e.g. "mano:max_len=10,seed=1". Mapping kinds: "shards" (with "path"), or a task.
    """
    if hasattr(spec, "documents"):
        return spec
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        kind = kwargs.pop("kind", None)
        if kind == "shards":
            return TokenShards(kwargs["path"])
        if kind is None:
            raise ValueError(f"source mapping needs a 'kind' ('shards' or a task name): {spec!r}")
        return make_task(kind, **kwargs)
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        if as_path(text).is_dir():  # local or an object store (gs://)
            return TokenShards(text)
        name, _, args = text.partition(":")
        if name in ("mano", "multihop_qa", "capo"):
            return make_task(name, **_parse_kwargs(args))
        raise ValueError(f"source {text!r} is neither a prepared directory nor a task "
                         "('mano', 'multihop_qa', 'capo')")
    raise TypeError(f"cannot make a data source from {type(spec).__name__}: {spec!r}")


def _parse_kwargs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"expected key=value in source arguments, got {item!r}")
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value.strip()
    return out


def _derive_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_batch_dataset(
    sources: Any | Sequence[Any],
    *,
    seq_len: int,
    batch_size: int,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    packing: str = "auto",
    read_threads: int = 0,
    prefetch: int = 2,
):
    """The grain IterDataset behind `make_batch_iterator` (same arguments)."""
    srcs = [make_source(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
    _check_args(srcs, seq_len, batch_size, weights, num_epochs, num_workers, packing)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}")
    if packing == "auto":
        packing = "first_fit" if any(s.keep_whole or getattr(s, "target_mask", False) for s in srcs) else "concat"

    parts = []
    for i, src in enumerate(srcs):
        if getattr(src, "streamed", False):  # reads only this process's shards
            parts.append(src.stream(_derive_seed(seed, i), process_index=process_index, process_count=process_count,
                                    shuffle=shuffle, num_epochs=num_epochs))
            continue
        ds = src.documents(_derive_seed(seed, i))
        if src.is_finite:
            if shuffle:
                ds = ds.shuffle(seed=_derive_seed(seed, 1000 + i))
            ds = ds.repeat(num_epochs)
        parts.append(ds[process_index::process_count])
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=list(weights or [1.0] * len(parts)))
    # Groups of documents amortize grain's per-element cost; the packer works through them in order.
    ds = ds.batch(DOCS_PER_READ, batch_fn=list)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 4 * read_threads)))
    it = PackedBatchIterDataset(it, seq_len=seq_len, batch_size=batch_size, mode=packing)
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app.run nobody parsed them
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    if prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


def _check_args(srcs, seq_len, batch_size, weights, num_epochs, num_workers, packing) -> None:
    if not srcs:
        raise ValueError("at least one source is required")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got seq_len={seq_len}, batch_size={batch_size}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if packing == "concat" and any(s.keep_whole for s in srcs):
        raise ValueError("packing='concat' would split task examples across rows; use 'first_fit' or 'auto'")
    for s in srcs:
        if s.keep_whole and getattr(s, "max_example_len", 0) > seq_len:
            raise ValueError(f"seq_len={seq_len} is shorter than the longest example of {s!r} "
                             f"({s.max_example_len} tokens)")
    if weights is not None:
        w = np.asarray(weights, np.float64)
        if len(w) != len(srcs) or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"weights must be {len(srcs)} non-negative numbers with a positive sum, got {weights}")
    if num_epochs is not None and (num_epochs < 1 or not any(s.is_finite for s in srcs)):
        raise ValueError(f"num_epochs must be >= 1 and needs a finite source (got {num_epochs}); "
                         "endless task streams take num_epochs=None")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def make_batch_iterator(sources: Any | Sequence[Any], **options):
    """A checkpointable grain iterator of packed batches, each a dict of numpy arrays [batch_size, seq_len].

    Options (keyword arguments of `make_batch_dataset`):
      sources: one source or a list (see `make_source`: `TokenShards`, a task, a mapping or a string).
      seq_len, batch_size: row length and rows per batch (per process).
      weights: mixture weights of the sources (default uniform).
      seed: seeds shuffling, task streams and bin shuffling.
      shuffle: shuffle finite sources globally each epoch (and the first-fit bins).
      num_epochs: passes over finite sources (None: repeat forever).
      num_workers: grain worker processes (0: in this process).
      process_index, process_count: this host's shard (default `jax.process_index/count()`).
      packing: "auto", "concat" or "first_fit" (module docstring).
      read_threads: threads reading source elements (useful for token shards on slow disks).
      prefetch: batches prefetched by a background thread (0: none).
    """
    return iter(make_batch_dataset(sources, **options))
