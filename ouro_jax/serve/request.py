"""A generation request as the scheduler runs it, and the one place its values are checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ouro_jax.inference.slots import TOP_LOGPROBS, SlotSetup


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate after `prompt` (token ids); the values are checked by `check_request`."""

    prompt: tuple[int, ...]
    max_tokens: int = 16
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    exit_threshold: float = 1.0    # Q-exit q; 1 = full depth
    depth: int | None = None       # recurrent steps; None = the server's depth
    logprobs: int | None = None    # None = none; n = the sampled token's and n alternatives
    timeout_s: float | None = None


def _number(name: str, value, low: float, high: float, *, integer: bool = False, open_low: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        raise ValueError(f"{name} must lie in {'(' if open_low else '['}{low}, {high}], got {value}")


def check_request(request: Request, setup: SlotSetup) -> Request:
    """Raises ValueError (one line, naming the field) unless the server can run `request`; returns
    it with the depth resolved. Per-concept checks (q in [0, 1], depth, temperature...) belong in a
    shared validator module once there is one."""
    cfg, room = setup.cfg, setup.cache_length - 1
    if not request.prompt:
        raise ValueError("the prompt is empty: generation needs at least one prompt token")
    bad = [t for t in (*request.prompt, *request.stop_ids) if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
    if bad:
        raise ValueError(f"token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    _number("max_tokens", request.max_tokens, 1, room, integer=True)
    if len(request.prompt) + request.max_tokens > room:
        raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                         f"the server's context of {room} tokens")
    _number("temperature", request.temperature, 0.0, 100.0)
    _number("top_k", request.top_k, 0, cfg.vocab_size, integer=True)
    _number("top_p", request.top_p, 0.0, 1.0, open_low=True)
    _number("seed", request.seed, 0, 2**32 - 1, integer=True)
    _number("exit_threshold", request.exit_threshold, 0.0, 1.0)
    depth = setup.depth if request.depth is None else request.depth
    _number("depth", depth, 1, setup.depth, integer=True)
    if request.logprobs is not None:
        _number("logprobs", request.logprobs, 0, TOP_LOGPROBS, integer=True)
    if request.timeout_s is not None:
        _number("timeout", request.timeout_s, 0.0, 24 * 3600.0, open_low=True)
    return dataclasses.replace(request, depth=depth)


def as_ids(values: Sequence) -> tuple[int, ...]:
    """A tuple of ints from a sequence of ints (booleans and other types are refused)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"token ids must be integers, got {list(values)[:5]}")
    return tuple(values)
