"""Continuous batching: a fixed set of decode slots that requests join and leave between decode steps.

One thread runs the loop. Each iteration drops cancelled and timed-out requests (their slots free at
once), admits the next queued request into a free slot, prefills one chunk of it (so a long prompt
never stalls decoding for more than a chunk), and runs one decode step for every live slot. Events
(`Token`, then one `Finished`) go to each request's sink from the loop thread. The programs compile
once per slot count and chunk size (`warm_up`); no request compiles anything.
"""

from __future__ import annotations

import collections
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ouro_jax.inference.slot_decode import SlotBatch, Work, decode_step
from ouro_jax.inference.slots import (
    RowSettings,
    Sampled,
    SlotSetup,
    commit_prefill,
    empty_cache,
    empty_scratch,
    prefill_chunk,
)
from ouro_jax.serve.events import Finished, Handle, QueueFull, Sink, Stats, Token
from ouro_jax.serve.request import Request, check_request


class _Prefill(NamedTuple):
    handle: Handle
    slot: int
    offset: int
    scratch: object


def _row_settings(request: Request, index: int) -> tuple:
    return (request.exit_threshold, request.depth, request.temperature, request.top_k, request.top_p,
            request.seed, index)


_ROW_DTYPES = (np.float32, np.int32, np.float32, np.int32, np.float32, np.uint32, np.int32)


def _token(sampled: Sampled, b: int | None, request: Request) -> Token:
    pick = (lambda x: x) if b is None else (lambda x: x[b])
    top = ()
    if request.logprobs:
        top = tuple((int(i), float(p)) for i, p in zip(pick(sampled.top_ids)[:request.logprobs],
                                                       pick(sampled.top_logprobs)[:request.logprobs]))
    return Token(int(pick(sampled.token)), float(pick(sampled.logprob)), top, int(pick(sampled.exit_step)) + 1)


