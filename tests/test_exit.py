"""Exit distribution and selection modes against a direct NumPy implementation (SPEC 2)."""

import jax
import numpy as np
import pytest
from helpers import forward

from ouro_jax import exit as ex
from ouro_jax.inference import generate
from ouro_jax.model import Ouro


def numpy_pdf(z):
    """p(t) = lambda_t prod_{j<t}(1 - lambda_j), last step takes the rest; z [T, ...]."""
    lam = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    survival, pdf = np.ones_like(lam[0]), []
    for t in range(len(z) - 1):
        pdf.append(lam[t] * survival)
        survival = survival * (1.0 - lam[t])
    pdf.append(survival)
    return np.stack(pdf)


@pytest.fixture
def gate_logits():
    return np.random.default_rng(0).normal(scale=2.0, size=(4, 3, 5)).astype(np.float32)


def test_pdf_cdf_entropy_match_numpy(gate_logits):
    pdf = numpy_pdf(gate_logits)
    np.testing.assert_allclose(ex.exit_pdf(gate_logits), pdf, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ex.exit_pdf(gate_logits)).sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(ex.exit_cdf(gate_logits), np.cumsum(pdf, axis=0), atol=1e-6)
    np.testing.assert_allclose(ex.exit_entropy(gate_logits), -(pdf * np.log(pdf)).sum(0), atol=1e-5)
    assert np.asarray(ex.exit_cdf(gate_logits))[-1].min() == 1.0


def test_last_gate_is_unused(gate_logits):
    changed = gate_logits.copy()
    changed[-1] += 5.0
    np.testing.assert_array_equal(ex.exit_pdf(gate_logits), ex.exit_pdf(changed))


def test_log_pdf_is_finite_for_saturated_gates():
    z = np.array([[80.0, -80.0], [-80.0, 80.0], [0.0, 0.0]], np.float32)
    log_p = np.asarray(ex.exit_log_pdf(z))
    assert np.isfinite(log_p).all()
    np.testing.assert_allclose(np.exp(log_p).sum(0), 1.0, atol=1e-6)


def test_q_exit_step_is_first_step_reaching_threshold(gate_logits):
    cdf = np.cumsum(numpy_pdf(gate_logits), axis=0)
    for q in (0.1, 0.5, 0.9, 1.0):
        expected = np.where((cdf >= q - 1e-12).any(0), np.argmax(cdf >= q - 1e-12, axis=0), len(cdf) - 1)
        np.testing.assert_array_equal(ex.q_exit_step(gate_logits, q), expected)
    # q = 1.0 reaches only the last step unless the survival underflows
    np.testing.assert_array_equal(ex.q_exit_step(gate_logits, 1.0), 3)


def test_select_logits_modes_and_priority(gate_logits):
    rng = np.random.default_rng(1)
    step_logits = rng.normal(size=(4, 3, 5, 7)).astype(np.float32)
    pdf = numpy_pdf(gate_logits)
    np.testing.assert_array_equal(ex.select_logits(step_logits, gate_logits), step_logits[-1])
    np.testing.assert_array_equal(ex.select_logits(step_logits, gate_logits, exit_at_step=1), step_logits[1])
    np.testing.assert_allclose(ex.select_logits(step_logits, gate_logits, use_weighted_exit=True),
                               (pdf[..., None] * step_logits).sum(0), atol=1e-5)
    step = np.asarray(ex.q_exit_step(gate_logits, 0.5))
    picked = np.take_along_axis(step_logits, step[None, ..., None], axis=0)[0]
    np.testing.assert_array_equal(ex.select_logits(step_logits, gate_logits, exit_threshold=0.5), picked)
    # priority: exit_at_step > exit_threshold > weighted
    both = ex.select_logits(step_logits, gate_logits, exit_at_step=2, exit_threshold=0.5, use_weighted_exit=True)
    np.testing.assert_array_equal(both, step_logits[2])
    np.testing.assert_array_equal(
        ex.select_logits(step_logits, gate_logits, exit_threshold=0.5, use_weighted_exit=True), picked)
    with pytest.raises(ValueError, match="exit_at_step"):
        ex.select_logits(step_logits, gate_logits, exit_at_step=4)


def test_q_one_is_full_depth_even_where_the_float_cdf_saturates():
    z = np.array([[40.0, -3.0], [0.0, 40.0], [0.0, 0.0]], np.float32)  # CDF rounds to 1.0 at step 0 / step 1
    assert np.asarray(ex.exit_cdf(z))[0, 0] == 1.0
    np.testing.assert_array_equal(ex.q_exit_step(z, 1.0), [2, 2])
    np.testing.assert_array_equal(ex.q_exit_step(z, 1.0, float_cdf=True), [0, 1])   # the released float rule
    np.testing.assert_array_equal(ex.q_exit_step(z, 0.99), ex.q_exit_step(z, 0.99, float_cdf=True))


def test_select_logits_and_the_engine_agree_on_q_one(golden_model, golden):
    """A gate bias of +40 makes every lambda 1.0 in float32; q = 1.0 still reads the last step everywhere."""
    cfg, params = golden_model
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 40.0 if "exit_gate" in jax.tree_util.keystr(path) and x.ndim == 1 else x, params)
    ids = golden["input_ids"][:1]
    out = forward(cfg, params, ids)
    step_logits = forward(cfg, params, out.hidden_states, method=Ouro.logits)
    assert (np.asarray(ex.exit_cdf(out.gate_logits))[0] == 1.0).all()
    np.testing.assert_array_equal(ex.select_logits(step_logits, out.gate_logits, exit_threshold=1.0), step_logits[-1])
    np.testing.assert_array_equal(
        ex.select_logits(step_logits, out.gate_logits, exit_threshold=1.0, float_cdf=True), step_logits[0])
    result = generate(cfg, params, ids.tolist(), max_new_tokens=3, exit_threshold=1.0)
    assert (result.depths == cfg.total_ut_steps).all()
    assert (generate(cfg, params, ids.tolist(), max_new_tokens=3, exit_threshold=0.5).depths == 1).all()
