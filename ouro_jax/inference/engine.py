"""Prefill and decode under one `jit` with static shapes, with early exit that stops looping.

One compiled program generates a whole batch: the prompt (left-padded to a power-of-two bucket) runs
through every recurrent step at once and fills the cache; then a `lax.while_loop` over generated
tokens feeds one token per row per iteration, and inside it a `lax.while_loop` over recurrent steps
ends as soon as every live row has exited (Q-exit threshold q, or the fixed depth). Shapes depend only
on (batch, prompt bucket, cache length, depth, policy): other prompts in the bucket, `max_new_tokens`,
the sampling settings, q and the seed are traced values and reuse the compiled program.

Depth beyond the trained T extrapolates: the model runs `depth` steps everywhere (prefill too), as
the released code does with `total_ut_steps = depth`; the `full` cache then has `depth` slots and the
exit rule uses the `depth`-step exit distribution. q >= 1 disables early exit (always the full depth).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from ouro_jax.config import OuroConfig
from ouro_jax.exit import exit_cdf, q_exit_step
from ouro_jax.inference.cache import (KVCache, cache_bytes, check_policy, init_cache, step_view, write_prefill,
                                      write_step)
from ouro_jax.inference.sampling import SamplingParams, sample_tokens
from ouro_jax.model import Ouro

# stream(index, tokens [B], live [B]): called in order for every generated position; `live` marks the
# rows that produced a token there (rows that already stopped carry the pad id).
StreamCallback = Callable[[int, np.ndarray, np.ndarray], None]

_STOP_IDS_WIDTH = 8  # stop ids are padded to a multiple of this, so their count rarely recompiles
_streams: dict[int, StreamCallback] = {}
_stream_ids = itertools.count()
_traces = 0


def trace_count() -> int:
    """How many times the generation program has been traced (= compiled) in this process."""
    return _traces


def prompt_bucket(length: int, min_bucket: int = 8) -> int:
    """The padded prompt length: the next power of two >= length (at least `min_bucket`)."""
    return max(min_bucket, 1 << (max(length, 1) - 1).bit_length())


def default_cache_length(longest_prompt: int, max_new_tokens: int, min_bucket: int = 8) -> int:
    """The power-of-two cache length that holds the bucketed prompt and every fed token."""
    return prompt_bucket(prompt_bucket(longest_prompt, min_bucket) + max_new_tokens, min_bucket)


def resolve_exit_threshold(cfg: OuroConfig, exit_threshold: float | None) -> float:
    """The Q-exit q of a run: the given one, else the config's; no threshold (None) means 1 (full depth)."""
    q = cfg.early_exit_threshold if exit_threshold is None else exit_threshold
    q = 1.0 if q is None else float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"exit_threshold must lie in [0, 1], got {q}")
    return q


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: np.ndarray              # [B, G] generated ids, G = max_new_tokens; pad id after a row stops
    lengths: np.ndarray             # [B] tokens generated per row, a stop token included
    depths: np.ndarray              # [B, G] recurrent steps whose output produced each token (0 = none)
    decode_steps: int               # recurrent-step iterations the decode loops ran (for the whole batch)
    decode_layer_applications: int  # decode_steps * N: layer applications actually executed in decode
    cache_bytes: int
    prompt_bucket: int
    cache_length: int
    logits: np.ndarray | None = None  # [B, G, V] float32 logits that produced each token
    cache: KVCache | None = None      # the final cache, [slots, N, B, L, KVH, hd]

    @property
    def mean_depth(self) -> float:
        """Mean realized depth over the generated tokens."""
        valid = self.depths > 0
        return float(self.depths[valid].mean()) if valid.any() else 0.0

    def rows(self) -> list[list[int]]:
        """The generated ids of each row, without the padding after a stop."""
        return [self.tokens[b, :n].tolist() for b, n in enumerate(self.lengths)]


def _emit(stream_id, index, tokens, live):
    _streams[int(stream_id)](int(index), np.asarray(tokens), np.asarray(live))


def _exit_at(gate_logits: jax.Array, threshold: jax.Array) -> jax.Array:
    """0-based exit step per row from gate logits [D, B]: Q-exit when q < 1, else the last step."""
    return jnp.where(threshold < 1.0, q_exit_step(gate_logits, threshold), gate_logits.shape[0] - 1)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "depth", "cache_length", "return_logits",
                                             "return_cache", "stream"))