class Scheduler:
    """Runs requests on `setup.slots` decode slots; `prefill_chunk` prompt tokens are prefilled per iteration."""

    def __init__(self, params, setup: SlotSetup, *, prefill_chunk: int = 64, max_queue: int = 64):
        if setup.cache_length % prefill_chunk:
            raise ValueError(f"the cache length ({setup.cache_length}) must be a multiple of the prefill chunk "
                             f"({prefill_chunk})")
        self.params, self.setup, self.chunk, self.max_queue = params, setup, prefill_chunk, max_queue
        self.cache = empty_cache(setup)
        n = setup.slots
        self.handles: list[Handle | None] = [None] * n
        self.tokens, self.positions = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.live = np.zeros(n, bool)
        self.rows = [np.zeros(n, dtype) for dtype in _ROW_DTYPES]
        self.rows[1][:] = 1
        self.queue: collections.deque[Handle] = collections.deque()
        self.prefilling: _Prefill | None = None
        self.stats = Stats()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False

    # ------------------------------------------------------------ the client side (any thread)

    def submit(self, request: Request, sink: Sink) -> Handle:
        """Queues a request (checked here: ValueError for a bad one, QueueFull when the queue is full)."""
        handle = Handle(check_request(request, self.setup), sink)
        with self._wake:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.queue)} requests are waiting for "
                                f"{self.setup.slots} slots; retry later")
            self.queue.append(handle)
            self._wake.notify()
        return handle

    @property
    def running(self) -> bool:
        return self._running

    def load(self) -> dict[str, int]:
        with self._wake:
            busy = sum(h is not None for h in self.handles)
            return {"slots": self.setup.slots, "busy_slots": busy, "queued": len(self.queue)}

    def start(self) -> Scheduler:
        self.warm_up()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="ouro-serve-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def warm_up(self) -> None:
        """Compiles the decode step, the prefill chunk and the commit (nothing compiles afterwards)."""
        scratch, _ = self._prefill_call(empty_scratch(self.setup), np.zeros(self.chunk, np.int32), 0, 1,
                                        Request((0,), depth=self.setup.depth))
        self.cache = commit_prefill(self.cache, scratch, jnp.int32(0), jnp.int32(self.setup.depth), setup=self.setup)
        self._decode_call()

    # ------------------------------------------------------------ the loop (its own thread)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not (self.queue or self.prefilling or self.live.any()):
                    self._wake.wait(timeout=0.5)
                if not self._running:
                    break
            try:
                self.iterate()
            except Exception as e:  # a failing program must not take the server down: end what ran
                self._fail_all(f"{type(e).__name__}: {e}")

    def iterate(self) -> None:
        """One scheduling round: drop, admit, one prefill chunk, one decode step."""
        self._drop_stopped()
        self._admit()
        if self.prefilling is not None:
            self._prefill_next_chunk()
        if self.live.any():
            self._decode()

    def _finish(self, handle: Handle, reason: str, message: str = "") -> None:
        self.stats.finished[reason] += 1
        handle.sink(Finished(reason, message))

    def _free(self, slot: int) -> None:
        with self._wake:
            self.handles[slot] = None
        self.live[slot] = False

    def _drop_stopped(self) -> None:
        with self._wake:
            waiting = [h for h in self.queue if h.stop_reason()]
            for h in waiting:
                self.queue.remove(h)
        for h in waiting:
            self._finish(h, h.stop_reason())
        for slot, h in enumerate(self.handles):
            if h is not None and h.stop_reason():
                if self.prefilling is not None and self.prefilling.slot == slot:
                    self.prefilling = None
                self._free(slot)
                self._finish(h, h.stop_reason())

    def _admit(self) -> None:
        if self.prefilling is not None or None not in self.handles:
            return
        with self._wake:
            if not self.queue:
                return
            handle = self.queue.popleft()
            slot = self.handles.index(None)
            self.handles[slot] = handle
        self.prefilling = _Prefill(handle, slot, 0, empty_scratch(self.setup))

    def _prefill_call(self, scratch, ids: np.ndarray, start: int, count: int, request: Request):
        row = RowSettings(*(jnp.asarray(v, dtype) for v, dtype in zip(_row_settings(request, 0), _ROW_DTYPES)))
        return prefill_chunk(self.params, scratch, jnp.asarray(ids), jnp.int32(start), jnp.int32(count), row,
                             setup=self.setup)

    def _prefill_next_chunk(self) -> None:
        handle, slot, offset, scratch = self.prefilling
        prompt = handle.request.prompt
        piece = prompt[offset:offset + self.chunk]
        ids = np.zeros(self.chunk, np.int32)
        ids[:len(piece)] = piece
        scratch, sampled = self._prefill_call(scratch, ids, offset, len(piece), handle.request)
        self.stats.prefill_chunks += 1
        if offset + self.chunk < len(prompt):
            self.prefilling = _Prefill(handle, slot, offset + self.chunk, scratch)
            return
        self.prefilling = None
        self.cache = commit_prefill(self.cache, scratch, jnp.int32(slot), jnp.int32(handle.request.depth),
                                    setup=self.setup)
        self.positions[slot] = len(prompt)
        for values, value in zip(self.rows, _row_settings(handle.request, 0)):
            values[slot] = value
        self._emit(slot, _token(jax.device_get(sampled), None, handle.request))

    def _emit(self, slot: int, token: Token) -> None:
        """Hands a slot's new token to its request; ends the request on a stop id or at max_tokens."""
        handle = self.handles[slot]
        handle.generated += 1
        self.stats.tokens += 1
        handle.sink(token)
        request = handle.request
        reason = ("stop" if token.id in request.stop_ids
                  else "length" if handle.generated >= request.max_tokens else None)
        if reason:
            self._free(slot)
            self._finish(handle, reason)
            return
        self.live[slot] = True
        self.tokens[slot] = token.id
        self.rows[-1][slot] = handle.generated    # the next token's index (folded into the sampling key)

    def _decode_call(self) -> tuple[Sampled, Work]:
        batch = SlotBatch(jnp.asarray(self.tokens), jnp.asarray(self.positions), jnp.asarray(self.live))
        rows = RowSettings(*(jnp.asarray(values) for values in self.rows))
        self.cache, sampled, work = decode_step(self.params, self.cache, batch, rows, setup=self.setup)
        return jax.device_get((sampled, work))

    def _decode(self) -> None:
        live = np.flatnonzero(self.live)
        sampled, work = self._decode_call()
        stats = self.stats
        stats.decode_steps += 1
        stats.decode_tokens += len(live)
        stats.row_steps += int(work.row_steps)
        stats.live_steps += int(work.live_steps)
        stats.batch_steps += len(live) * int(work.steps)
        for slot in live:
            self.positions[slot] += 1
            self._emit(slot, _token(sampled, slot, self.handles[slot].request))

    def _fail_all(self, message: str) -> None:
        self.prefilling = None
        self.cache = empty_cache(self.setup)   # a failed call may have consumed the donated cache
        for slot, handle in enumerate(self.handles):
            if handle is not None:
                self._free(slot)
                self._finish(handle, "error", message)
