"""The model with every kernel on (Pallas interpret mode on CPU) against the golden reference and the XLA paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_batch, tiny_train_config

from ouro_jax import sharding as shd
from ouro_jax.inference.api import generate
from ouro_jax.inference.cache import POLICIES
from ouro_jax.model import Ouro
from ouro_jax.train.step import build_train_program

KERNELS_ON = dict(attention_impl="pallas", cross_entropy_impl="pallas", kernel_interpret=True)


def test_golden_reference_with_kernels(golden_model, golden):
    cfg, params = golden_model
    model = Ouro(cfg.with_execution(**KERNELS_ON))
    ids = jnp.asarray(golden["input_ids"])
    targets = jnp.roll(ids, -1, axis=1)
    out = model.apply({"params": params}, ids, targets=targets)
    np.testing.assert_allclose(out.hidden_states, golden["hidden_states"], atol=1e-4)
    np.testing.assert_allclose(out.gate_logits, golden["gate_logits"], atol=1e-4)
    logits = golden["step_logits"]
    ref_ce = jax.nn.logsumexp(logits, -1) - np.take_along_axis(logits, np.asarray(targets)[None, ..., None], -1)[..., 0]
    np.testing.assert_allclose(out.step_ce, ref_ce, atol=1e-4)
    predicted = model.apply({"params": params}, out.hidden_states[-1], method=Ouro.predict)
    np.testing.assert_array_equal(predicted, np.argmax(logits[-1], -1))

    mask = jnp.asarray(golden["padded_attention_mask"])          # left padding
    padded = model.apply({"params": params}, jnp.asarray(golden["padded_input_ids"]), attention_mask=mask)
    valid = np.asarray(mask, bool)
    padded_logits = model.apply({"params": params}, padded.hidden_states[-1], method=Ouro.logits)
    np.testing.assert_allclose(padded_logits[valid], golden["padded_logits"][valid], atol=1e-4)


@pytest.mark.slow   # two train programs and two eval programs (~30-70 s on 2 cores)
def test_train_and_eval_step_equal_the_xla_step():
    results = []
    for kernels_on in (False, True):
        config = tiny_train_config()
        config.execution.update(**(KERNELS_ON if kernels_on else dict(attention_impl="xla", cross_entropy_impl="xla")))
        mesh = shd.make_mesh(dict(config.mesh))
        program = build_train_program(config, mesh)
        state = program.init(jax.random.key(0))
        batch = shd.global_batch(random_batch(config), mesh)
        state, metrics = program.step(state, batch)
        results.append((metrics, jax.device_get(state.params), program.evaluate(state.params, batch)))
    (m0, p0, e0), (m1, p1, e1) = results
    np.testing.assert_allclose(m0["loss"], m1["loss"], atol=1e-5)
    np.testing.assert_allclose(m0["step_ce"], m1["step_ce"], atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p0, p1)
    np.testing.assert_allclose(e0["step_ce_sum"], e1["step_ce_sum"], rtol=1e-5)
    np.testing.assert_array_equal(e0["predictions"], e1["predictions"])


@pytest.mark.parametrize("policy", [p if p == "full" else pytest.param(p, marks=pytest.mark.slow) for p in POLICIES])
def test_greedy_generation_with_kernels_gives_the_same_tokens(golden_model, golden, policy):
    cfg, params = golden_model
    prompts = [golden["input_ids"][0].tolist(), golden["input_ids"][1, 5:].tolist()]   # ragged: left padding
    for q in (1.0, 0.5):
        run = lambda c, q=q: generate(c, params, prompts, max_new_tokens=6, policy=policy, exit_threshold=q)
        plain = run(cfg.with_execution(attention_impl="xla", cross_entropy_impl="xla"))
        fused = run(cfg.with_execution(**KERNELS_ON))
        np.testing.assert_array_equal(fused.tokens, plain.tokens)
        np.testing.assert_array_equal(fused.depths, plain.depths)
