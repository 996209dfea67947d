"""Stage I / Stage II objectives: NumPy references, gradients of the in-loop loss, no [T,B,S,V] array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST_COMPILE

from ouro_jax import config, losses, model
from ouro_jax.model import Ouro


def _random_inputs(seed, shape=(4, 3, 7)):
    rng = np.random.default_rng(seed)
    step_ce = rng.uniform(0.0, 5.0, shape).astype(np.float32)
    gate_logits = rng.normal(0.0, 2.0, shape).astype(np.float32)
    mask = (rng.random(shape[1:]) > 0.3).astype(np.float32)
    return step_ce, gate_logits, mask


def _np_exit_pdf(z):
    lam = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    p = np.zeros_like(lam)
    survival = np.ones_like(lam[0])
    for t in range(len(z) - 1):
        p[t] = lam[t] * survival
        survival = survival * (1.0 - lam[t])
    p[-1] = survival
    return p


def _np_stage1(step_ce, z, mask, beta):
    p = _np_exit_pdf(z)
    per_token = (p * step_ce).sum(0) + beta * (p * np.log(p)).sum(0)
    return (per_token * mask).sum() / mask.sum()


def _np_stage2(step_ce, z, mask, k, gamma):
    lam = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    total = 0.0
    for t in range(1, len(z)):  # 0-based t = 1..T-1 is SPEC's t = 2..T
        w = 1.0 / (1.0 + np.exp(-k * (np.maximum(step_ce[t - 1] - step_ce[t], 0.0) - gamma)))
        bce = -(w * np.log(1.0 - lam[t]) + (1.0 - w) * np.log(lam[t]))
        total += (bce * mask).sum() / mask.sum()
    return total / len(z)


@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 0.05), (2, 0.0)])
def test_stage1_matches_numpy(seed, beta):
    step_ce, z, mask = _random_inputs(seed)
    ours = losses.stage1_loss(jnp.asarray(step_ce), jnp.asarray(z), jnp.asarray(mask), beta)
    np.testing.assert_allclose(float(ours), _np_stage1(step_ce, z, mask, beta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,k,gamma", [(0, 50.0, 0.005), (1, 10.0, 0.1), (2, 50.0, 0.0)])
def test_stage2_matches_numpy(seed, k, gamma):
    step_ce, z, mask = _random_inputs(seed)
    step_ce[1] = step_ce[0] - 0.01  # improvements near gamma, where the label is neither 0 nor 1
    ours = losses.stage2_loss(jnp.asarray(step_ce), jnp.asarray(z), jnp.asarray(mask), k, gamma)
    np.testing.assert_allclose(float(ours), _np_stage2(step_ce, z, mask, k, gamma), rtol=1e-5, atol=1e-5)


def test_stage2_labels_are_detached_and_bounded():
    step_ce, z, _ = _random_inputs(3)
    labels = losses.gate_continue_labels(jnp.asarray(step_ce), 50.0, 0.005)
    assert labels.shape == (3, 3, 7)
    assert float(labels.min()) >= float(jax.nn.sigmoid(-50.0 * 0.005)) - 1e-7  # SPEC 4: never below ~0.438
    loss = lambda ce: losses.stage2_loss(ce, jnp.asarray(z), jnp.ones((3, 7)), 50.0, 0.005)
    grad = jax.grad(loss)(jnp.asarray(step_ce))
    assert not np.any(np.asarray(grad))


def test_masked_mean_ignores_masked_tokens_and_empty_masks():
    values = jnp.array([[1.0, 100.0], [3.0, 5.0]])
    mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    assert float(losses.masked_mean(values, mask)) == pytest.approx(3.0)
    assert float(losses.masked_mean(values, jnp.zeros_like(mask))) == 0.0


@pytest.fixture(scope="module")
def tiny_model():
    cfg = config.tiny(num_hidden_layers=2, total_ut_steps=3, vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=2)
    return cfg, jax.jit(lambda key: model.init_params(cfg, key), compiler_options=FAST_COMPILE)(jax.random.key(0))


def _batch(shape=(2, 12), vocab=96, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (shape[0], shape[1] + 1))
    return jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.asarray(rng.random(shape) > 0.25, jnp.float32)


def test_in_loop_loss_gradients_equal_materialized_logits(tiny_model):
    cfg, params = tiny_model
    ids, targets, mask = _batch()

    def objective(step_ce, gate_logits, stage):
        if stage == 1:
            return losses.stage1_loss(step_ce, gate_logits, mask, 0.1)
        return losses.stage2_loss(step_ce, gate_logits, mask, 20.0, 0.01)

    def in_loop(p, stage):
        out = Ouro(cfg).apply({"params": p}, ids, targets=targets, return_hidden=False, ce_chunk_size=5)
        return objective(out.step_ce, out.gate_logits, stage)

    def naive(p, stage):  # every step's logits [T, B, S, V] at once
        m = Ouro(cfg)
        out = m.apply({"params": p}, ids)
        logits = m.apply({"params": p}, out.hidden_states, method=Ouro.logits)
        step_ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[None, ..., None], -1)[..., 0]
        return objective(step_ce, out.gate_logits, stage)

    for stage in (1, 2):
        jitted = lambda f: jax.jit(jax.value_and_grad(f), static_argnums=1, compiler_options=FAST_COMPILE)
        loss_a, grads_a = jitted(in_loop)(params, stage)
        loss_b, grads_b = jitted(naive)(params, stage)
        np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_a, grads_b)
        assert float(jnp.abs(grads_a["exit_gate"]["kernel"]).max()) > 0
        lm_head_moves = float(jnp.abs(grads_a["lm_head"]).max()) > 0
        assert lm_head_moves == (stage == 1)  # Stage II detaches the step losses from the LM


def _largest_array(hlo: str) -> int:
    shapes = re.findall(r"(?:f32|bf16|f16|s32|u32|pred)\[([\d,]+)\]", hlo)
    return max(int(np.prod([int(d) for d in shape.split(",")])) for shape in shapes)


def test_compiled_training_loss_never_holds_all_step_logits():
    """With a vocabulary large enough that logits dominate, the compiled gradient of the in-loop
    loss holds no array as large as one step's full-sequence logits [B, S, V], let alone all
    steps' [T, B, S, V], and needs a fraction of the memory of the materializing version."""
    cfg = config.tiny(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                      vocab_size=8192, total_ut_steps=4)
    batch, length, chunk = 2, 64, 16
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype), model.abstract_params(cfg),
                          is_leaf=lambda x: hasattr(x, "names"))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.float32)

    def in_loop(p, ids, mask):
        out = Ouro(cfg).apply({"params": p}, ids, targets=ids, return_hidden=False, ce_chunk_size=chunk)
        return losses.stage1_loss(out.step_ce, out.gate_logits, mask, 0.1)

    def naive(p, ids, mask):
        m = Ouro(cfg)
        out = m.apply({"params": p}, ids)
        logits = m.apply({"params": p}, out.hidden_states, method=Ouro.logits)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[None, ..., None], -1)[..., 0]
        return losses.stage1_loss(ce, out.gate_logits, mask, 0.1)

    compiled = jax.jit(jax.grad(in_loop)).lower(params, ids, mask).compile()
    materialized = jax.jit(jax.grad(naive)).lower(params, ids, mask).compile()
    one_step_logits = batch * length * cfg.vocab_size
    assert _largest_array(compiled.as_text()) < one_step_logits
    assert _largest_array(materialized.as_text()) >= cfg.total_ut_steps * one_step_logits  # the check can see it
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < cfg.total_ut_steps * one_step_logits * 4  # less than the float32 logits of all steps
    assert temp < materialized.memory_analysis().temp_size_in_bytes / 4
