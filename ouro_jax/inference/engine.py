"""Prefill and decode under one `jit` with static shapes: early exit, exact per-token selection,
self-speculative decoding.

One compiled program generates a whole batch: the prompt (left-padded to a power-of-two bucket) runs
through every recurrent step at once and fills the cache; then a `lax.while_loop` over generated
tokens feeds one token per row per iteration. Shapes depend only on (batch, prompt bucket, cache
length, depth, policy, exit mode, draft settings): other prompts in the bucket, `max_new_tokens`, the
sampling settings, q and the seed are traced values and reuse the compiled program.

Exit modes (Q-exit threshold q; q >= 1 always runs the full depth, and then both modes are identical):

- `early`:  compute-saving. Each token's recurrent steps run in a `lax.while_loop` that ends as soon as
            every live row has reached CDF >= q; an exited row's K/V fills its deeper slots (`full`).
- `select`: the released `generate(exit_threshold=q)`, token for token. Every step runs for every
            token and fills its own cache slot; q only picks, per token, the step whose logits are used.

Self-speculative decoding (`draft_tokens=k > 0`): the model at `draft_depth` steps drafts k tokens
one at a time, then all `depth` steps verify the k + 1 fed tokens in one chunked pass over the cache
(`Ouro.step` on a chunk of queries) and write their K/V. The longest agreeing prefix is kept, plus the
verifier's own next token, under the rejection rule of speculative sampling, so the output is that
of the `select` mode (greedy: identical tokens; sampling: the same distribution). Only the `full`
policy admits a parallel verification (see `check_speculative`).

Depth beyond the trained T extrapolates: the model runs `depth` steps everywhere (prefill too), as
the released code does with `total_ut_steps = depth`; the `full` cache then has `depth` slots and the
exit rule uses the `depth`-step exit distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from ouro_jax.config import OuroConfig
from ouro_jax.exit import exit_cdf, q_exit_step
from ouro_jax.inference.cache import (
    KVCache,
    cache_bytes,
    check_policy,
    init_cache,
    step_view,
    write_chunk,
    write_prefill,
    write_step,
)
from ouro_jax.inference.sampling import (
    SamplingParams,
    sample_from_probs,
    sample_tokens,
    speculative_accept,
    token_probs,
)
from ouro_jax.model import Ouro

# stream(index, tokens [B], live [B]): called in order for every generated position; `live` marks the
# rows that produced a token there (rows that already stopped carry the pad id).
StreamCallback = Callable[[int, np.ndarray, np.ndarray], None]

EXIT_MODES = ("early", "select")
_STOP_IDS_WIDTH = 8  # stop ids are padded to a multiple of this, so their count rarely recompiles
_streams: dict[int, StreamCallback] = {}
_stream_ids = itertools.count()


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
    q = 1.0 if q is None else float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"exit_threshold must lie in [0, 1], got {q}")
    return q


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
class GenerationResult:
    tokens: np.ndarray              # [B, G] generated ids, G = max_new_tokens; pad id after a row stops
    lengths: np.ndarray             # [B] tokens generated per row, a stop token included
    depths: np.ndarray              # [B, G] recurrent step whose output produced each token (0 = none)
    decode_steps: int               # recurrent-step iterations the decode loops ran (for the whole batch)
    decode_layer_applications: int  # decode_steps * N: layer-stack applications actually executed in decode
    cache_bytes: int
    prompt_bucket: int
    cache_length: int
    exit_mode: str = "early"
    draft_rounds: int = 0             # speculative rounds (one draft + one verification each)
    drafted_tokens: int = 0           # draft tokens proposed to live rows
    accepted_tokens: int = 0          # of those, accepted by each row's own verification
    drafted_per_row: np.ndarray | None = None   # [B] draft tokens proposed to each row while it was live
    accepted_per_row: np.ndarray | None = None  # [B] of those, accepted by the row's verification
    logits: np.ndarray | None = None  # [B, G, V] float32 logits that produced each token
    cache: KVCache | None = None      # the final cache, [slots, N, B, L, KVH, hd]

    @property
    def mean_depth(self) -> float:
        """Mean realized (early) or selected (select) depth over the generated tokens."""
        valid = self.depths > 0
        return float(self.depths[valid].mean()) if valid.any() else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the drafted tokens that were accepted (0 without speculation)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def row_acceptance_rates(self) -> np.ndarray:
        """[B] each row's fraction of its drafted tokens accepted (0 where none were drafted)."""
        if self.drafted_per_row is None:
            return np.zeros(len(self.tokens))
        return self.accepted_per_row / np.maximum(self.drafted_per_row, 1)

    def rows(self) -> list[list[int]]:
        """The generated ids of each row, without the padding after a stop."""
        return [self.tokens[b, :n].tolist() for b, n in enumerate(self.lengths)]


