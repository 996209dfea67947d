"""Every op flavor against its reference: the Pallas kernels (interpret mode on CPU, TPU and GPU flavors)
and the xla flavors, each reached through the Execution settings of the op's entry point."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax import kernels
from ouro_jax.config import Execution
from ouro_jax.kernels import cross_entropy as xent
from ouro_jax.kernels import decode as dec
from ouro_jax.kernels import dispatch
from ouro_jax.kernels import flash as attn
from ouro_jax.sharding import activation_rules, make_mesh

FLAVORS = ("tpu", "gpu")
PALLAS = Execution(attention_impl="pallas", cross_entropy_impl="pallas", kernel_interpret=True)
XLA_ON_TPU = Execution(attention_impl="xla", cross_entropy_impl="xla", platform="tpu")   # the select-mask form


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def _segments(batch: int, length: int) -> np.ndarray:
    """Row 0: left padding then two packed documents; row 1: three documents; row 2+: one document."""
    seg = np.ones((batch, length), np.int32)
    seg[0, :length // 5] = 0
    seg[0, length // 2:] = 2
    if batch > 1:
        seg[1, length // 3:] = 2
        seg[1, 2 * length // 3:] = 3
    return seg


def _attention_inputs(heads, kv_heads, head_dim, length, dtype=jnp.float32, batch=2):
    q = _normal(0, (batch, length, heads, head_dim), dtype)
    k = _normal(1, (batch, length, kv_heads, head_dim), dtype)
    v = _normal(2, (batch, length, kv_heads, head_dim), dtype)
    return q, k, v, jnp.asarray(_segments(batch, length))


ATTENTION_CASES = [  # (heads, kv_heads, head_dim, length): GQA ratios 1, 2, 4; lengths off the block size
    pytest.param(2, 2, 64, 200, marks=pytest.mark.slow),   # several blocks (~25 s for the TPU flavor)
    (4, 2, 128, 100),
    pytest.param(4, 1, 64, 100, marks=pytest.mark.slow),  # GQA ratio 4 (the default suite keeps ratio 2)
]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("heads,kv_heads,head_dim,length", ATTENTION_CASES)
def test_attention_matches_xla_forward_and_gradients(flavor, heads, kv_heads, head_dim, length):
    q, k, v, seg = _attention_inputs(heads, kv_heads, head_dim, length)
    valid = (seg != 0)[:, :, None, None]   # padding queries differ by design; only real rows are compared
    weights = _normal(3, q.shape)
    kernel = attn.splash_attention if flavor == "tpu" else attn.gpu_flash_attention

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v, seg), 0.0) * weights)

    out = kernel(q, k, v, seg, interpret=True)
    ref = attn.reference_attention(q, k, v, seg)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=1e-5)
    grads = jax.grad(loss(lambda *a: kernel(*a, interpret=True)), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(attn.reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_attention_bf16_inputs(flavor):
    q, k, v, seg = _attention_inputs(4, 2, 128, 100, jnp.bfloat16)
    kernel = attn.splash_attention if flavor == "tpu" else attn.gpu_flash_attention
    out = kernel(q, k, v, seg, interpret=True).astype(jnp.float32)
    ref = attn.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    valid = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=3e-2)


def test_attention_entry_point_under_a_mesh_runs_per_device():
    q, k, v, seg = _attention_inputs(4, 2, 64, 128, batch=4)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), activation_rules(mesh):
        out = jax.jit(lambda *a: kernels.attention(*a, PALLAS))(q, k, v, seg)
    ref = attn.reference_attention(q, k, v, seg)
    valid = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=1e-5)


def _ce_inputs(n, d, vocab, dtype=jnp.float32):
    hidden = _normal(0, (n, d), dtype)
    head = (_normal(1, (d, vocab)) * d**-0.5).astype(dtype)
    targets = jax.random.randint(jax.random.key(2), (n,), 0, vocab)
    return hidden, head, targets


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("n,d,vocab", [(37, 64, 300), pytest.param(64, 128, 256, marks=pytest.mark.slow)])
def test_linear_cross_entropy_matches_xla(flavor, n, d, vocab):
    hidden, head, targets = _ce_inputs(n, d, vocab)
    weights = _normal(3, (n,))
    ce, argmax = xent.pallas_cross_entropy(hidden, head, targets, flavor, interpret=True)
    ref_ce, ref_argmax = xent.reference_cross_entropy(hidden, head, targets)
    np.testing.assert_allclose(ce, ref_ce, atol=1e-5)
    np.testing.assert_array_equal(argmax, ref_argmax)
    grads = jax.grad(lambda h, w: jnp.sum(xent.pallas_cross_entropy(h, w, targets, flavor, True)[0] * weights),
                     argnums=(0, 1))(hidden, head)
    ref_grads = jax.grad(lambda h, w: jnp.sum(xent.reference_cross_entropy(h, w, targets)[0] * weights),
                         argnums=(0, 1))(hidden, head)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_linear_cross_entropy_bf16_and_entry_point_under_a_mesh():
    hidden, head, targets = _ce_inputs(64, 128, 384, jnp.bfloat16)
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    with jax.set_mesh(mesh), activation_rules(mesh):
        both = lambda h, w, t: (kernels.linear_cross_entropy(h, w, t, PALLAS), kernels.linear_argmax(h, w, PALLAS))
        fn = jax.jit(both)
        ce, argmax = fn(hidden.reshape(8, 8, 128), head, targets.reshape(8, 8))
    ref_ce, _ = xent.reference_cross_entropy(hidden.astype(jnp.float32), head.astype(jnp.float32), targets)
    np.testing.assert_allclose(ce.reshape(-1), ref_ce, atol=2e-2)
    assert argmax.dtype == jnp.int32 and argmax.shape == (8, 8)


DECODE_CASES = [  # (heads, kv_heads, head_dim, q_len, cache_length)
    pytest.param(2, 2, 64, 1, 48, marks=pytest.mark.slow),  # the default suite keeps GQA with several queries
    (4, 2, 128, 3, 40),
    pytest.param(4, 1, 64, 2, 64, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("heads,kv_heads,head_dim,q_len,length", DECODE_CASES)
def test_decode_attention_matches_xla(flavor, heads, kv_heads, head_dim, q_len, length):
    batch = 3
    q = _normal(0, (batch, q_len, heads, head_dim))
    cache_k, cache_v = _normal(1, (batch, length, kv_heads, head_dim)), _normal(2, (batch, length, kv_heads, head_dim))
    k_new, v_new = _normal(3, (batch, q_len, kv_heads, head_dim)), _normal(4, (batch, q_len, kv_heads, head_dim))
    start = jnp.asarray([0, 5, length - 12], jnp.int32)      # left padding per row
    end = jnp.int32(length - 3)
    out = dec.pallas_decode_attention(q, cache_k, cache_v, k_new, v_new, start, end, flavor, interpret=True)
    ref = dec.reference_decode_attention(q, cache_k, cache_v, k_new, v_new, start, jnp.full((batch,), end))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_decode_attention_bf16_and_empty_cache_rows():
    q = _normal(0, (2, 1, 4, 128), jnp.bfloat16)
    cache = [_normal(i, (2, 32, 2, 128), jnp.bfloat16) for i in (1, 2)]
    new = [_normal(i, (2, 1, 2, 128), jnp.bfloat16) for i in (3, 4)]
    start, end = jnp.asarray([0, 9], jnp.int32), jnp.asarray([17, 9], jnp.int32)   # row 1 sees only itself
    out = kernels.decode_attention(q, *cache, *new, start, end, dataclasses.replace(PALLAS, platform="cpu"))
    ref = dec.reference_decode_attention(*(x.astype(jnp.float32) for x in (q, *cache, *new)), start, end)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)
    np.testing.assert_allclose(out[1].astype(jnp.float32), new[1][1][:, [0, 0, 1, 1]].astype(jnp.float32), atol=1e-2)


def test_auto_keeps_xla_on_cpu_and_falls_back_once_with_a_warning(caplog):
    q, k, v, seg = _attention_inputs(2, 2, 64, 16, batch=1)
    assert dispatch.choose("attention", "auto", "cpu", False, lambda _: dispatch.Limits()) == "xla"
    dispatch._warned.clear()
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        for _ in range(2):
            out = kernels.attention(q, k, v, seg, Execution(platform="tpu"))
    assert sum("sequence length 16 < 128" in r.message for r in caplog.records) == 1
    valid = (seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, attn.reference_attention(q, k, v, seg), 0),
                               atol=1e-5)
    assert dispatch.choose("attention", "auto", "tpu", False, lambda _: dispatch.Limits()) == "tpu"
    assert dispatch.choose("attention", "auto", "cuda", False, lambda _: dispatch.Limits()) == "gpu"
    assert dispatch.choose("attention", "reference", "tpu", False, lambda _: dispatch.Limits()) == "reference"


def test_forced_pallas_where_it_cannot_run_names_op_platform_and_reason():
    q, k, v, seg = _attention_inputs(2, 2, 96, 128, batch=1)
    on = lambda platform: Execution(attention_impl="pallas", cross_entropy_impl="pallas", platform=platform)
    with pytest.raises(kernels.KernelUnavailable, match=r"attention: .*'tpu'.*head_dim 96"):
        kernels.attention(q, k, v, seg, on("tpu"))
    with pytest.raises(kernels.KernelUnavailable, match=r"cross_entropy: .*'cpu'.*interpret"):
        kernels.linear_cross_entropy(q[..., 0, :], jnp.ones((96, 8)), seg, on("cpu"))
    with pytest.raises(kernels.KernelUnavailable, match=r"decode_attention: .*cache length 30"):
        kernels.decode_attention(q[:, :1], k[:, :30], v[:, :30], k[:, :1], v[:, :1], 0, 3, on("tpu"))
    with pytest.raises(ValueError, match="kernel impl must be one of"):
        dispatch.choose("attention", "triton", "cpu", False, lambda _: dispatch.Limits())


@pytest.mark.parametrize("run", [Execution(attention_impl="xla"), XLA_ON_TPU, Execution(attention_impl="reference")],
                         ids=["xla-cpu", "xla-tpu", "reference"])
def test_attention_flavors_through_the_entry_point(run):
    q, k, v, seg = _attention_inputs(4, 2, 8, 37)
    valid = (seg != 0)[:, :, None, None]
    out = kernels.attention(q, k, v, seg, run)
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, attn.reference_attention(q, k, v, seg), 0),
                               atol=1e-5)


@pytest.mark.parametrize("run", [Execution(attention_impl="xla"), XLA_ON_TPU, Execution(attention_impl="reference")],
                         ids=["xla-cpu", "xla-tpu", "reference"])
def test_decode_attention_flavors_through_the_entry_point(run):
    batch, q_len, length = 3, 2, 24
    q = _normal(0, (batch, q_len, 4, 8))
    cache_k, cache_v = _normal(1, (batch, length, 2, 8)), _normal(2, (batch, length, 2, 8))
    k_new, v_new = _normal(3, (batch, q_len, 2, 8)), _normal(4, (batch, q_len, 2, 8))
    start, end = jnp.asarray([0, 5, 11], jnp.int32), 13
    out = kernels.decode_attention(q, cache_k, cache_v, k_new, v_new, start, end, run)
    ref = dec.reference_decode_attention(q, cache_k, cache_v, k_new, v_new, start, jnp.full((batch,), end))
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_linear_cross_entropy_flavors_through_the_entry_point(impl):
    hidden, head, targets = _ce_inputs(3 * 13, 16, 50)
    hidden, targets = hidden.reshape(3, 13, 16), targets.reshape(3, 13)
    run = Execution(cross_entropy_impl=impl)
    ce = kernels.linear_cross_entropy(hidden, head, targets, run, chunk_size=4)   # chunks with an uneven tail
    ref_ce, ref_argmax = xent.reference_cross_entropy(hidden.reshape(-1, 16), head, targets.reshape(-1))
    np.testing.assert_allclose(ce.reshape(-1), ref_ce, atol=1e-5)
    np.testing.assert_array_equal(kernels.linear_argmax(hidden, head, run).reshape(-1), ref_argmax)


def test_mesh_platform_reads_the_mesh_devices():
    assert kernels.mesh_platform(make_mesh({"data": -1, "fsdp": 1, "tensor": 1})) == "cpu"
