"""Tokenized document shards on disk: ArrayRecord files of one document per record + `manifest.json`.

A record is a document's token ids as little-endian `uint16` (vocabularies up to 65536) or
`uint32`, ending with `<|endoftext|>` unless the manifest says otherwise. Version 2 manifests say whether
the shards carry a target mask (`"target_mask": true`, chats prepared with `--chat`): each record is
then followed by one byte per token, 1 where the token is a prediction target (what an assistant
writes), 0 elsewhere. Version 1 (token-only) directories keep loading. `TokenShards(dir)` is the
pipeline source over a directory written by `ouro-prepare`.

Opening a directory checks every shard's size against the manifest (free) and, when the shards
total at most `VERIFY_BYTES`, their SHA-256 too (`verify=True` forces it, `False` skips both). Shards
on an object store (`gs://`) are streamed (`streaming.py`): each process reads only its own shards, a
window at a time, each checked against its SHA-256 as it is downloaded; nothing is read at open.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from ouro_jax.data.streaming import DEFAULT_WINDOW, ShardFile, StreamedDocuments, process_shards
from ouro_jax.errors import ShardCorruptError
from ouro_jax.paths import as_path, is_local, local_copy

MANIFEST = "manifest.json"
FORMAT = "ouro_jax.token_shards"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: token ids only, no target_mask field
SHARD_PATTERN = "shard-{:05d}.array_record"
# One record per chunk: random access (global shuffling) reads exactly one document.
ARRAY_RECORD_OPTIONS = "group_size:1"
VERIFY_BYTES = 256 << 20  # SHA-256 of the shards on open up to this total size (~0.3 s per 256 MiB)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Appends documents to numbered shards, starting a new one past `max_shard_tokens`."""

    def __init__(self, directory: str | os.PathLike, dtype: np.dtype, max_shard_tokens: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_cls = ArrayRecordWriter
        self.directory = as_path(directory)  # local: ArrayRecordWriter writes local files
        self.dtype, self.max_shard_tokens = np.dtype(dtype), max_shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._writer = None

    def write(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Appends one document; `mask` (one 0/1 per token) follows its ids in the record when given."""
        if self._writer is None or self.shards[-1]["tokens"] >= self.max_shard_tokens:
            self._close_current()
            name = SHARD_PATTERN.format(len(self.shards))
            self._writer = self._writer_cls(str(self.directory / name), ARRAY_RECORD_OPTIONS)
            self.shards.append({"path": name, "documents": 0, "tokens": 0})
        record = np.asarray(ids).astype(self.dtype).tobytes()
        if mask is not None:
            record += np.asarray(mask).astype(np.uint8).tobytes()
        self._writer.write(record)
        self.shards[-1]["documents"] += 1
        self.shards[-1]["tokens"] += len(ids)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            shard = self.shards[-1]
            shard["sha256"] = file_sha256(self.directory / shard["path"])
            shard["bytes"] = (self.directory / shard["path"]).stat().length

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards


@dataclasses.dataclass(frozen=True)
class _DecodeRecord:
    """bytes -> document dict (picklable for grain workers); `masked`: a byte per token follows the ids."""

    dtype: str
    masked: bool = False

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        if not self.masked:
            ids = np.frombuffer(record, self.dtype).astype(np.int32)
            return {"input_ids": ids, "target_weight": np.ones(len(ids), np.int32)}
        n = len(record) // (np.dtype(self.dtype).itemsize + 1)
        ids = np.frombuffer(record, self.dtype, count=n).astype(np.int32)
        weight = np.frombuffer(record, np.uint8, offset=n * np.dtype(self.dtype).itemsize).astype(np.int32)
        return {"input_ids": ids, "target_weight": weight}


class TokenShards:
    """Pipeline source over a prepared directory: every next token of a document is a target, or those
    of the target mask (chats, which "auto" packing keeps whole: first_fit)."""

    keep_whole = False  # long documents may be split across rows
    is_finite = True

    def __init__(self, directory: str | os.PathLike, verify: bool | None = None):
        self.directory = as_path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} has no {MANIFEST}: not a directory written by "
                                    "`ouro-prepare`")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") not in READABLE_VERSIONS:
            versions = " or ".join(map(str, READABLE_VERSIONS))
            raise ValueError(f"{path}: expected format {FORMAT!r} version {versions}, got "
                             f"{self.manifest.get('format')!r} version {self.manifest.get('version')!r}")
        self.paths = [str(self.directory / s["path"]) for s in self.manifest["shards"]]
        if not self.paths:
            raise ValueError(f"{path} lists no shards (no documents were prepared)")
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]
        self.num_documents = self.manifest["documents"]
        self.num_tokens = self.manifest["tokens"]
        self.target_mask = bool(self.manifest.get("target_mask", False))
        self.streamed = not is_local(self.directory)  # checked shard by shard as each process downloads its own
        self.stream_window = DEFAULT_WINDOW
        if self.streamed and not verify:
            return
        missing = [p for p in self.paths if not as_path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {path} are missing: {missing}")
        if verify is not False:
            self._check_sizes()
            total = sum(as_path(p).stat().length for p in self.paths)
            if verify or total <= VERIFY_BYTES:
                self.verify()

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.directory)!r}, documents={self.num_documents}, tokens={self.num_tokens}"
                f"{', target_mask' if self.target_mask else ''})")

    def _check_sizes(self) -> None:
        """Compares each shard's size with the manifest (manifests written before sizes were recorded: skipped)."""
        for shard, path in zip(self.manifest["shards"], self.paths):
            size = as_path(path).stat().length
            if "bytes" in shard and size != shard["bytes"]:
                raise ShardCorruptError(f"{path}: {size} bytes, its manifest says {shard['bytes']} "
                                        "(truncated or replaced); prepare the data again")

    def verify(self) -> None:
        """Recomputes every shard's SHA-256 against the manifest (remote shards: fetches the checked local
        copies); raises ShardCorruptError on a mismatch."""
        for shard, path in zip(self.manifest["shards"], self.paths):
            if not is_local(path):
                self._local_copy(shard, path)
            elif file_sha256(path) != shard["sha256"]:
                raise ShardCorruptError(f"{path}: does not match the SHA-256 in its manifest (corrupted or replaced); "
                                        "prepare the data again")

    @staticmethod
    def _local_copy(shard: dict[str, Any], path: str) -> str:
        try:
            return local_copy(path, shard["sha256"], ".array_record")
        except ValueError as e:
            raise ShardCorruptError(f"{e}; prepare the data again") from None

    def stream(self, seed: int, *, process_index: int, process_count: int, shuffle: bool, num_epochs: int | None):
        """grain MapDataset of this process's documents, streamed from its own shards (`streaming.py`):
        shuffled within windows of `stream_window` shards, repeated `num_epochs` times (None: forever)."""
        import grain

        files = [ShardFile(path, shard["sha256"], shard["documents"], shard.get("bytes", 0))
                 for shard, path in zip(self.manifest["shards"], self.paths)]
        mine = process_shards(files, process_index, process_count)
        source = StreamedDocuments(mine, seed=seed, shuffle=shuffle, num_epochs=num_epochs, window=self.stream_window)
        return grain.MapDataset.source(source).map(self._decoder())

    def _decoder(self) -> _DecodeRecord:
        return _DecodeRecord(self.manifest["token_dtype"], self.target_mask)

    def documents(self, seed: int):
        """grain MapDataset of `{"input_ids", "target_weight"}`, in file order (the pipeline shuffles)."""
        del seed
        import grain

        try:
            local = [self._local_copy(shard, path) for shard, path in zip(self.manifest["shards"], self.paths)]
            source = grain.sources.ArrayRecordDataSource(local)
        except RuntimeError as e:  # array_record reports a bad file as a bare RuntimeError
            raise ShardCorruptError(f"{self.directory}: a shard is not a readable ArrayRecord file "
                                    f"({(str(e).strip().splitlines() or ['?'])[0]})") from None
        return grain.MapDataset.source(source).map(self._decoder())