# ---------------------------------------------------------------- the compiled program


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


class StepState(NamedTuple):
    """The loop state over one token's recurrent steps."""

    step: jax.Array       # [] int32
    h: jax.Array          # [B, S, d] running hidden state
    h_out: jax.Array      # [B, S, d] hidden state of the exit step (frozen once a row has exited)
    exited: jax.Array     # [B, S] bool
    exit_step: jax.Array  # [B, S] int32, 0-based
    gates: jax.Array      # [D, B, S] float32 gate logits so far
    cache: KVCache


class TokenState(NamedTuple):
    """The loop state over generated positions."""

    i: jax.Array             # [] int32: tokens emitted per row so far
    done: jax.Array          # [B] bool
    token: jax.Array         # [B] int32: the last emitted token, fed next
    cache: KVCache
    tokens: jax.Array        # [B, G'] int32
    depths: jax.Array        # [B, G'] int32
    logits: jax.Array | None  # [B, G', V] float32 when return_logits
    decode_steps: jax.Array  # [] int32
    rounds: jax.Array        # [] int32 speculative rounds
    drafted: jax.Array       # [B] int32 draft tokens proposed to each row
    accepted: jax.Array      # [B] int32 of those, accepted by the row's own verification


def _apply(setup: Setup, params, *args, **kwargs):
    return Ouro(setup.cfg).apply({"params": params}, *args, **kwargs)


def _emit(stream_id, start, tokens, live, count):
    """Host side of streaming: positions start .. start + count - 1 of tokens / live [B, C]."""
    for j in range(int(count)):
        _streams[int(stream_id)](int(start) + j, np.asarray(tokens[:, j]), np.asarray(live[:, j]))


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


def _exit_reached(gates: jax.Array, step: jax.Array, depth: int, threshold: jax.Array) -> jax.Array:
    """Whether Q-exit fires at `step` (0-based) given the gate logits [D, ...] up to it."""
    cdf = jax.lax.dynamic_index_in_dim(exit_cdf(gates), step, axis=0, keepdims=False)
    return (step == depth - 1) | ((threshold < 1.0) & (cdf >= threshold))


def prefill(setup: Setup, params, inputs: Inputs) -> tuple[KVCache, jax.Array, jax.Array]:
    """Every step over the prompt -> (cache, logits [B, V] of the last position's exit step, exit step [B])."""
    cfg, depth = setup.cfg, setup.depth
    batch, bucket = inputs.prompt_ids.shape
    pad = bucket - inputs.prompt_lengths
    prompt_mask = (jnp.arange(bucket)[None, :] >= pad[:, None]).astype(jnp.int32)
    out = _apply(setup, params, inputs.prompt_ids, attention_mask=prompt_mask, num_steps=depth, return_kv=True)
    gates = out.gate_logits[:, :, -1]
    exit_step = jnp.where(inputs.exit_threshold < 1.0, q_exit_step(gates, inputs.exit_threshold), depth - 1)
    h_exit = jnp.take_along_axis(out.hidden_states[:, :, -1], exit_step[None, :, None], axis=0)[0]
    logits = _apply(setup, params, h_exit, method=Ouro.logits)
    cache = write_prefill(init_cache(cfg, setup.policy, depth, batch, setup.cache_length), setup.policy, out.kv)
    return cache, logits, exit_step


