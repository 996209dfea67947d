"""One validator per user-facing value: every caller (library functions, the engine, the training config,
the lm-eval adapter, the CLIs) checks a value here, so they all accept and refuse the same things.

Each validator returns the value in its canonical type or raises ConfigError with one line naming it.
`name` is how the caller's user spells the value (`--exit-threshold`, `loss.beta`, `exit_threshold=`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from numbers import Integral, Real

import jax

from ouro_jax.errors import ConfigError

KV_POLICIES = ("full", "last", "first", "average")   # decode KV-cache policy (inference/cache.py)
OBJECTIVES = ("stage1", "last_step", "stage2")       # training objective (losses.py)
COMPUTE_DTYPES = ("float32", "bfloat16")             # what a CLI's --dtype accepts


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An integer in [low, high) (either bound optional); 2.7, "3", True and NaN are refused."""
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, Real) and math.isfinite(value) and float(value).is_integer():
        ok = not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value >= high):
        bound = f" in [{low}, {high})" if high is not None else (f" >= {low}" if low is not None else "")
        raise ConfigError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def number(name: str, value, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, what: str = "") -> float:
    """A finite real in [low, high] ((low, high] with `low_open`); NaN, inf and non-numbers are refused."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lower = "-inf" if low is None else f"{low:g}"
        upper = "inf)" if high is None else f"{high:g}]"
        interval = f"{'(' if low_open or low is None else '['}{lower}, {upper}"
        raise ConfigError(f"{name} must be a finite number in {interval}{what}, got {value!r}")
    return float(value)


def exit_threshold(value, name: str = "exit_threshold") -> float:
    """The Q-exit threshold q in [0, 1] (1 = full depth)."""
    return number(name, value, 0.0, 1.0)


def thresholds(values: Iterable, name: str = "thresholds") -> list[float]:
    """A non-empty list of Q-exit thresholds."""
    values = list(values)
    if not values:
        raise ConfigError(f"{name}: give at least one Q-exit threshold in [0, 1]")
    return [exit_threshold(q, name) for q in values]


def num_steps(value, name: str = "num_steps", most: int | None = None) -> int:
    """Recurrent steps (depth) to run: an integer >= 1 (more than the trained T extrapolates), at most
    `most` where the caller's cache or program holds no more."""
    return integer(name, value, 1, None if most is None else most + 1)


def exit_step(value, depth: int, name: str = "exit_at_step") -> int:
    """A 0-based static exit step below `depth`."""
    return integer(name, value, 0, depth)


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(options)}")
    return value


def kv_policy(value, name: str = "KV-cache policy") -> str:
    return choice(name, value, KV_POLICIES)


def objective(value, name: str = "loss.objective") -> str:
    return choice(name, value, OBJECTIVES)


def compute_dtype(value, name: str = "dtype") -> str:
    return choice(name, value, COMPUTE_DTYPES)


def positive(name: str, value) -> int:
    """A count that must be >= 1: batch sizes, lengths, chunk sizes, examples."""
    return integer(name, value, 1)


def batch_ramp(text: str, batch_size: int, name: str = "data.batch_ramp") -> list[tuple[int, int]]:
    """`"STEP:BATCH,..."` as [(step, batch)]: from optimizer step STEP on (0-based, ascending, >= 1), BATCH
    sequences per step, each a multiple of `batch_size` (the fixed micro-batch stream); "" = none."""
    ramp = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        step, sep, batch = part.partition(":")
        if not (sep and step.strip().isdigit() and batch.strip().isdigit()):
            raise ConfigError(f"{name} must be 'STEP:BATCH,...' (e.g. '1000:64'), got {text!r}")
        step, batch = int(step), int(batch)
        if step < 1 or (ramp and step <= ramp[-1][0]):
            raise ConfigError(f"{name} steps must be >= 1 and ascending, got {text!r}")
        if batch < batch_size or batch % batch_size:
            raise ConfigError(f"{name} batch {batch} must be a multiple of data.batch_size ({batch_size})")
        ramp.append((step, batch))
    return ramp


def positions(name: str, length: int, max_position_embeddings: int) -> int:
    """A sequence length that the model's positions cover (the model never saw beyond them)."""
    length = positive(name, length)
    if length > max_position_embeddings:
        raise ConfigError(f"{name} ({length}) exceeds the model's max_position_embeddings "
                          f"({max_position_embeddings})")
    return length


def token_ids(name: str, ids: Iterable, vocab_size: int) -> list[int]:
    """Token ids in [0, vocab_size) (a negative id would index from the end, one >= V gives NaN)."""
    ids = list(ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return [int(t) for t in ids]


def prompt_ids(name: str, ids: Iterable, vocab_size: int) -> list[int]:
    """A prompt: at least one token id, each in [0, vocab_size)."""
    ids = token_ids(name, ids, vocab_size)
    if not ids:
        raise ConfigError(f"{name} is empty: generation needs at least one prompt token")
    return ids


def seed(value, name: str = "seed") -> int:
    """A sampling seed: an unsigned 32-bit integer."""
    return integer(name, value, 0, 2**32)


def sampling(temperature, top_k, top_p) -> tuple[float, int, float]:
    """(temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), top_p in (0, 1] (1 = off))."""
    return (number("temperature", temperature, 0.0, what=" (0 = greedy)"),
            integer("top_k", top_k, 0),
            number("top_p", top_p, 0.0, 1.0, low_open=True, what=" (1 = off)"))


def loss_beta(value, name: str = "loss.beta") -> float:
    """The entropy weight of the Stage I objective: finite and >= 0 (a negative beta rewards collapse)."""
    return number(name, value, 0.0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def device_memory() -> int | None:
    """Bytes of memory one local device offers: its allocator's limit (TPU, GPU), else the host's RAM (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fits_memory(what: str, needed_bytes: float, available_bytes: float | None = None) -> None:
    """Refuses, before anything compiles, work whose estimated device memory exceeds what one device has
    (`available_bytes`, default `device_memory()`)."""
    available_bytes = device_memory() if available_bytes is None else available_bytes
    if available_bytes is not None and needed_bytes > available_bytes:
        raise ConfigError(f"{what} does not fit: needs {format_bytes(needed_bytes)} of "
                          f"{format_bytes(available_bytes)} device memory")
