"""The Flax model: parameter layout and counts, loop/scan equivalences, masking, GQA, remat, dtypes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import forward

from ouro_jax import config, model
from ouro_jax.kernels import flash
from ouro_jax.model import Ouro


def _ids(key, shape, vocab=128):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(num_hidden_layers=3, total_ut_steps=3)
    return cfg, model.init_params(cfg, jax.random.key(0))


def _loss(cfg, params, ids):
    out = Ouro(cfg).apply({"params": params}, ids, targets=jnp.roll(ids, -1, axis=1))
    return jnp.mean(out.step_ce) + jnp.mean(out.gate_logits ** 2) + jnp.mean(out.hidden_states ** 2)


def _loss_and_grads(cfg, params, ids):
    return jax.jit(jax.value_and_grad(lambda p: _loss(cfg, p, ids)))(params)


@pytest.fixture(scope="module")
def rolled_reference(tiny):
    """What the unrolled scans and every remat policy are compared with (computed once): ids, the loss and
    gradients of the rolled scans without remat, and the residual bytes of no remat and of full remat."""
    cfg, params = tiny
    ids = _ids(3, (2, 9))
    saved = {p: _saved_residual_bytes(cfg.with_execution(remat_policy=p), params, ids) for p in ("none", "full")}
    return ids, _loss_and_grads(cfg, params, ids), saved


def test_released_parameter_counts_without_materializing():
    assert model.count_params(model.abstract_params(config.ouro_1p4b())) == 1_434_652_673
    assert model.count_params(model.abstract_params(config.ouro_2p6b())) == 2_667_974_657


def test_abstract_params_are_traced_once_per_config_and_each_caller_owns_its_tree():
    cfg = config.ouro_1p4b()
    first = model.abstract_params(cfg)
    hits = model._traced_abstract_params.cache_info().hits
    first.pop("lm_head")
    again = model.abstract_params(cfg)
    assert model._traced_abstract_params.cache_info().hits == hits + 1
    assert "lm_head" in again and again is not first


def test_every_param_has_logical_names_and_one_copy_of_the_stack():
    cfg = config.tiny(num_hidden_layers=3)
    boxed = model.abstract_params(cfg)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    layers = boxed["decoder"]["layers"]
    for leaf in jax.tree.leaves(layers, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert leaf.names[0] == "layers" and leaf.value.shape[0] == 3
    assert set(boxed) == {"embed_tokens", "decoder", "final_norm", "exit_gate", "lm_head"}
    assert set(boxed["decoder"]) == {"layers"}
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = 4 * d * d + 3 * d * f + 4 * d
    assert model.count_params(boxed) == 2 * v * d + 3 * per_layer + d + d + 1


def test_unrolled_scans_match_rolled_scans(tiny, rolled_reference):
    cfg, params = tiny
    ids, (loss_scan, grads_scan), _ = rolled_reference
    unrolled = cfg.with_execution(unroll=True)
    shapes = lambda c: jax.tree.map(jnp.shape, model.abstract_params(c))
    assert shapes(unrolled) == shapes(cfg)
    loss_unrolled, grads_unrolled = _loss_and_grads(unrolled, params, ids)
    np.testing.assert_allclose(loss_scan, loss_unrolled, rtol=1e-6)
    chex.assert_trees_all_close(grads_scan, grads_unrolled, atol=1e-6)


def test_scan_over_steps_matches_a_python_loop_of_model_step(tiny):
    cfg, params = tiny
    ids = _ids(2, (2, 9))
    out = forward(cfg, params, ids)

    def python_loop(p):
        m = Ouro(cfg).bind({"params": p})
        h, positions = m.embed(ids), model.default_positions(None, None, ids.shape)
        mask = (model.causal_mask(None, None, ids.shape), model.kernel_segments(None, None, ids.shape))
        hidden, gates = [], []
        for _ in range(cfg.total_ut_steps):
            h, gate, _ = m.step(h, positions, mask)
            hidden.append(h)
            gates.append(gate)
        return jnp.stack(hidden), jnp.stack(gates)

    hidden, gates = jax.jit(python_loop)(params)
    chex.assert_trees_all_close((out.hidden_states, out.gate_logits), (hidden, gates), atol=1e-6)
    probe = jax.random.normal(jax.random.key(3), hidden.shape)  # a loss that is not invariant to the norms
    grads_scan = jax.jit(jax.grad(lambda p: jnp.sum(Ouro(cfg).apply({"params": p}, ids).hidden_states * probe)))(params)
    grads_loop = jax.jit(jax.grad(lambda p: jnp.sum(python_loop(p)[0] * probe)))(params)
    for a, b in zip(jax.tree.leaves(grads_scan), jax.tree.leaves(grads_loop)):  # float32 sums in another order
        assert jnp.max(jnp.abs(a - b)) <= 1e-4 * max(jnp.max(jnp.abs(a)), 1e-3)


def _saved_residual_bytes(cfg, params, ids):
    """Bytes the backward pass keeps from the forward (the VJP's residuals, beyond the params), from shapes."""
    vjp = jax.eval_shape(lambda p: jax.vjp(lambda q: _loss(cfg, q, ids), p)[1], params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp)) - sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.parametrize("policy", ["full", "dots", "save_proj"])