def run_steps(setup: Setup, params, cache: KVCache, h: jax.Array, positions: jax.Array, mask: jax.Array,
              index: jax.Array, live: jax.Array, threshold: jax.Array, depth: int,
              exit_mode: str) -> tuple[StepState, jax.Array]:
    """Recurrent steps of one fed token per row (h [B, 1, d], mask [B, 1, 1, L]) at cache `index`.

    `early` stops when every live row has exited; `select` runs all `depth` steps and keeps the
    exit step's hidden state. Returns the final state and the number of steps run.
    """
    batch = h.shape[0]

    def running(s: StepState):
        return (s.step < depth) & jnp.any(~s.exited) if exit_mode == "early" else s.step < depth

    def one_step(s: StepState) -> StepState:
        view = step_view(s.cache, setup.policy, s.step)
        h_new, gate, new_kv = _apply(setup, params, s.h, positions, mask, kv_cache=view, cache_index=index,
                                     method=Ouro.step)
        gates = s.gates.at[s.step].set(gate)
        reached = _exit_reached(gates, s.step, depth, threshold)
        active = ~s.exited                                 # rows still selecting their exit step
        writing = active[:, 0] if exit_mode == "early" else live
        cache = write_step(s.cache, setup.policy, new_kv, index, s.step, writing)
        h_out = jnp.where(active[..., None], h_new, s.h_out)
        h = h_out if exit_mode == "early" else h_new
        exit_step = jnp.where(active, s.step, s.exit_step)
        return StepState(s.step + 1, h, h_out, s.exited | reached, exit_step, gates, cache)

    exited = jnp.broadcast_to(~live[:, None], h.shape[:2])
    init = StepState(jnp.int32(0), h, h, exited, jnp.zeros(h.shape[:2], jnp.int32),
                     jnp.zeros((depth, batch, h.shape[1]), jnp.float32), cache)
    final = jax.lax.while_loop(running, one_step, init)
    return final, final.step


def decode_one_token(setup: Setup, params, inputs: Inputs, cache: KVCache, token: jax.Array, i: jax.Array,
                     live: jax.Array, depth: int, exit_mode: str, threshold: jax.Array):
    """Feeds `token` [B] (the i-th generated, i >= 1) -> (logits [B, V], exit step [B], steps run, cache)."""
    bucket = inputs.prompt_ids.shape[1]
    index = bucket + i - 1                                      # cache position of the token fed now
    slots = jnp.arange(setup.cache_length)
    pad = bucket - inputs.prompt_lengths
    mask = ((slots[None, :] >= pad[:, None]) & (slots[None, :] <= index))[:, None, None, :]
    h = _apply(setup, params, token[:, None], method=Ouro.embed)
    final, steps = run_steps(setup, params, cache, h, (inputs.prompt_lengths + i - 1)[:, None], mask, index, live,
                             threshold, depth, exit_mode)
    logits = _apply(setup, params, final.h_out[:, 0], method=Ouro.logits)
    return logits, final.exit_step[:, 0], steps, final.cache


def next_token(setup: Setup, params, inputs: Inputs, s: TokenState) -> TokenState:
    """One generated position for every row (no speculation)."""
    live = ~s.done
    logits, exit_step, steps, cache = decode_one_token(setup, params, inputs, s.cache, s.token, s.i, live,
                                                       setup.depth, setup.exit_mode, inputs.exit_threshold)
    key = jax.random.fold_in(jax.random.key(inputs.seed), s.i)
    token = jnp.where(live, sample_tokens(logits, key, inputs.sampling), setup.cfg.pad_token_id)
    if setup.stream:
        io_callback(_emit, None, inputs.stream_id, s.i, token[:, None], live[:, None], 1, ordered=True)
    all_logits = None if s.logits is None else s.logits.at[:, s.i].set(logits)
    done = s.done | _is_stop(token, inputs.stop_ids) | (s.i + 1 >= inputs.max_new_tokens)
    return s._replace(i=s.i + 1, done=done, token=token, cache=cache, tokens=s.tokens.at[:, s.i].set(token),
                      depths=s.depths.at[:, s.i].set(jnp.where(live, exit_step + 1, 0)), logits=all_logits,
                      decode_steps=s.decode_steps + steps)


