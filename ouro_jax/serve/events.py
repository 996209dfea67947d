"""What the scheduler hands its clients: per-request events and handles, and its counters."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

from ouro_jax.serve.request import Request


class Token(NamedTuple):
    id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely ids and their log-probabilities
    depth: int                          # recurrent steps that produced it


class Finished(NamedTuple):
    reason: str  # "stop" (a stop id), "length" (max_tokens), "cancelled", "timeout", "error"
    message: str = ""


Sink = Callable[[Token | Finished], None]


class QueueFull(Exception):
    """The bounded queue of waiting requests is full."""


class Handle:
    """A submitted request: `cancel()` frees its slot (or queue place) before the next decode step."""

    def __init__(self, request: Request, sink: Sink):
        self.request, self.sink = request, sink
        self.deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
        self.generated = 0
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def stop_reason(self) -> str | None:
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "timeout"
        return None


@dataclasses.dataclass
class Stats:
    """Counters since start: tokens emitted, decode steps and the rows their recurrent steps ran."""

    tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0     # tokens from decode steps (the first token of a request comes from prefill)
    row_steps: int = 0         # rows run per recurrent step, summed (whole tiles, padding included)
    live_steps: int = 0        # rows that had not exited, summed: the least any schedule runs
    batch_steps: int = 0       # live rows x recurrent steps: the batch-level exit (a batch stops when all exited)
    prefill_chunks: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def layer_applications_per_token(self, num_layers: int) -> dict[str, float]:
        per = lambda steps: steps * num_layers / max(self.decode_tokens, 1)
        return {"per_row_exit": per(self.row_steps), "exact": per(self.live_steps),
                "batch_exit": per(self.batch_steps)}