def _generate_program(params, prompt_ids, prompt_lengths, max_new_tokens, seed, sampling: SamplingParams,
                      exit_threshold, stop_ids, stream_id, *, cfg: OuroConfig, policy: str, depth: int,
                      cache_length: int, return_logits: bool, return_cache: bool, stream: bool):
    global _traces
    _traces += 1
    model, variables = Ouro(cfg), {"params": params}
    batch, bucket = prompt_ids.shape
    out_len = cache_length - bucket + 1      # the most tokens this cache can produce
    pad = bucket - prompt_lengths             # left padding per row
    key = jax.random.key(seed)
    slot_pos = jnp.arange(cache_length)

    def emit(index, tokens, live):
        if stream:
            io_callback(_emit, None, stream_id, index, tokens, live, ordered=True)

    def is_stop(tokens):
        return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)

    # ---- prefill: every step over the prompt; the last position's exit step gives token 0
    prompt_mask = (jnp.arange(bucket)[None, :] >= pad[:, None]).astype(jnp.int32)
    out = model.apply(variables, prompt_ids, attention_mask=prompt_mask, num_steps=depth, return_kv=True)
    exit_step = _exit_at(out.gate_logits[:, :, -1], exit_threshold)
    h_exit = jnp.take_along_axis(out.hidden_states[:, :, -1], exit_step[None, :, None], axis=0)[0]
    logits = model.apply(variables, h_exit, method=Ouro.logits)
    cache = write_prefill(init_cache(cfg, policy, depth, batch, cache_length), policy, out.kv)

    token = sample_tokens(logits, jax.random.fold_in(key, 0), sampling)
    emit(0, token, jnp.ones((batch,), bool))
    tokens = jnp.full((batch, out_len), cfg.pad_token_id, jnp.int32).at[:, 0].set(token)
    depths = jnp.zeros((batch, out_len), jnp.int32).at[:, 0].set(exit_step + 1)
    all_logits = (jnp.zeros((batch, out_len, cfg.vocab_size), jnp.float32).at[:, 0].set(logits)
                  if return_logits else None)
    done = is_stop(token) | (max_new_tokens <= 1)

    # ---- decode one token per row: recurrent steps until every live row has exited
    def decode_token(cache, token, index, positions, key_mask, live):
        h = model.apply(variables, token[:, None], method=Ouro.embed)            # [B, 1, d]
        mask, pos = key_mask[:, None, None, :], positions[:, None]

        def running(state):
            step, _, exited, *_ = state
            return (step < depth) & jnp.any(~exited)

        def one_step(state):
            step, h, exited, exit_step, gate_buf, cache = state
            h_new, gate, new_kv = model.apply(variables, h, pos, mask, kv_cache=step_view(cache, policy, step),
                                               cache_index=index, method=Ouro.step)
            gate_buf = gate_buf.at[step].set(gate[:, 0])
            cdf = jax.lax.dynamic_index_in_dim(exit_cdf(gate_buf), step, axis=0, keepdims=False)
            reached = (step == depth - 1) | ((exit_threshold < 1.0) & (cdf >= exit_threshold))
            active = ~exited
            cache = write_step(cache, policy, new_kv, index, step, active)
            h = jnp.where(active[:, None, None], h_new, h)
            exit_step = jnp.where(active, step, exit_step)
            return step + 1, h, exited | reached, exit_step, gate_buf, cache

        state = (jnp.int32(0), h, ~live, jnp.zeros((batch,), jnp.int32), jnp.zeros((depth, batch), jnp.float32), cache)
        steps, h, _, exit_step, _, cache = jax.lax.while_loop(running, one_step, state)
        return model.apply(variables, h[:, 0], method=Ouro.logits), steps, exit_step, cache

    def generating(state):
        i, done, *_ = state
        return (i < out_len) & jnp.any(~done)

    def next_token(state):
        i, done, token, cache, tokens, depths, all_logits, decode_steps = state
        index = bucket + i - 1                                  # cache position of the token fed now
        key_mask = (slot_pos[None, :] >= pad[:, None]) & (slot_pos[None, :] <= index)
        live = ~done
        logits, steps, exit_step, cache = decode_token(cache, token, index, prompt_lengths + i - 1, key_mask, live)
        token = jnp.where(live, sample_tokens(logits, jax.random.fold_in(key, i), sampling), cfg.pad_token_id)
        emit(i, token, live)
        tokens = tokens.at[:, i].set(token)
        depths = depths.at[:, i].set(jnp.where(live, exit_step + 1, 0))
        if return_logits:
            all_logits = all_logits.at[:, i].set(logits)
        done = done | is_stop(token) | (i + 1 >= max_new_tokens)
        return i + 1, done, token, cache, tokens, depths, all_logits, decode_steps + steps

    state = (jnp.int32(1), done, token, cache, tokens, depths, all_logits, jnp.int32(0))
    _, _, _, cache, tokens, depths, all_logits, decode_steps = jax.lax.while_loop(generating, next_token, state)
    return dict(tokens=tokens, depths=depths, decode_steps=decode_steps, logits=all_logits,
                cache=cache if return_cache else None)