def draft(setup: Setup, params, inputs: Inputs, s: TokenState, key: jax.Array):
    """k tokens drafted at `draft_depth` steps, each fed back -> (tokens [B, k], probs [B, k, V], cache, steps)."""
    live = ~s.done

    def one(j, carry):
        cache, token, tokens, probs, steps = carry
        logits, _, ran, cache = decode_one_token(setup, params, inputs, cache, token, s.i + j, live,
                                                 setup.draft_depth, "early", jnp.float32(1.0))
        p = token_probs(logits, inputs.sampling)
        token = sample_from_probs(p, jax.random.fold_in(key, j))
        return cache, token, tokens.at[:, j].set(token), probs.at[:, j].set(p), steps + ran

    k, (batch, vocab) = setup.draft_tokens, (s.token.shape[0], setup.cfg.vocab_size)
    init = (s.cache, s.token, jnp.zeros((batch, k), jnp.int32), jnp.zeros((batch, k, vocab), jnp.float32),
            jnp.int32(0))
    cache, _, tokens, probs, steps = jax.lax.fori_loop(0, k, one, init)
    return tokens, probs, cache, steps


def verify(setup: Setup, params, inputs: Inputs, cache: KVCache, chunk: jax.Array, i: jax.Array, live: jax.Array):
    """All `depth` steps over the fed chunk [B, k+1] at once, its K/V written into every slot
    -> (logits [B, k+1, V] at each position's exit step, exit steps [B, k+1], cache)."""
    bucket, size = inputs.prompt_ids.shape[1], chunk.shape[1]
    index = bucket + i - 1
    slots = jnp.arange(setup.cache_length)
    pad = bucket - inputs.prompt_lengths
    ends = index + jnp.arange(size)                                      # each query's own position
    mask = (slots[None, None, :] >= pad[:, None, None]) & (slots[None, None, :] <= ends[None, :, None])
    positions = (inputs.prompt_lengths + i - 1)[:, None] + jnp.arange(size)[None]
    h = _apply(setup, params, chunk, method=Ouro.embed)

    def one_step(t, s: StepState) -> StepState:
        view = step_view(s.cache, "full", t)
        h_new, gate, new_kv = _apply(setup, params, s.h, positions, mask[:, None], kv_cache=view, cache_index=index,
                                     method=Ouro.step)
        gates = s.gates.at[t].set(gate)
        active = ~s.exited
        h_out = jnp.where(active[..., None], h_new, s.h_out)
        return StepState(t + 1, h_new, h_out, s.exited | _exit_reached(gates, t, setup.depth, inputs.exit_threshold),
                         jnp.where(active, t, s.exit_step), gates, write_chunk(s.cache, "full", new_kv, index, t))

    init = StepState(jnp.int32(0), h, h, jnp.zeros(chunk.shape, bool), jnp.zeros(chunk.shape, jnp.int32),
                     jnp.zeros((setup.depth, *chunk.shape), jnp.float32), cache)
    final = jax.lax.fori_loop(0, setup.depth, one_step, init)
    return _apply(setup, params, final.h_out, method=Ouro.logits), final.exit_step, final.cache


def next_chunk(setup: Setup, params, inputs: Inputs, s: TokenState) -> TokenState:
    """One speculative round: draft k tokens, verify them, emit the accepted prefix + one token per row."""
    k, live = setup.draft_tokens, ~s.done
    key_draft, key_accept = jax.random.split(jax.random.fold_in(jax.random.key(inputs.seed), s.i))
    drafts, draft_probs, cache, draft_steps = draft(setup, params, inputs, s, key_draft)
    chunk = jnp.concatenate([s.token[:, None], drafts], axis=1)
    logits, exit_step, cache = verify(setup, params, inputs, cache, chunk, s.i, live)
    accepted, proposal = speculative_accept(drafts, draft_probs, token_probs(logits, inputs.sampling), key_accept)
    n = jnp.min(jnp.where(live, accepted, k))           # one cache index for the batch: the common prefix

    j = jnp.arange(k + 1)[None]
    valid = live[:, None] & (j <= n) & (s.i + j < inputs.max_new_tokens)
    stops = _is_stop(proposal, inputs.stop_ids) & valid
    first_stop = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1), k + 1)
    valid = valid & (j <= first_stop[:, None])
    tokens = jnp.where(valid, proposal, setup.cfg.pad_token_id)
    if setup.stream:
        io_callback(_emit, None, inputs.stream_id, s.i, tokens, valid, jnp.minimum(n + 1, inputs.max_new_tokens - s.i),
                    ordered=True)
    count = n + 1
    done = s.done | stops.any(axis=1) | (s.i + count >= inputs.max_new_tokens)
    write = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, s.i, axis=1)
    all_logits = None if s.logits is None else write(s.logits, logits)
    return s._replace(i=s.i + count, done=done, token=jax.lax.dynamic_index_in_dim(tokens, n, axis=1, keepdims=False),
                      cache=cache, tokens=write(s.tokens, tokens),
                      depths=write(s.depths, jnp.where(valid, exit_step + 1, 0)), logits=all_logits,
                      decode_steps=s.decode_steps + draft_steps + setup.depth, rounds=s.rounds + 1,
                      drafted=s.drafted + k * live, accepted=s.accepted + jnp.where(live, accepted, 0))


