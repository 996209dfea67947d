"""Fused linear cross-entropy: per-token CE (and argmax) of hidden @ head, never holding [N, V] logits.

The forward kernel walks the vocabulary block by block with an online logsumexp, the target's logit
and a running argmax; the backward (`jax.custom_vjp`) recomputes each vocabulary block's logits from
the saved logsumexp: dlogits = g * (softmax - onehot), dh += dlogits @ W_blk^T, dW_blk = h^T dlogits.
Flavors: xla (`chunked_cross_entropy`: [B, chunk, V] logits at a time, recomputed in the backward pass;
the argmax of the whole logits), reference (`reference_cross_entropy`, the test oracle), TPU (Mosaic)
accumulating over a vocabulary grid axis in resident output blocks, GPU (Triton) looping over the
vocabulary inside the kernel. Targets outside [0, V) give a finite, meaningless CE: mask them out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ouro_jax.config import Execution
from ouro_jax.kernels.dispatch import REFERENCE, XLA, Limits, choose_for
from ouro_jax.kernels.sharded import per_device
from ouro_jax.matmul import dense

BLOCK_N = 256
VOCAB_BLOCKS = (2048, 1024, 512, 256, 128)


def reference_cross_entropy(hidden, head, targets):
    """XLA reference over [N, d] x [d, V]: (ce [N] float32, argmax [N] int32); materializes [N, V]."""
    logits = jnp.einsum("nd,dv->nv", hidden, head, preferred_element_type=jnp.float32)
    targets = jnp.clip(targets, 0, head.shape[1] - 1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk_size: int = 1024) -> jax.Array:
    """xla: per-token cross-entropy [B, S] (float32) of logits = hidden @ head, chunk by chunk over S.

    Each chunk's logits are recomputed in the backward pass (`jax.checkpoint`), so neither the
    forward nor the backward pass holds more than [B, chunk_size, V] logits.
    """
    batch, length, width = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(jnp.clip(targets, 0, head.shape[1] - 1), ((0, 0), (0, pad)))
    hidden = hidden.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
    targets = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_ce(args):
        h, t = args
        logits = dense(h, head, out_dtype=jnp.float32)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - target_logit

    ce = jax.lax.map(chunk_ce, (hidden, targets))
    return ce.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]


def _vocab_block(vocab: int, largest: int) -> int:
    fits = [b for b in VOCAB_BLOCKS if b <= largest]
    return next((b for b in fits if vocab % b == 0), fits[-1] if vocab < 4 * fits[0] else fits[0])


def _block_update(h, w, t, col0, vocab, state):
    """One vocabulary block: state (m, total, target logit, argmax), each [bn, 1], updated online."""
    m, total, tl, am = state
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    col = col0 + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    logits = jnp.where(col < vocab, logits, -jnp.inf)
    blk_max = jnp.max(logits, axis=1, keepdims=True)
    blk_arg = jnp.min(jnp.where(logits == blk_max, col, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    new_m = jnp.maximum(m, blk_max)
    total = total * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m), axis=1, keepdims=True)
    tl = tl + jnp.sum(jnp.where(col == t, logits, 0.0), axis=1, keepdims=True)
    am = jnp.where(blk_max > m, blk_arg, am)
    return new_m, total, tl, am


def _tpu_kernel(h_ref, w_ref, t_ref, m_ref, l_ref, tl_ref, am_ref, *, block_v: int, vocab: int):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        tl_ref[...] = jnp.zeros(tl_ref.shape, jnp.float32)
        am_ref[...] = jnp.zeros(am_ref.shape, jnp.int32)

    state = (m_ref[...], l_ref[...], tl_ref[...], am_ref[...])
    m, total, tl, am = _block_update(h_ref[...], w_ref[...], t_ref[...], j * block_v, vocab, state)
    m_ref[...], l_ref[...], tl_ref[...], am_ref[...] = m, total, tl, am


def _gpu_kernel(h_ref, w_ref, t_ref, m_ref, l_ref, tl_ref, am_ref, *, block_v: int, vocab: int):
    h, t = h_ref[...], t_ref[...]
    rows = h.shape[0]

    def body(j, state):
        w = w_ref[:, pl.ds(pl.multiple_of(j * block_v, block_v), block_v)]
        return _block_update(h, w, t, j * block_v, vocab, state)

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, 1), jnp.float32), jnp.zeros((rows, 1), jnp.int32))
    m, total, tl, am = jax.lax.fori_loop(0, w_ref.shape[1] // block_v, body, init)
    m_ref[...], l_ref[...], tl_ref[...], am_ref[...] = m, total, tl, am


def _forward(hidden, head, targets, flavor: str, interpret: bool):
    """(lse [N], target logit [N], argmax [N]) by the Pallas kernel of `flavor`."""
    n, d = hidden.shape
    vocab = head.shape[1]
    block_n = min(BLOCK_N, -(-n // 8) * 8)
    block_v = _vocab_block(vocab, 512 if flavor == "tpu" else 128)
    rows, cols = -(-n // block_n) * block_n, -(-vocab // block_v) * block_v
    hidden = jnp.pad(hidden, ((0, rows - n), (0, 0)))
    head = head if cols == vocab else jnp.pad(head, ((0, 0), (0, cols - vocab)))
    targets = jnp.pad(jnp.clip(targets, 0, vocab - 1).astype(jnp.int32), (0, rows - n))[:, None]
    col = pl.BlockSpec((block_n, 1), lambda i, *_: (i, 0))
    out_shape = [jax.ShapeDtypeStruct((rows, 1), dt) for dt in (jnp.float32, jnp.float32, jnp.float32, jnp.int32)]
    if flavor == "tpu":
        grid, kernel = (rows // block_n, cols // block_v), _tpu_kernel
        w_spec = pl.BlockSpec((d, block_v), lambda i, j: (0, j))
    else:
        grid, kernel = (rows // block_n,), _gpu_kernel
        w_spec = pl.BlockSpec((d, cols), lambda i: (0, 0))
    m, total, tl, am = pl.pallas_call(
        functools.partial(kernel, block_v=block_v, vocab=vocab), grid=grid,
        in_specs=[pl.BlockSpec((block_n, d), lambda i, *_: (i, 0)), w_spec, col],
        out_specs=[col] * 4, out_shape=out_shape, interpret=interpret, name="linear_cross_entropy",
    )(hidden, head, targets)
    return (m + jnp.log(total))[:n, 0], tl[:n, 0], am[:n, 0]


def _backward_blocked(hidden, head, targets, lse, g, block_v: int):
    """d hidden, d head of sum(g * ce), one vocabulary block at a time (XLA)."""
    vocab = head.shape[1]
    num = -(-vocab // block_v)
    cols = num * block_v
    head_p = head if cols == vocab else jnp.pad(head, ((0, 0), (0, cols - vocab)))

    def body(j, carry):
        dh, dw = carry
        w = jax.lax.dynamic_slice_in_dim(head_p, j * block_v, block_v, axis=1)
        logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
        col = j * block_v + jnp.arange(block_v)
        probs = jnp.where(col[None] < vocab, jnp.exp(logits - lse[:, None]), 0.0)
        dlogits = (g[:, None] * (probs - (col[None] == targets[:, None]))).astype(hidden.dtype)
        dh = dh + jnp.dot(dlogits, w.T, preferred_element_type=jnp.float32)
        dw_blk = jnp.dot(hidden.T, dlogits, preferred_element_type=jnp.float32).astype(dw.dtype)
        return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_blk, j * block_v, axis=1)

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(head_p.shape, head.dtype))
    dh, dw = jax.lax.fori_loop(0, num, body, init)
    return dh.astype(hidden.dtype), dw[:, :vocab]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(hidden, head, targets, flavor, interpret):
    lse, target_logit, argmax = _forward(hidden, head, targets, flavor, interpret)
    return lse - target_logit, argmax


def _fused_fwd(hidden, head, targets, flavor, interpret):
    lse, target_logit, argmax = _forward(hidden, head, targets, flavor, interpret)
    return (lse - target_logit, argmax), (hidden, head, targets, lse)


def _fused_bwd(flavor, interpret, residuals, cotangents):
    hidden, head, targets, lse = residuals
    g = cotangents[0].astype(jnp.float32)
    targets = jnp.clip(targets, 0, head.shape[1] - 1)
    dh, dw = _backward_blocked(hidden, head, targets, lse, g, _vocab_block(head.shape[1], 2048))
    return dh, dw, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def pallas_cross_entropy(hidden, head, targets, flavor: str = "tpu", interpret: bool = False):
    """(ce [N] float32, argmax [N] int32) of [N, d] x [d, V] by the Pallas kernel of `flavor`."""
    return _fused(hidden, head, targets.astype(jnp.int32), flavor, interpret)


def kernel_limits(rows: int):
    """flavor -> `Limits`: any shape runs (blocks span the hidden size and edge blocks are padded);
    fewer rows than one block are left to XLA by auto."""
    return lambda _: Limits(not_worth=f"{rows} tokens < one block of {BLOCK_N}" if rows < BLOCK_N else None)


def _by_rows(flavor: str, interpret: bool):
    """(ce, argmax) of [B, S, d] hidden by the reference or a kernel flavor, per device for a kernel."""
    def per_rows(h, w, t):
        batch, length, d = h.shape
        h2, t2 = h.reshape(batch * length, d), t.reshape(batch * length)
        ce, am = (reference_cross_entropy(h2, w, t2) if flavor == REFERENCE
                  else pallas_cross_entropy(h2, w, t2, flavor, interpret))
        return ce.reshape(batch, length), am.reshape(batch, length)

    if flavor == REFERENCE:
        return per_rows
    return lambda *args: per_device(per_rows, args, ("b..", "..", "b."), ("b.", "b."))


def _flavor(hidden, run: Execution) -> str:
    return choose_for("cross_entropy", run.cross_entropy_impl, run, kernel_limits(hidden.shape[0] * hidden.shape[1]))


def linear_cross_entropy(hidden, head, targets, run: Execution, *, chunk_size: int = 1024):
    """Per-token CE [B, S] float32 of hidden [B, S, d] @ head [d, V] with targets [B, S], by
    `run.cross_entropy_impl` (xla: chunks of `chunk_size` positions)."""
    flavor = _flavor(hidden, run)
    if flavor == XLA:
        return chunked_cross_entropy(hidden, head, targets, chunk_size)
    return _by_rows(flavor, run.kernel_interpret)(hidden, head, targets)[0]


def linear_argmax(hidden, head, run: Execution):
    """Greedy ids [B, S] int32 of hidden [B, S, d] @ head [d, V] by `run.cross_entropy_impl` (the kernel
    flavors never hold [B, S, V] logits; xla takes the argmax of float32 logits)."""
    flavor = _flavor(hidden, run)
    if flavor == XLA:
        return jnp.argmax(dense(hidden, head, out_dtype=jnp.float32), axis=-1).astype(jnp.int32)
    return _by_rows(flavor, run.kernel_interpret)(hidden, head, jnp.zeros(hidden.shape[:2], jnp.int32))[1]
