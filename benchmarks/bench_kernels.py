"""The Pallas kernels against their XLA references: interpret-mode error everywhere, speed on an accelerator.

    python benchmarks/bench_kernels.py                  # CPU: max |kernel - XLA| in interpret mode
    python benchmarks/bench_kernels.py --seq 4096       # TPU / GPU: also time kernel vs XLA (fwd + bwd)

Errors are float32, forward and gradients (attention over causal + packed + left-padded rows, GQA 4:2;
cross-entropy with argmax; decode attention over a left-padded cache). On a TPU or GPU each op is timed
compiled, best of `--repeats` after a warm-up, and the kernel / XLA ratio is printed (< 1: the kernel wins).
Needs the package installed (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ouro_jax.kernels import cross_entropy as xent
from ouro_jax.kernels import decode, dispatch, flash


def _inputs(key, *shapes, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(key), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def _segments(batch, length):
    seg = np.ones((batch, length), np.int32)
    seg[0, :length // 5], seg[0, length // 2:] = 0, 2
    return jnp.asarray(seg)


def _max_err(a, b, valid=None):
    a, b = (np.asarray(x, np.float32) for x in (a, b))
    return float(np.max(np.abs(np.where(valid, a - b, 0) if valid is not None else a - b)))


def _cases(batch, length, heads, kv_heads, head_dim, tokens, hidden, vocab, cache, flavor, interpret, dtype):
    """(name, kernel fn, reference fn, args, mask of compared outputs or None) per op, fwd+bwd closures."""
    q, k, v = _inputs(0, (batch, length, heads, head_dim), *[(batch, length, kv_heads, head_dim)] * 2, dtype=dtype)
    seg = _segments(batch, length)
    valid = (seg != 0)[:, :, None, None]
    attn_kernel = flash.splash_attention if flavor == "tpu" else flash.gpu_flash_attention
    attn = lambda q, k, v: attn_kernel(q, k, v, seg, interpret=interpret)
    attn_ref = lambda q, k, v: flash.reference_attention(q, k, v, seg)
    h, w = _inputs(1, (tokens, hidden), (hidden, vocab), dtype=dtype)
    w = w * hidden**-0.5
    t = jax.random.randint(jax.random.key(2), (tokens,), 0, vocab)
    ce = lambda h, w: xent.pallas_cross_entropy(h, w, t, flavor, interpret)
    ce_ref = lambda h, w: xent.reference_cross_entropy(h, w, t)
    dq, ck, cv, kn, vn = _inputs(3, (batch, 1, heads, head_dim), *[(batch, cache, kv_heads, head_dim)] * 2,
                                 *[(batch, 1, kv_heads, head_dim)] * 2, dtype=dtype)
    start, end = jnp.asarray([cache // 4] + [0] * (batch - 1), jnp.int32), jnp.full((batch,), cache - 1, jnp.int32)
    dec = lambda *a: decode.pallas_decode_attention(*a, start, end, flavor, interpret)
    dec_ref = lambda *a: decode.reference_decode_attention(*a, start, end)
    return [("attention", attn, attn_ref, (q, k, v), valid, True),
            ("linear_cross_entropy", ce, ce_ref, (h, w), None, True),
            ("decode_attention", dec, dec_ref, (dq, ck, cv, kn, vn), None, False)]


def _loss(fn, valid):
    def loss(*args):
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        out = jnp.where(valid, out, 0) if valid is not None else out
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
    return loss


def errors(flavor: str, args) -> None:
    print(f"interpret mode, {flavor} flavor, float32: max |kernel - XLA|")
    shapes = (2, args.interpret_seq, 4, 2, 128, 200, 128, 1000, 64)
    for name, fn, ref, inputs, valid, grads in _cases(*shapes, flavor, True, jnp.float32):
        out, out_ref = fn(*inputs), ref(*inputs)
        fwd = _max_err(out[0] if isinstance(out, tuple) else out, out_ref[0] if isinstance(out_ref, tuple) else out_ref,
                       valid)
        line = f"  {name:22s} forward {fwd:.2e}"
        if grads:
            argnums = tuple(range(len(inputs)))
            g, g_ref = (jax.grad(_loss(f, valid), argnums)(*inputs) for f in (fn, ref))
            line += f"  gradients {max(_max_err(a, b) for a, b in zip(g, g_ref)):.2e}"
        print(line, flush=True)


def _time(fn, inputs, repeats):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*inputs))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        best = min(best, time.perf_counter() - start)
    return best


def speed(flavor: str, args) -> None:
    print(f"{jax.devices()[0].device_kind}: bfloat16, fwd+bwd (decode: fwd), best of {args.repeats}")
    shapes = (args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.batch * args.seq, 2048, 49152,
              args.seq)
    for name, fn, ref, inputs, valid, grads in _cases(*shapes, flavor, False, jnp.bfloat16):
        argnums = tuple(range(len(inputs)))
        fwd_bwd = [jax.grad(_loss(f, valid), argnums) if grads else f for f in (fn, ref)]
        try:
            t_ref = _time(fwd_bwd[1], inputs, args.repeats)
        except Exception as e:  # noqa: BLE001 - XLA may run out of memory where the kernel does not
            t_ref = float("nan")
            print(f"  {name}: XLA failed: {str(e).splitlines()[0][:100]}")
        t_kernel = _time(fwd_bwd[0], inputs, args.repeats)
        print(f"  {name:22s} kernel {t_kernel * 1e3:9.2f} ms   XLA {t_ref * 1e3:9.2f} ms   "
              f"ratio {t_kernel / t_ref:.2f}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--interpret-seq", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flavors", default="tpu,gpu", help="interpret-mode flavors to check")
    args = parser.parse_args()
    for flavor in args.flavors.split(","):
        errors(flavor, args)
    accelerator = dispatch.kernel_platform(jax.devices()[0].platform, interpret=False)
    if accelerator:
        speed(accelerator, args)
    else:
        print("no TPU / GPU: timings skipped")


if __name__ == "__main__":
    main()