@functools.partial(jax.jit, static_argnames=("setup",))
def _generate_program(params, inputs: Inputs, *, setup: Setup):
    cfg = setup.cfg
    batch, bucket = inputs.prompt_ids.shape
    width = setup.cache_length - bucket + 1 + setup.draft_tokens   # the most tokens this cache can produce (+ a chunk)
    cache, logits, exit_step = prefill(setup, params, inputs)
    token = sample_tokens(logits, jax.random.fold_in(jax.random.key(inputs.seed), 0), inputs.sampling)
    if setup.stream:
        io_callback(_emit, None, inputs.stream_id, 0, token[:, None], jnp.ones((batch, 1), bool), 1, ordered=True)
    state = TokenState(
        i=jnp.int32(1), done=_is_stop(token, inputs.stop_ids) | (inputs.max_new_tokens <= 1), token=token,
        cache=cache, tokens=jnp.full((batch, width), cfg.pad_token_id, jnp.int32).at[:, 0].set(token),
        depths=jnp.zeros((batch, width), jnp.int32).at[:, 0].set(exit_step + 1),
        logits=(jnp.zeros((batch, width, cfg.vocab_size), jnp.float32).at[:, 0].set(logits)
                if setup.return_logits else None),
        decode_steps=jnp.int32(0), rounds=jnp.int32(0), drafted=jnp.zeros(batch, jnp.int32),
        accepted=jnp.zeros(batch, jnp.int32))
    body = next_chunk if setup.draft_tokens else next_token
    state = jax.lax.while_loop(lambda s: jnp.any(~s.done), functools.partial(body, setup, params, inputs), state)
    return state._replace(cache=state.cache if setup.return_cache else None, done=None, token=None)


# ---------------------------------------------------------------- the public entry point


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


def _check_integer(name: str, value, low: int, high: int | None = None, what: str = "") -> int:
    if int(value) != value or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}{what}, got {value}")
    return int(value)


