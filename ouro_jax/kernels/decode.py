"""Decode attention: a query chunk against a KV-cache view plus its own K/V, without copying the cache.

q [B, Sq, H, hd]; cache_k / cache_v [B, L, KVH, hd] (one layer of a policy's `step_view`, read in
place); k_new / v_new [B, Sq, KVH, hd] (the chunk's own K/V, causal among themselves); cache slots
[start_b, end_b) are visible to every query of row b (left padding: start_b = the row's padding).

Flavors: xla (`xla_decode_attention`: the cache and the chunk as two key blocks of one float32 softmax,
masked by the caller's [B, 1, Sq, L] slot mask), reference (`reference_decode_attention`, the test
oracle), and the Pallas kernels. The kernel covers the cache: per (row, KV head) it keeps an
unnormalized output, a running max and a running sum over cache blocks (the grouped query heads and
chunk positions form R = G * Sq rows), and skips blocks outside [start, end). The chunk's own keys
are merged in XLA (they are only Sq wide). TPU (Mosaic): a grid over cache blocks with the bounds
prefetched as scalars; GPU (Triton): a loop over cache blocks inside the kernel, one program per
(row, KV head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ouro_jax.config import Execution
from ouro_jax.kernels.dispatch import REFERENCE, XLA, Limits, choose_for, resolve_platform
from ouro_jax.kernels.flash import attend
from ouro_jax.kernels.sharded import per_device

BLOCKS = (512, 256, 128, 64, 32, 16, 8)


def _cache_block(length: int, largest: int) -> int | None:
    return next((b for b in BLOCKS if b <= largest and length % b == 0), None)


def reference_decode_attention(q, cache_k, cache_v, k_new, v_new, start, end):
    """XLA reference: float32 scores over the visible cache slots and the causal chunk, one softmax."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, length = cache_k.shape[2], cache_k.shape[1]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    slot = jnp.arange(length)
    cache_mask = (slot[None] >= start[:, None]) & (slot[None] < end[:, None])          # [B, L]
    own_mask = jnp.tril(jnp.ones((q_len, q_len), bool))
    s_cache = jnp.einsum("bqkgd,btkd->bkgqt", q, cache_k, preferred_element_type=jnp.float32)
    s_own = jnp.einsum("bqkgd,btkd->bkgqt", q, k_new, preferred_element_type=jnp.float32)
    low = jnp.finfo(jnp.float32).min
    s_cache = jnp.where(cache_mask[:, None, None, None], s_cache * head_dim**-0.5, low)
    s_own = jnp.where(own_mask, s_own * head_dim**-0.5, low)
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_own], axis=-1), axis=-1)
    p_cache, p_own = probs[..., :length], probs[..., length:]
    out = (jnp.einsum("bkgqt,btkd->bqkgd", p_cache.astype(cache_v.dtype), cache_v)
           + jnp.einsum("bkgqt,btkd->bqkgd", p_own.astype(v_new.dtype), v_new))
    return out.reshape(batch, q_len, heads, head_dim)


def xla_decode_attention(q, cache_k, cache_v, k_new, v_new, mask, cache_index, platform: str):
    """Cache slots before `cache_index` allowed by `mask` [B, 1, Sq, L], then the chunk (which occupies the
    following slots): two key blocks of one softmax, the cache read in place."""
    before = jnp.arange(cache_k.shape[1]) < cache_index
    own = jax.lax.dynamic_slice_in_dim(mask, cache_index, q.shape[1], axis=-1)
    return attend(q, [(cache_k, cache_v, mask & before), (k_new, v_new, own)], platform)


def window_mask(start, end, length: int, q_len: int):
    """The slot mask [B, 1, Sq, L] of cache slots [start_b, end) followed by a causal chunk at `end`."""
    slot = jnp.arange(length)
    own = (slot[None] >= end) & (slot[None] - end <= jnp.arange(q_len)[:, None])      # [Sq, L]
    visible = (slot[None] >= start[:, None]) & (slot[None] < end)                        # [B, L]
    return (visible[:, None] | own[None])[:, None]


