"""The static settings and traced inputs of a compiled generation program, and the rules they obey:
prompt buckets, cache lengths, the Q-exit threshold, what self-speculative decoding admits."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ouro_jax import validate
from ouro_jax.config import OuroConfig
from ouro_jax.exit import exit_cdf
from ouro_jax.inference.sampling import SamplingParams
from ouro_jax.model import Ouro

EXIT_MODES = ("early", "select")


def prompt_bucket(length: int, min_bucket: int = 8) -> int:
    """The padded prompt length: the next power of two >= length (at least `min_bucket`)."""
    return max(min_bucket, 1 << (max(length, 1) - 1).bit_length())


def cache_positions(bucket: int, max_new_tokens: int, draft_tokens: int = 0) -> int:
    """Cache positions a generation writes: the padded prompt, every fed token (all new ones but the last)
    and a verified chunk of `draft_tokens`."""
    return bucket + max_new_tokens - 1 + draft_tokens


def default_cache_length(longest_prompt: int, max_new_tokens: int, min_bucket: int = 8, draft_tokens: int = 0) -> int:
    """The power-of-two cache length that holds `cache_positions` of the bucketed prompt."""
    return prompt_bucket(cache_positions(prompt_bucket(longest_prompt, min_bucket), max_new_tokens, draft_tokens),
                         min_bucket)


def resolve_exit_threshold(cfg: OuroConfig, exit_threshold: float | None) -> float:
    """The Q-exit q of a run: the given one, else the config's; no threshold (None) means 1 (full depth)."""
    q = cfg.early_exit_threshold if exit_threshold is None else exit_threshold
    return 1.0 if q is None else validate.exit_threshold(q)


def check_speculative(policy: str, exit_mode: str, q: float, depth: int, draft_tokens: int, draft_depth: int) -> None:
    """Raises unless self-speculative decoding with these settings is lossless and possible.

    Verification runs every step of a chunk at once, each chunk position attending to the cache and
    to the chunk's own K/V of the same step. Sequential decoding sees exactly that only under `full`
    (step t reads slot t); `last` and `average` would need the earlier chunk tokens' last or mean
    K/V, and `first` their step-0 K/V, at every step: not what a chunk sees of itself at step t.
    The compute-saving `early` mode with q < 1 copies exit-step K/V into deeper slots, which a chunk
    cannot either; its `select` counterpart (every step computed) verifies exactly.
    """
    if int(draft_tokens) != draft_tokens or draft_tokens < 0:
        raise ValueError(f"draft_tokens must be an integer >= 0 (0 = no speculation), got {draft_tokens}")
    if draft_tokens == 0:
        return
    if policy != "full":
        raise ValueError(f"speculative decoding needs the 'full' KV-cache policy (chunked verification), "
                         f"got {policy!r}")
    if exit_mode == "early" and q < 1.0:
        raise ValueError("speculative decoding verifies every step: use exit_mode='select' with exit_threshold < 1")
    if int(draft_depth) != draft_depth or not 1 <= draft_depth < depth:
        raise ValueError(f"draft_depth must be an integer in [1, depth={depth}), got {draft_depth}")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static (shape- and branch-deciding) settings of one compiled program."""

    cfg: OuroConfig
    policy: str
    depth: int
    cache_length: int
    exit_mode: str = "early"
    draft_tokens: int = 0
    draft_depth: int = 1
    return_logits: bool = False
    return_cache: bool = False
    stream: bool = False


class Inputs(NamedTuple):
    """The traced inputs of one run."""

    prompt_ids: jax.Array      # [B, P] int32, left-padded
    prompt_lengths: jax.Array  # [B] int32
    max_new_tokens: jax.Array  # [] int32
    seed: jax.Array            # [] uint32
    sampling: SamplingParams
    exit_threshold: jax.Array  # [] float32
    stop_ids: jax.Array        # [W] int32, -1 = unused
    stream_id: jax.Array       # [] int32


def apply_model(cfg: OuroConfig, params, *args, **kwargs):
    """`Ouro(cfg).apply` on the parameters (a method by `method=`)."""
    return Ouro(cfg).apply({"params": params}, *args, **kwargs)


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """Whether each token is one of `stop_ids` ([W], -1 = unused; or [B, W] per row for tokens [B])."""
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


def exit_reached(gates: jax.Array, step: jax.Array, depth, threshold: jax.Array) -> jax.Array:
    """Whether Q-exit fires at `step` (0-based) given the gate logits [D, ...] up to it; `depth` and
    `threshold` are scalars or broadcast against the gates' trailing axes (per-row settings)."""
    cdf = jax.lax.dynamic_index_in_dim(exit_cdf(gates), step, axis=0, keepdims=False)
    return (step == depth - 1) | ((threshold < 1.0) & (cdf >= threshold))