def test_remat_policies_keep_gradients_and_save_less(tiny, rolled_reference, policy):
    cfg, params = tiny
    ids, (_, reference), saved = rolled_reference
    remat = cfg.with_execution(remat_policy=policy)
    _, grads = _loss_and_grads(remat, params, ids)
    chex.assert_trees_all_close(reference, grads, atol=1e-6)
    saved = {**saved, policy: saved.get(policy) or _saved_residual_bytes(remat, params, ids)}
    assert saved[policy] < saved["none"] / 2, saved
    if policy != "full":  # the named / matmul outputs it keeps are more than full remat keeps
        assert saved[policy] > saved["full"]


def test_num_steps_override(tiny):
    cfg, params = tiny
    ids = _ids(4, (1, 6))
    full, short, longer = (forward(cfg, params, ids, num_steps=n) for n in (3, 2, 5))
    assert short.hidden_states.shape[0] == 2 and longer.hidden_states.shape[0] == 5
    np.testing.assert_allclose(short.hidden_states, full.hidden_states[:2], atol=1e-6)
    np.testing.assert_allclose(longer.gate_logits[:3], full.gate_logits, atol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        Ouro(cfg).apply({"params": params}, ids, num_steps=0)


def test_causality(tiny):
    cfg, params = tiny
    ids = _ids(5, (1, 10))
    changed = ids.at[0, 7].set((ids[0, 7] + 1) % cfg.vocab_size)
    a, b = (forward(cfg, params, x).hidden_states for x in (ids, changed))
    np.testing.assert_array_equal(a[:, :, :7], b[:, :, :7])
    assert not np.allclose(a[:, :, 7:], b[:, :, 7:])


def test_packed_documents_do_not_attend_to_each_other(tiny):
    cfg, params = tiny
    doc_a, doc_b = _ids(6, (1, 5)), _ids(7, (1, 4))
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 2])
    out = forward(cfg, params, packed, segment_ids=segments)
    alone_a, alone_b = forward(cfg, params, doc_a), forward(cfg, params, doc_b)
    np.testing.assert_allclose(out.hidden_states[:, :, :5], alone_a.hidden_states, atol=1e-5)
    np.testing.assert_allclose(out.hidden_states[:, :, 5:9], alone_b.hidden_states, atol=1e-5)
    np.testing.assert_allclose(out.gate_logits[:, :, 5:9], alone_b.gate_logits, atol=1e-5)


def test_default_positions():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(model.default_positions(mask, None, mask.shape), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(model.default_positions(None, segments, segments.shape), [[0, 1, 0, 1, 2, 0]])


def test_xla_cpu_forms_equal_the_others(tiny):
    """The XLA:CPU forms (q/k/v and gate/up from stacked weights, the attention mask as an additive bias) equal
    separate matmuls and a masking select (the xla ops laid out for TPU), values and grads, with left padding
    (the padded rows, which see no key, are left out: the bias form passes their gradient on to q and k, the
    select does not)."""
    cfg, params = tiny
    ids = _ids(4, (2, 9))
    attention_mask = jnp.array([[0, 0, 0] + [1] * 6, [1] * 9])

    # A random projection of the (normalized) states: their sum of squares is constant, its gradient rounding noise.
    weights = jax.random.normal(jax.random.key(5), (cfg.total_ut_steps, 2, 9, cfg.hidden_size))

    def loss_and_grads(cfg):
        out = lambda p: Ouro(cfg).apply({"params": p}, ids, attention_mask=attention_mask).hidden_states
        loss = lambda p: jnp.sum(out(p) * weights * attention_mask[:, :, None])
        return jax.jit(jax.value_and_grad(loss))(params)

    assert model.on_xla_cpu(cfg.execution)
    tpu_forms = cfg.with_execution(platform="tpu", attention_impl="xla", cross_entropy_impl="xla")
    assert not model.on_xla_cpu(tpu_forms.execution)
    (loss, grads), (tpu_loss, tpu_grads) = loss_and_grads(cfg), loss_and_grads(tpu_forms)
    np.testing.assert_allclose(loss, tpu_loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(tpu_grads)):
        # float32 rounding through 9 layer applications: single elements differ by ~1e-4, each leaf by ~1e-6
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), jax.tree_util.keystr(path)