def _make_inputs(cfg: OuroConfig, rows: list[list[int]], bucket: int, max_new_tokens: int, seed: int,
                 sampling: SamplingParams, q: float, stop_token_ids: Sequence[int], stream_id: int) -> Inputs:
    ids = np.full((len(rows), bucket), cfg.pad_token_id, np.int32)
    for b, row in enumerate(rows):
        ids[b, bucket - len(row):] = row
    width = _STOP_IDS_WIDTH * max(1, -(-len(stop_token_ids) // _STOP_IDS_WIDTH))
    stops = np.full((width,), -1, np.int32)
    stops[:len(stop_token_ids)] = list(stop_token_ids)
    inputs = Inputs(jnp.asarray(ids), jnp.asarray([len(r) for r in rows], jnp.int32), jnp.int32(max_new_tokens),
                    jnp.uint32(seed), sampling, jnp.float32(q), jnp.asarray(stops), jnp.int32(stream_id))
    chex.assert_shape([inputs.prompt_ids, inputs.prompt_lengths], [(len(rows), bucket), (len(rows),)])
    chex.assert_type([inputs.prompt_ids, inputs.prompt_lengths, inputs.stop_ids], jnp.int32)
    chex.assert_rank([inputs.max_new_tokens, inputs.seed, inputs.exit_threshold, *sampling], 0)
    return inputs


def generate(cfg: OuroConfig, params: dict[str, Any], prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, policy: str = "full", depth: int | None = None,
             exit_threshold: float | None = None, exit_mode: str = "early", draft_tokens: int = 0,
             draft_depth: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_token_ids: Sequence[int] = (), cache_length: int | None = None,
             stream: StreamCallback | None = None, return_logits: bool = False, return_cache: bool = False,
             min_bucket: int = 8) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens after each prompt (a ragged batch, left-padded).

    policy: KV-cache policy at decode (`full`, `last`, `first`, `average`); depth: recurrent steps
    (default T; more than T extrapolates); exit_threshold: Q-exit q (default the config's, 1.0 = off);
    exit_mode: `early` (stop looping at the exit step, saves compute) or `select` (run every step,
    pick the exit step's logits: the released generate); draft_tokens k > 0: self-speculative
    decoding, drafting k tokens at `draft_depth` steps and verifying them at `depth` (lossless; `full`
    policy). temperature 0 is greedy; a row stops after any of `stop_token_ids`. cache_length
    defaults to the power-of-two bucket of prompt bucket + max_new_tokens - 1 (+ k); fix it to reuse one
    compiled program across calls with other lengths.
    """
    rows = _validate_prompts(cfg, prompts)
    check_policy(policy)
    depth = _check_integer("depth", cfg.total_ut_steps if depth is None else depth, 1)
    q = resolve_exit_threshold(cfg, exit_threshold)
    if exit_mode not in EXIT_MODES:
        raise ValueError(f"unknown exit_mode {exit_mode!r}; choose from {EXIT_MODES}")
    check_speculative(policy, exit_mode, q, depth, draft_tokens, draft_depth)
    max_new_tokens = _check_integer("max_new_tokens", max_new_tokens, 1)
    seed = _check_integer("seed", seed, 0, 2**32)
    bad_stops = [t for t in stop_token_ids if not 0 <= t < cfg.vocab_size]
    if bad_stops:
        raise ValueError(f"stop token ids outside the vocabulary [0, {cfg.vocab_size}): {bad_stops}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    bucket = prompt_bucket(longest, min_bucket)
    needed = cache_positions(bucket, max_new_tokens, draft_tokens)
    if cache_length is None:
        cache_length = default_cache_length(longest, max_new_tokens, min_bucket, draft_tokens)
    elif needed > cache_length:
        chunk = f" + draft_tokens ({draft_tokens})" if draft_tokens else ""
        raise ValueError(f"prompt (bucketed to {bucket} tokens) + max_new_tokens ({max_new_tokens}){chunk} needs "
                         f"{needed} cache positions, beyond cache_length ({cache_length})")

    setup = Setup(cfg, policy, depth, int(cache_length), exit_mode if q < 1.0 else "early", int(draft_tokens),
                  int(draft_depth) if draft_tokens else 1, return_logits, return_cache, stream is not None)
    stream_id = next(_stream_ids)
    inputs = _make_inputs(cfg, rows, bucket, max_new_tokens, seed, SamplingParams.make(temperature, top_k, top_p),
                          q, stop_token_ids, stream_id)
    if stream is not None:
        _streams[stream_id] = stream
    try:
        out = _generate_program(params, inputs, setup=setup)
        cache = out.cache                     # stays on the device
        out = jax.device_get(out._replace(cache=None))
    finally:
        _streams.pop(stream_id, None)

    chex.assert_shape([out.tokens, out.depths], (len(rows), cache_length - bucket + 1 + draft_tokens))
    tokens, depths = out.tokens[:, :max_new_tokens], out.depths[:, :max_new_tokens]
    return GenerationResult(
        tokens=tokens, lengths=(depths > 0).sum(axis=1), depths=depths, decode_steps=int(out.decode_steps),
        decode_layer_applications=int(out.decode_steps) * cfg.num_hidden_layers,
        cache_bytes=cache_bytes(cfg, policy, depth, len(rows), int(cache_length)), prompt_bucket=bucket,
        cache_length=int(cache_length), exit_mode=exit_mode, draft_rounds=int(out.rounds),
        drafted_tokens=int(out.drafted.sum()), accepted_tokens=int(out.accepted.sum()),
        drafted_per_row=out.drafted, accepted_per_row=out.accepted,
        logits=None if out.logits is None else out.logits[:, :max_new_tokens], cache=cache)
