"""The Flax model: parameter layout and counts, loop/scan equivalences, masking, GQA, remat, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax import config, model
from ouro_jax.model import Ouro


def _ids(key, shape, vocab=128):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(num_hidden_layers=3, total_ut_steps=3)
    return cfg, model.init_params(cfg, jax.random.key(0))


def _loss_and_grads(cfg, params, ids):
    def loss(p):
        out = Ouro(cfg).apply({"params": p}, ids, targets=jnp.roll(ids, -1, axis=1))
        return jnp.mean(out.step_ce) + jnp.mean(out.gate_logits ** 2) + jnp.mean(out.hidden_states ** 2)
    return jax.value_and_grad(loss)(params)


def test_released_parameter_counts_without_materializing():
    assert model.count_params(model.abstract_params(config.ouro_1p4b())) == 1_434_652_673
    assert model.count_params(model.abstract_params(config.ouro_2p6b())) == 2_667_974_657


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


def test_scan_layers_matches_unrolled_layers(tiny):
    cfg, params = tiny
    ids = _ids(1, (2, 9))
    loss_scan, grads_scan = _loss_and_grads(cfg, params, ids)
    unrolled = cfg.replace(scan_layers=False)
    loss_loop, grads_loop = _loss_and_grads(unrolled, model.unstack_layers(params, 3), ids)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-6)
    grads_loop = model.stack_layers(grads_loop, 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_scan, grads_loop)


def test_scan_steps_matches_python_loop(tiny):
    cfg, params = tiny
    ids = _ids(2, (2, 9))
    out_scan = Ouro(cfg).apply({"params": params}, ids)
    out_loop = Ouro(cfg.replace(scan_steps=False)).apply({"params": params}, ids)
    np.testing.assert_allclose(out_scan.hidden_states, out_loop.hidden_states, atol=1e-6)
    np.testing.assert_allclose(out_scan.gate_logits, out_loop.gate_logits, atol=1e-6)
    loss_scan, grads_scan = _loss_and_grads(cfg, params, ids)
    loss_loop, grads_loop = _loss_and_grads(cfg.replace(scan_steps=False), params, ids)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_scan, grads_loop)


@pytest.mark.parametrize("policy", ["full", "dots", "save_proj"])
def test_remat_policies_keep_gradients(tiny, policy):
    cfg, params = tiny
    ids = _ids(3, (2, 9))
    _, reference = _loss_and_grads(cfg, params, ids)
    _, grads = _loss_and_grads(cfg.replace(remat_policy=policy), params, ids)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), reference, grads)


def test_num_steps_override(tiny):
    cfg, params = tiny
    ids = _ids(4, (1, 6))
    full = Ouro(cfg).apply({"params": params}, ids)
    short = Ouro(cfg).apply({"params": params}, ids, num_steps=2)
    longer = Ouro(cfg).apply({"params": params}, ids, num_steps=5)
    assert short.hidden_states.shape[0] == 2 and longer.hidden_states.shape[0] == 5
    np.testing.assert_allclose(short.hidden_states, full.hidden_states[:2], atol=1e-6)
    np.testing.assert_allclose(longer.gate_logits[:3], full.gate_logits, atol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        Ouro(cfg).apply({"params": params}, ids, num_steps=0)


def test_causality(tiny):
    cfg, params = tiny
    ids = _ids(5, (1, 10))
    changed = ids.at[0, 7].set((ids[0, 7] + 1) % cfg.vocab_size)
    a = Ouro(cfg).apply({"params": params}, ids).hidden_states
    b = Ouro(cfg).apply({"params": params}, changed).hidden_states
    np.testing.assert_array_equal(a[:, :, :7], b[:, :, :7])
    assert not np.allclose(a[:, :, 7:], b[:, :, 7:])


def test_packed_documents_do_not_attend_to_each_other(tiny):
    cfg, params = tiny
    doc_a, doc_b = _ids(6, (1, 5)), _ids(7, (1, 4))
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 2])
    out = Ouro(cfg).apply({"params": params}, packed, segment_ids=segments)
    alone_a = Ouro(cfg).apply({"params": params}, doc_a)
    alone_b = Ouro(cfg).apply({"params": params}, doc_b)
    np.testing.assert_allclose(out.hidden_states[:, :, :5], alone_a.hidden_states, atol=1e-5)
    np.testing.assert_allclose(out.hidden_states[:, :, 5:9], alone_b.hidden_states, atol=1e-5)
    np.testing.assert_allclose(out.gate_logits[:, :, 5:9], alone_b.gate_logits, atol=1e-5)


def test_default_positions():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(model.default_positions(mask, None, mask.shape), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(model.default_positions(None, segments, segments.shape), [[0, 1, 0, 1, 2, 0]])


def test_grouped_query_attention_equals_repeated_kv_heads():
    gqa = config.tiny(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    params = model.init_params(gqa, jax.random.key(8))
    mha = gqa.replace(num_key_value_heads=4)
    repeat = lambda w: jnp.repeat(w, 2, axis=2)  # [N, d, KVH, hd] -> [N, d, H, hd]
    attn = params["decoder"]["layers"]["self_attn"]
    mha_attn = {**attn, "k_proj": repeat(attn["k_proj"]), "v_proj": repeat(attn["v_proj"])}
    mha_params = {**params, "decoder": {"layers": {**params["decoder"]["layers"], "self_attn": mha_attn}}}
    ids = _ids(9, (2, 7))
    a = Ouro(gqa).apply({"params": params}, ids)
    b = Ouro(mha).apply({"params": mha_params}, ids)
    np.testing.assert_allclose(a.hidden_states, b.hidden_states, atol=1e-5)


def test_step_ce_equals_cross_entropy_of_full_logits(tiny):
    cfg, params = tiny
    ids = _ids(10, (2, 11))
    targets = jnp.roll(ids, -1, axis=1)
    m = Ouro(cfg)
    out = m.apply({"params": params}, ids, targets=targets, ce_chunk_size=4)
    logits = m.apply({"params": params}, out.hidden_states, method=Ouro.logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    expected = -jnp.take_along_axis(log_probs, jnp.broadcast_to(targets[None, ..., None], (3, 2, 11, 1)), -1)[..., 0]
    np.testing.assert_allclose(out.step_ce, expected, atol=1e-5)


def test_bfloat16_compute_tracks_float32(tiny):
    cfg, params = tiny
    ids = _ids(11, (2, 8))
    f32 = Ouro(cfg).apply({"params": params}, ids)
    bf16 = Ouro(cfg.replace(dtype="bfloat16")).apply({"params": params}, ids)
    assert bf16.hidden_states.dtype == jnp.bfloat16 and bf16.gate_logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16.hidden_states, np.float32), f32.hidden_states, atol=0.15)


def test_tied_embeddings_use_the_embedding_as_head():
    cfg = config.tiny(tie_word_embeddings=True)
    params = model.init_params(cfg, jax.random.key(12))
    assert "lm_head" not in params
    hidden = jax.random.normal(jax.random.key(13), (3, cfg.hidden_size))
    logits = Ouro(cfg).apply({"params": params}, hidden, method=Ouro.logits)
    np.testing.assert_allclose(logits, hidden @ params["embed_tokens"].T, atol=1e-5)