def _online_update(q, k, v, pos0, lo, hi, scale, m, total, acc):
    """Folds one cache block (k, v [blk, hd]) into (m, total [R, 1], acc [R, hd]) for q [R, hd]."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    pos = pos0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where((pos >= lo) & (pos < hi), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    total = alpha * total + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, total, acc


def _tpu_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block, kv_heads, head_dim,
                scale):
    b, j = pl.program_id(0), pl.program_id(1)
    lo, hi = start_ref[b], end_ref[b]

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    @pl.when((j * block < hi) & ((j + 1) * block > lo))
    def _():
        for h in range(kv_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            m, total, acc = _online_update(q_ref[h], k_ref[:, cols], v_ref[:, cols], j * block, lo, hi, scale,
                                       m_ref[h], l_ref[h], acc_ref[h])
            m_ref[h], l_ref[h], acc_ref[h] = m, total, acc


def _cache_part_tpu(q, cache_k, cache_v, start, end, interpret):
    """q [B, KVH, R, hd] -> (acc [B, KVH, R, hd], m, total [B, KVH, R, 1]) over the visible cache."""
    batch, kv_heads, rows, head_dim = q.shape
    length = cache_k.shape[1]
    block = _cache_block(length, 512)
    k2, v2 = (x.reshape(batch, length, kv_heads * head_dim) for x in (cache_k, cache_v))   # free reshapes

    def kv_index(b, j, start_ref, end_ref):   # blocks outside [start, end) re-use a fetched one
        first, last = start_ref[b] // block, jnp.maximum(end_ref[b] - 1, 0) // block
        return b, jnp.clip(j, first, jnp.maximum(first, last)), 0

    q_spec = pl.BlockSpec((None, kv_heads, rows, head_dim), lambda b, j, *_: (b, 0, 0, 0))
    kv_spec = pl.BlockSpec((None, block, kv_heads * head_dim), kv_index)
    stat_spec = pl.BlockSpec((None, kv_heads, rows, 1), lambda b, j, *_: (b, 0, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(batch, length // block),
                                             in_specs=[q_spec, kv_spec, kv_spec],
                                             out_specs=[q_spec, stat_spec, stat_spec])
    kernel = functools.partial(_tpu_kernel, block=block, kv_heads=kv_heads, head_dim=head_dim,
                               scale=head_dim**-0.5)
    stat = jax.ShapeDtypeStruct((batch, kv_heads, rows, 1), jnp.float32)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, interpret=interpret, name="decode_attention",
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32), stat, stat],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    )(start, end, q, k2, v2)


def _gpu_kernel(bounds_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block, scale):
    lo, hi = bounds_ref[0], bounds_ref[1]
    q = q_ref[...]
    rows, head_dim = q.shape

    def body(j, state):
        blk = pl.ds(pl.multiple_of(j * block, block), block)
        return _online_update(q, k_ref[blk, :], v_ref[blk, :], j * block, lo, hi, scale, *state)

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    m, total, acc = jax.lax.fori_loop(lo // block, pl.cdiv(hi, block), body, init)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, total


def _cache_part_gpu(q, cache_k, cache_v, start, end, interpret):
    batch, kv_heads, rows, head_dim = q.shape
    length = cache_k.shape[1]
    block = _cache_block(length, 64)
    bounds = jnp.stack([start, end], axis=1)
    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, length, None, head_dim), lambda b, h: (b, 0, h, 0))
    stat_spec = pl.BlockSpec((None, None, rows, 1), lambda b, h: (b, h, 0, 0))
    stat = jax.ShapeDtypeStruct((batch, kv_heads, rows, 1), jnp.float32)
    return pl.pallas_call(
        functools.partial(_gpu_kernel, block=block, scale=head_dim**-0.5), grid=(batch, kv_heads),
        in_specs=[pl.BlockSpec((None, 2), lambda b, h: (b, 0)), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, stat_spec, stat_spec], interpret=interpret, name="decode_attention",
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32), stat, stat],
    )(bounds, q, cache_k, cache_v)


def pallas_decode_attention(q, cache_k, cache_v, k_new, v_new, start, end, flavor: str = "tpu",
                            interpret: bool = False):
    """The kernel over the cache, merged with the chunk's own causal keys; same contract as the reference."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = cache_k.shape[2]
    group = heads // kv_heads
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
    end = jnp.broadcast_to(jnp.asarray(end, jnp.int32), (batch,))
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)   # [B, KVH, G, Sq, hd]
    part = _cache_part_tpu if flavor == "tpu" else _cache_part_gpu
    rows = qg.reshape(batch, kv_heads, group * q_len, head_dim)
    acc, m, total = part(rows, cache_k, cache_v, start, end, interpret)
    acc, m, total = (x.reshape(batch, kv_heads, group, q_len, -1) for x in (acc, m, total))
    s_own = jnp.einsum("bkgqd,btkd->bkgqt", qg, k_new, preferred_element_type=jnp.float32) * head_dim**-0.5
    s_own = jnp.where(jnp.tril(jnp.ones((q_len, q_len), bool)), s_own, -jnp.inf)
    m_all = jnp.maximum(m, jnp.max(s_own, axis=-1, keepdims=True))                   # finite: the diagonal
    p_own = jnp.exp(s_own - m_all)
    alpha = jnp.exp(m - m_all)
    num = alpha * acc + jnp.einsum("bkgqt,btkd->bkgqd", p_own.astype(v_new.dtype), v_new,
                                   preferred_element_type=jnp.float32)
    out = num / (alpha * total + jnp.sum(p_own, axis=-1, keepdims=True))
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def kernel_limits(length: int, head_dim: int, interpret: bool = False):
    """flavor -> `Limits` for a cache of `length` slots."""
    def limits(flavor: str) -> Limits:
        if _cache_block(length, 512) is None:
            return Limits(f"cache length {length} is not a multiple of 8")
        if flavor == "tpu" and head_dim % 128 and head_dim != 64 and not interpret:
            return Limits(f"head_dim {head_dim} (64 or a multiple of 128)")
        return Limits()
    return limits


def decode_attention(q, cache_k, cache_v, k_new, v_new, start, end, run: Execution, *, mask=None):
    """[B, Sq, H, hd] attention over cache slots [start, end) per row and the causal chunk (which sits at
    slots end..), by `run.attention_impl`. `mask` [B, 1, Sq, L]: the xla flavor's slot mask
    (`window_mask(start, end, ...)` when not given); `end` is one index for every row."""
    flavor = choose_for("decode_attention", run.attention_impl, run,
                        kernel_limits(cache_k.shape[1], q.shape[3], run.kernel_interpret))
    batch = q.shape[0]
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
    if flavor == XLA:
        mask = window_mask(start, end, cache_k.shape[1], q.shape[1]) if mask is None else mask
        return xla_decode_attention(q, cache_k, cache_v, k_new, v_new, mask, end, resolve_platform(run))
    end = jnp.broadcast_to(jnp.asarray(end, jnp.int32), (batch,))
    if flavor == REFERENCE:
        return reference_decode_attention(q, cache_k, cache_v, k_new, v_new, start, end)
    fn = functools.partial(pallas_decode_attention, flavor=flavor, interpret=run.kernel_interpret)
    return per_device(fn, (q, cache_k, cache_v, k_new, v_new, start, end),
                      ("b.h.", "b.h.", "b.h.", "b.h.", "b.h.", "b", "b"), "b.h.")
