"""Packing documents into fixed-shape training batches, as a checkpointable grain IterDataset.

The parent yields groups (lists) of documents `{"input_ids" int [n], "target_weight" int [n]}`;
reading them in groups amortizes grain's per-element cost over many short documents. A cursor
(parent state before the current group, document index in the group, token offset in the
document) marks the first token not yet emitted; it is the whole iterator state, so a restored
iterator rebuilds exactly the batches an uninterrupted one would.

- "concat": a batch is the next batch_size * seq_len tokens of the concatenated stream cut into
  rows; a document crossing a row boundary continues in the next row as a new segment whose
  positions restart at 0. No token is lost, duplicated or padded (except at the end of data).
- "first_fit": each document (pieces of at most seq_len for longer ones) goes into the first of
  the batch_size rows with room; the batch is emitted when the next one fits nowhere. Examples
  are never split; rows are padded.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

MODES = ("concat", "first_fit")


def training_batch(ids: np.ndarray, weight: np.ndarray, seg: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Packed rows [B, S] (segment ids 0 on padding) -> the batch contract with targets and loss mask."""
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    targets = np.zeros(ids.shape, np.int32)
    targets[:, :-1] = np.where(same, ids[:, 1:], 0)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, :-1] = same & (weight[:, 1:] > 0)
    return {"input_ids": ids.astype(np.int32), "targets": targets, "segment_ids": seg.astype(np.int32),
            "positions": pos.astype(np.int32), "loss_mask": loss_mask}


class _Cursor:
    """Position in the document stream: (parent state before the current group, doc index, token offset)."""

    def __init__(self, parent: grain.DatasetIterator, state: dict[str, Any] | None = None):
        self.parent = parent
        if state is not None:
            parent.set_state(state["parent"])
        self._load_group()
        self.doc = state["doc"] if state else 0
        self.token = state["token"] if state else 0

    def _load_group(self) -> None:
        self.group_state = copy.deepcopy(self.parent.get_state())
        try:
            self.group = next(self.parent)
        except StopIteration:
            self.group = None

    def current(self) -> dict[str, np.ndarray] | None:
        """The document holding the next unread token (None at the end of data)."""
        while self.group is not None:
            if self.doc >= len(self.group):
                self._load_group()
                self.doc = self.token = 0
            elif self.token >= len(self.group[self.doc]["input_ids"]):
                self.doc, self.token = self.doc + 1, 0
            else:
                return self.group[self.doc]
        return None

    def advance(self, num_tokens: int) -> None:
        self.token += num_tokens

    def state(self) -> dict[str, Any]:
        return {"parent": self.group_state, "doc": self.doc, "token": self.token}


class _PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, batch_size: int, mode: str):
        super().__init__(parent)
        self._seq_len, self._batch_size, self._mode = seq_len, batch_size, mode
        self._cursor: _Cursor | None = None
        self._pending_state: dict[str, Any] | None = None

    def _get_cursor(self) -> _Cursor:
        if self._cursor is None:
            self._cursor = _Cursor(self._parent, self._pending_state)
        return self._cursor

    def __next__(self) -> dict[str, np.ndarray]:
        cursor = self._get_cursor()
        if cursor.current() is None:
            raise StopIteration
        rows = self._concat(cursor) if self._mode == "concat" else self._first_fit(cursor)
        return training_batch(*rows)

    def _concat(self, cursor: _Cursor):
        b, s = self._batch_size, self._seq_len
        want, ids, weight, starts = b * s, [], [], []
        while want > 0 and (doc := cursor.current()) is not None:
            lo = cursor.token
            hi = min(len(doc["input_ids"]), lo + want)
            ids.append(doc["input_ids"][lo:hi])
            weight.append(doc["target_weight"][lo:hi])
            start = np.zeros(hi - lo, bool)
            start[0] = lo == 0
            starts.append(start)
            cursor.advance(hi - lo)
            want -= hi - lo
        ids, weight, start = (np.concatenate(a) for a in (ids, weight, starts))
        valid = np.zeros(b * s, bool)
        valid[:len(ids)] = True
        ids, weight, start = (np.pad(a, (0, want)).reshape(b, s) for a in (ids, weight, start))
        valid = valid.reshape(b, s)
        start[:, 0] = valid[:, 0]  # every row starts a segment (a continued document restarts its positions)
        seg = np.cumsum(start, axis=1) * valid
        col = np.broadcast_to(np.arange(s), (b, s))
        pos = (col - np.maximum.accumulate(np.where(start, col, 0), axis=1)) * valid
        return ids, weight, seg, pos

    def _first_fit(self, cursor: _Cursor):
        b, s = self._batch_size, self._seq_len
        ids, weight = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
        seg, pos = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
        fill, count = np.zeros(b, np.int64), np.zeros(b, np.int32)
        arange = np.arange(s, dtype=np.int32)
        while (doc := cursor.current()) is not None:
            lo = cursor.token
            hi = min(len(doc["input_ids"]), lo + s)  # longer documents go in pieces of seq_len
            n = hi - lo
            room = np.flatnonzero(fill + n <= s)
            if not len(room):
                break
            r, f = room[0], fill[room[0]]
            ids[r, f:f + n] = doc["input_ids"][lo:hi]
            weight[r, f:f + n] = doc["target_weight"][lo:hi]
            count[r] += 1
            seg[r, f:f + n] = count[r]
            pos[r, f:f + n] = arange[:n]
            fill[r] += n
            cursor.advance(n)
        return ids, weight, seg, pos

    def get_state(self) -> dict[str, Any]:
        if self._cursor is None:
            return self._pending_state or {"parent": copy.deepcopy(self._parent.get_state()), "doc": 0, "token": 0}
        return copy.deepcopy(self._cursor.state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._cursor = None
        self._pending_state = copy.deepcopy(state)


class PackedBatchIterDataset(grain.IterDataset):
    """Groups of documents -> packed training batches (dict of [batch_size, seq_len] arrays)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, batch_size: int, mode: str):
        super().__init__(parent)
        if mode not in MODES:
            raise ValueError(f"packing mode must be one of {MODES}, got {mode!r}")
        self._seq_len, self._batch_size, self._mode = seq_len, batch_size, mode

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedBatchIterator(self._parent.__iter__(), self._seq_len, self._batch_size, self._mode)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset(seq_len={self._seq_len}, batch_size={self._batch_size}, mode={self._mode})"