def test_query_blocked_causal_attention_equals_one_block():
    """The xla attention skips the keys after each query block: outputs and gradients equal one softmax over
    all keys on every row that has a visible key (packed documents, left padding, a length not divisible)."""
    length, heads, kv_heads, head_dim = 37, 4, 2, 8
    q, k, v = (jax.random.normal(key, (2, length, h, head_dim))
               for key, h in zip(jax.random.split(jax.random.key(3), 3), (heads, kv_heads, kv_heads)))
    segments = jnp.array([[1] * 20 + [2] * 17, [0] * 5 + [1] * 32])
    mask = model.causal_mask(None, segments, segments.shape)
    visible = (segments != 0)[:, :, None, None]

    def loss(attention, q, k, v):
        return jnp.sum(jnp.where(visible, attention(q, k, v), 0.0) ** 2)

    blocked = lambda q, k, v: flash.xla_attention(q, k, v, mask, "cpu", query_block=8)
    whole = lambda q, k, v: flash.attend(q, [(k, v, mask)], "cpu")
    value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2)))(q, k, v)
    chex.assert_trees_all_close(value_and_grad(blocked), value_and_grad(whole), rtol=1e-5, atol=1e-5)
    assert flash.query_bounds(length, 8) == [0, 9, 18, 27, 37]
    reference = flash.reference_attention(q, k, v, segments)
    np.testing.assert_allclose(np.where(visible, blocked(q, k, v), 0), np.where(visible, reference, 0), atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    gqa = config.tiny(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    params = model.init_params(gqa, jax.random.key(8))
    mha = gqa.replace(num_key_value_heads=4)
    repeat = lambda w: jnp.repeat(w, 2, axis=2)  # [N, d, KVH, hd] -> [N, d, H, hd]
    attn = params["decoder"]["layers"]["self_attn"]
    mha_attn = {**attn, "k_proj": repeat(attn["k_proj"]), "v_proj": repeat(attn["v_proj"])}
    mha_params = {**params, "decoder": {"layers": {**params["decoder"]["layers"], "self_attn": mha_attn}}}
    ids = _ids(9, (2, 7))
    a, b = forward(gqa, params, ids), forward(mha, mha_params, ids)
    np.testing.assert_allclose(a.hidden_states, b.hidden_states, atol=1e-5)


def test_step_ce_equals_cross_entropy_of_full_logits(tiny):
    cfg, params = tiny
    ids = _ids(10, (2, 11))
    targets = jnp.roll(ids, -1, axis=1)
    m = Ouro(cfg)
    out = forward(cfg, params, ids, targets=targets, ce_chunk_size=4)
    logits = m.apply({"params": params}, out.hidden_states, method=Ouro.logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    expected = -jnp.take_along_axis(log_probs, jnp.broadcast_to(targets[None, ..., None], (3, 2, 11, 1)), -1)[..., 0]
    np.testing.assert_allclose(out.step_ce, expected, atol=1e-5)


def test_bfloat16_compute_tracks_float32(tiny):
    cfg, params = tiny
    ids = _ids(11, (2, 8))
    f32, bf16 = forward(cfg, params, ids), forward(cfg.with_execution(dtype="bfloat16"), params, ids)
    assert bf16.hidden_states.dtype == jnp.bfloat16 and bf16.gate_logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16.hidden_states, np.float32), f32.hidden_states, atol=0.15)


def test_tied_embeddings_use_the_embedding_as_head():
    cfg = config.tiny(tie_word_embeddings=True)
    params = model.init_params(cfg, jax.random.key(12))
    assert "lm_head" not in params
    hidden = jax.random.normal(jax.random.key(13), (3, cfg.hidden_size))
    logits = Ouro(cfg).apply({"params": params}, hidden, method=Ouro.logits)
    np.testing.assert_allclose(logits, hidden @ params["embed_tokens"].T, atol=1e-5)


def test_public_boundary_checks_ranks_dtypes_and_shapes(tiny):
    cfg, params = tiny
    apply = lambda ids, **kw: Ouro(cfg).apply({"params": params}, ids, **kw)
    with pytest.raises(AssertionError, match="rank"):
        apply(jnp.zeros((5,), jnp.int32))
    with pytest.raises(AssertionError, match="type"):
        apply(jnp.zeros((1, 5), jnp.float32))
    with pytest.raises(AssertionError, match="shape"):
        apply(jnp.zeros((1, 5), jnp.int32), segment_ids=jnp.ones((1, 4), jnp.int32))
