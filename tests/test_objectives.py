"""`loss.objective`: "last_step" (the plain looped LM) against a materialized NumPy reference."""

import functools

import jax
import numpy as np
import pytest
from helpers import FAST_COMPILE, random_batch, tiny_train_config

from ouro_jax import sharding as shd
from ouro_jax.model import Ouro, init_params
from ouro_jax.train.config import model_config
from ouro_jax.train.step import batch_loss_sums, build_train_program


def _numpy_last_step_ce(cfg, params, batch):
    """Per-token CE of the last step from materialized logits, in float64 NumPy."""
    model = Ouro(cfg)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def last_logits(params, batch):
        out = model.apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], return_hidden=True)
        return model.apply({"params": params}, out.hidden_states[-1], method=Ouro.logits)

    logits = np.asarray(last_logits(params, batch), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]


def test_last_step_objective_is_the_last_steps_cross_entropy():
    config = tiny_train_config()
    config.loss.objective = "last_step"
    cfg = model_config(config)
    params = init_params(cfg, jax.random.key(1))
    batch = random_batch(config, seed=3)
    loss_fn = functools.partial(batch_loss_sums, cfg, objective="last_step", beta=0.1, gate_k=50.0,
                                gate_gamma=0.005, ce_chunk_size=8)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
    (loss_sum, stats), grads = value_and_grad(params, batch)
    expected = (_numpy_last_step_ce(cfg, params, batch) * batch["loss_mask"]).sum()
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
    np.testing.assert_allclose(float(stats["step_ce_sum"][-1]), expected, rtol=1e-5)
    assert all(not np.any(g) for g in jax.tree.leaves(grads["exit_gate"]))  # no gate term, no entropy
    assert all(np.any(g) for name in ("decoder", "lm_head") for g in jax.tree.leaves(grads[name]))


def test_last_step_training_leaves_the_gate_untouched():
    config = tiny_train_config()
    config.loss.objective = "last_step"
    config.optim.update(weight_decay=0.1)  # weight decay would move a gate that the optimizer held
    program = build_train_program(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), FAST_COMPILE)
    state = program.init(jax.random.key(0))
    before = jax.tree.map(np.array, jax.device_get(state.params))
    assert "exit_gate" not in state.opt_state[1][0].mu and "decoder" in state.opt_state[1][0].mu
    batch = random_batch(config, seed=7)
    reference = (_numpy_last_step_ce(program.model_cfg, before, batch) * batch["loss_mask"]).sum()
    state, metrics = program.step(state, shd.global_batch(batch, program.mesh))
    np.testing.assert_allclose(float(metrics["loss"]), reference / batch["loss_mask"].sum(), rtol=1e-5)
    after = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, before["exit_gate"], after["exit_gate"])
    assert not np.array_equal(before["lm_head"], after["lm_head"])


def test_unknown_objective_is_rejected():
    config = tiny_train_config()
    config.loss.objective = "stage3"
    with pytest.raises(ValueError, match="unknown loss.objective 'stage3'"):
        build_train_program(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