def _validate_prompts(cfg: OuroConfig, prompts) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = np.asarray(prompts)
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2:
            raise ValueError(f"prompts must be a list of id lists or a [B, S] array, got shape {prompts.shape}")
        prompts = prompts.tolist()
    rows = [list(p) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {b} is empty: generation needs at least one prompt token")
        bad = [t for t in row if not (isinstance(t, (int, np.integer)) and 0 <= t < cfg.vocab_size)]
        if bad:
            raise ValueError(f"prompt {b} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    return [[int(t) for t in row] for row in rows]


def generate(cfg: OuroConfig, params: dict[str, Any], prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, policy: str = "full", depth: int | None = None,
             exit_threshold: float | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_token_ids: Sequence[int] = (), cache_length: int | None = None,
             stream: StreamCallback | None = None, return_logits: bool = False, return_cache: bool = False,
             min_bucket: int = 8) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens after each prompt (a ragged batch, left-padded).

    policy: KV-cache policy at decode (`full`, `last`, `first`, `average`); depth: recurrent steps
    (default T; more than T extrapolates); exit_threshold: Q-exit q (default the config's, 1.0 = off);
    temperature 0 is greedy; generation of a row stops after any of `stop_token_ids`. cache_length
    defaults to the power-of-two bucket of prompt bucket + max_new_tokens; fix it to reuse one
    compiled program across calls with other lengths.
    """
    rows = _validate_prompts(cfg, prompts)
    check_policy(policy)
    depth = cfg.total_ut_steps if depth is None else depth
    if int(depth) != depth or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth}")
    q = resolve_exit_threshold(cfg, exit_threshold)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed}")
    bad_stops = [t for t in stop_token_ids if not 0 <= t < cfg.vocab_size]
    if bad_stops:
        raise ValueError(f"stop token ids outside the vocabulary [0, {cfg.vocab_size}): {bad_stops}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    bucket = prompt_bucket(longest, min_bucket)
    needed = bucket + max_new_tokens - 1      # cache positions: the padded prompt and every fed token
    if cache_length is None:
        cache_length = default_cache_length(longest, max_new_tokens, min_bucket)
    elif needed > cache_length:
        raise ValueError(f"prompt (bucketed to {bucket} tokens) + max_new_tokens ({max_new_tokens}) needs "
                         f"{needed} cache positions, beyond cache_length ({cache_length})")

    ids = np.full((len(rows), bucket), cfg.pad_token_id, np.int32)
    for b, row in enumerate(rows):
        ids[b, bucket - len(row):] = row
    width = _STOP_IDS_WIDTH * max(1, -(-len(stop_token_ids) // _STOP_IDS_WIDTH))
    stops = np.full((width,), -1, np.int32)
    stops[:len(stop_token_ids)] = list(stop_token_ids)
    stream_id = next(_stream_ids)
    if stream is not None:
        _streams[stream_id] = stream
    try:
        out = _generate_program(
            params, jnp.asarray(ids), jnp.asarray([len(r) for r in rows], jnp.int32), jnp.int32(max_new_tokens),
            jnp.uint32(seed), SamplingParams.make(temperature, top_k, top_p), jnp.float32(q), jnp.asarray(stops),
            jnp.int32(stream_id), cfg=cfg, policy=policy, depth=int(depth), cache_length=int(cache_length),
            return_logits=return_logits, return_cache=return_cache, stream=stream is not None)
        cache = out.pop("cache")               # stays on the device
        out = jax.device_get(out)
    finally:
        _streams.pop(stream_id, None)

    tokens = out["tokens"][:, :max_new_tokens]
    depths = out["depths"][:, :max_new_tokens]
    decode_steps = int(out["decode_steps"])
    return GenerationResult(
        tokens=tokens, lengths=(depths > 0).sum(axis=1), depths=depths, decode_steps=decode_steps,
        decode_layer_applications=decode_steps * cfg.num_hidden_layers,
        cache_bytes=cache_bytes(cfg, policy, int(depth), len(rows), int(cache_length)), prompt_bucket=bucket,
        cache_length=int(cache_length), logits=None if out["logits"] is None else out["logits"][:, :max_new_tokens],
        cache=cache)
