"""Streaming generated tokens to the host while a compiled program runs (`io_callback`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

# stream(index, tokens [B], live [B]): called in order for every generated position; `live` marks the
# rows that produced a token there (rows that already stopped carry the pad id).
StreamCallback = Callable[[int, np.ndarray, np.ndarray], None]

_streams: dict[int, StreamCallback] = {}
_stream_ids = itertools.count()


def register(stream: StreamCallback | None) -> int:
    """A fresh stream id, bound to `stream` (if any) until `unregister`."""
    stream_id = next(_stream_ids)
    if stream is not None:
        _streams[stream_id] = stream
    return stream_id


def unregister(stream_id: int) -> None:
    _streams.pop(stream_id, None)


def emit(stream_id, start, tokens, live, count):
    """Host side of streaming: positions start .. start + count - 1 of tokens / live [B, C]."""
    for j in range(int(count)):
        _streams[int(stream_id)](int(start) + j, np.asarray(tokens[:, j]), np.asarray(live[:, j]))
