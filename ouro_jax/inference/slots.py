"""Prefill and the decode step on a fixed set of cache rows ("slots"), for continuous batching.

Every slot is one sequence with its own position: slot b holds its tokens at cache positions
[0, position[b]) of row b, without padding. Requests join and leave between decode steps, so the
programs here take the per-slot state as traced inputs and compile once per slot count (the decode
step) or chunk size (prefill): nothing compiles per request.

- `prefill_chunk` runs every recurrent step of a request over a chunk of its prompt (attending to the
  earlier chunks in a one-row scratch cache with a slot per step), so a long prompt is prefilled a
  chunk between decode steps; `commit_prefill` reduces the scratch by the KV policy into a slot's row.
- `decode_step` feeds one token per live slot. Per-row early exit: at each recurrent step the rows
  that have not exited are gathered, a tile of `SlotSetup.tile` rows at a time, run, and scattered
  back, so an exited row does no more layer work; when the live rows would fill every tile, all slots
  run in place (`compact=False` always runs every row until all have exited: the batch-level exit of
  `generate`'s `early` mode). The program holds the layer stack twice (tile, all slots), whatever
  the slot count: compiling it takes about as long as compiling one batch's step.

The last cache position of a row is reserved: the fed token's own K/V column, which the mask keeps
visible while the row's cache part is masked to positions < position[b] (see `Attention`). The slot
programs run XLA attention (`attention_impl="xla"`), whose masks carry the per-row lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ouro_jax import sharding as shd
from ouro_jax.config import OuroConfig
from ouro_jax.inference.cache import KVCache, init_cache, step_view, write_chunk
from ouro_jax.inference.sampling import SamplingParams, sample_tokens
from ouro_jax.inference.settings import apply_model, exit_reached
from ouro_jax.model import Ouro

TOP_LOGPROBS = 5  # alternatives returned beside each sampled token's log-probability


@dataclasses.dataclass(frozen=True)
class SlotSetup:
    """The static settings of the slot programs."""

    cfg: OuroConfig      # its execution settings with attention_impl="xla" (see `slot_setup`)
    policy: str
    depth: int           # the most recurrent steps a request may run (the `full` cache has this many slots)
    slots: int           # decode rows
    cache_length: int    # positions per row; the last is reserved, so a sequence holds cache_length - 1
    compact: bool = True
    mesh: Mesh | None = None  # slots over ('data', 'fsdp'), KV heads over 'tensor' (where they divide)

    @property
    def tile(self) -> int:
        """Rows the decode step gathers and runs together when it compacts live rows: an eighth of the
        slots (at least 1), so a step pads at most tile - 1 rows and gathers an eighth of the cache."""
        return max(1, self.slots // 8)

    @property
    def rows_sharded(self) -> bool:
        """The slots (cache rows) are split over devices (the mesh's 'data' / 'fsdp' axes)."""
        if self.mesh is None:
            return False
        axes = cache_sharding(self, (1, 1, self.slots, 1, 1, 1)).spec[2] or ()
        return math.prod(self.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)) > 1


def slot_setup(cfg: OuroConfig, policy: str, depth: int, slots: int, cache_length: int,
               compact: bool = True, mesh: Mesh | None = None) -> SlotSetup:
    return SlotSetup(cfg.with_execution(attention_impl="xla"), policy, depth, slots, cache_length, compact, mesh)


CACHE_AXES = (None, "layers", "activation_batch", "activation_length", "kv_heads", "head_dim")


def cache_sharding(setup: SlotSetup, shape: tuple[int, ...]) -> NamedSharding | None:
    """Where a cache of `shape` ([slots, N, B, L, KVH, hd]) lives on the setup's mesh (None: no mesh)."""
    if setup.mesh is None:
        return None
    return NamedSharding(setup.mesh, shd.logical_spec(CACHE_AXES, shape, setup.mesh))


def constrain(setup: SlotSetup, cache: KVCache) -> KVCache:
    """`cache` pinned to its sharding inside a program (a no-op without a mesh)."""
    sharding = cache_sharding(setup, cache.keys.shape)
    return cache if sharding is None else KVCache(*(jax.lax.with_sharding_constraint(c, sharding) for c in cache))


class RowSettings(NamedTuple):
    """Per-slot request settings, traced ([B] each, or [] for one prefilling request)."""

    threshold: jax.Array    # float32 Q-exit q (1 = full depth)
    depth: jax.Array        # int32 recurrent steps (<= SlotSetup.depth)
    temperature: jax.Array  # float32
    top_k: jax.Array        # int32
    top_p: jax.Array        # float32
    seed: jax.Array         # uint32
    index: jax.Array        # int32: the generated token's index (folded into the seed's key)


class Sampled(NamedTuple):
    """What a slot program returns per row."""

    token: jax.Array         # int32
    exit_step: jax.Array     # int32, 0-based
    logprob: jax.Array       # float32 log-probability of the token under the model (temperature 1)
    top_ids: jax.Array       # [TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [TOP_LOGPROBS] float32


def _placed(setup: SlotSetup, cache: KVCache) -> KVCache:
    sharding = cache_sharding(setup, cache.keys.shape)
    return cache if sharding is None else jax.device_put(cache, sharding)


def empty_cache(setup: SlotSetup) -> KVCache:
    return _placed(setup, init_cache(setup.cfg, setup.policy, setup.depth, setup.slots, setup.cache_length))


def empty_scratch(setup: SlotSetup) -> KVCache:
    """The one-row cache of a prefilling request: one slot per recurrent step."""
    return _placed(setup, init_cache(setup.cfg, "full", setup.depth, 1, setup.cache_length))


def sample_row(logits: jax.Array, row: RowSettings, exit_step: jax.Array) -> Sampled:
    """The token of one row from its float32 logits [V], drawn as `generate` draws a batch of one."""
    key = jax.random.fold_in(jax.random.key(row.seed), row.index)
    sampling = SamplingParams(row.temperature, row.top_k, row.top_p)
    token = sample_tokens(logits[None], key, sampling)[0]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    top_logprobs, top_ids = jax.lax.top_k(log_probs, TOP_LOGPROBS)
    return Sampled(token, exit_step, log_probs[token], top_ids.astype(jnp.int32), top_logprobs)


def _prefill_mask(start: jax.Array, size: int, length: int) -> jax.Array:
    """[1, 1, size, length]: query j (at position start + j) sees positions <= start + j."""
    ends = start + jnp.arange(size)
    return (jnp.arange(length)[None, :] <= ends[:, None])[None, None]


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("scratch",))
def prefill_chunk(params, scratch: KVCache, ids: jax.Array, start: jax.Array, count: jax.Array,
                  row: RowSettings, *, setup: SlotSetup) -> tuple[KVCache, Sampled]:
    """Every step (up to the request's depth) over prompt ids [C] at positions [start, start + C), the
    first `count` of them real -> (scratch, the token sampled after the chunk's last real position)."""
    cfg, size = setup.cfg, ids.shape[0]
    mask, positions = _prefill_mask(start, size, setup.cache_length), (start + jnp.arange(size))[None]
    last = count - 1

    def one_step(carry):
        t, h, h_out, exited, exit_step, gates, scratch = carry
        h, gate, kv = apply_model(cfg, params, h, positions, mask, kv_cache=step_view(scratch, "full", t),
                                  cache_index=start, method=Ouro.step)
        gates = gates.at[t].set(gate[0, last])
        active = ~exited
        h_out = jnp.where(active, h[0, last], h_out)
        exit_step = jnp.where(active, t, exit_step)
        exited = exited | exit_reached(gates, t, row.depth, row.threshold)
        return t + 1, h, h_out, exited, exit_step, gates, write_chunk(scratch, "full", kv, start, t)

    h = apply_model(cfg, params, ids[None], method=Ouro.embed)
    init = (jnp.int32(0), h, h[0, 0], jnp.bool_(False), jnp.int32(0), jnp.zeros((setup.depth,), jnp.float32),
            scratch)
    _, _, h_out, _, exit_step, _, scratch = jax.lax.while_loop(lambda c: c[0] < row.depth, one_step, init)
    logits = apply_model(cfg, params, h_out[None], method=Ouro.logits)[0]
    return constrain(setup, scratch), sample_row(logits, row, exit_step)


def _reduce_scratch(policy: str, x: jax.Array, depth: jax.Array) -> jax.Array:
    """Per-step K/V [D, N, 1, L, KVH, hd] of the request's first `depth` steps -> the policy's slots."""
    if policy == "full":
        return x
    if policy == "last":
        return jax.lax.dynamic_slice_in_dim(x, depth - 1, 1, axis=0)
    if policy == "first":
        return x[:1]
    steps = (jnp.arange(x.shape[0]) < depth)[:, None, None, None, None, None]
    return (jnp.sum(jnp.where(steps, x.astype(jnp.float32), 0.0), axis=0, keepdims=True) / depth).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("setup",), donate_argnames=("cache",))
def commit_prefill(cache: KVCache, scratch: KVCache, slot: jax.Array, depth: jax.Array, *,
                   setup: SlotSetup) -> KVCache:
    """Stores a prefilled request's K/V (reduced by the policy over its `depth` steps) in row `slot`."""
    zero = jnp.int32(0)
    return constrain(setup, KVCache(*(jax.lax.dynamic_update_slice(
        c, _reduce_scratch(setup.policy, x, depth).astype(c.dtype), (zero, zero, slot, zero, zero, zero))
        for c, x in zip(cache, scratch))))

