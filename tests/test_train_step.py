"""The train step: optimizer and schedules, gradient accumulation, Stage II freezing, non-finite skips."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import FAST_COMPILE, random_batch, reference_run, tiny_train_config

from ouro_jax import losses
from ouro_jax import sharding as shd
from ouro_jax.errors import ConfigError
from ouro_jax.model import Ouro, abstract_params
from ouro_jax.train import optim
from ouro_jax.train.checkpointer import NonFiniteParamsError, TrainCheckpointer
from ouro_jax.train.config import model_config
from ouro_jax.train.metrics import matmul_flops_per_token, model_flops_per_token, peak_flops
from ouro_jax.train.settings import LossSettings, OptimSettings, RunSettings
from ouro_jax.train.step import build_train_program, place_params


def _one_device():
    return shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _optim(**kw):
    base = dict(peak_lr=1.0, init_lr=0.0, end_lr=0.1, warmup_steps=10, decay="linear", decay_steps=20,
                b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    return OptimSettings(**{**base, **kw})


def test_warmup_stable_decay_schedules():
    linear = optim.lr_schedule(_optim(), total_steps=100)
    np.testing.assert_allclose([linear(s) for s in (0, 5, 10, 50, 80, 90, 100)], [0, 0.5, 1, 1, 1, 0.55, 0.1],
                               atol=1e-6)
    cosine = optim.lr_schedule(_optim(decay="cosine"), total_steps=100)
    np.testing.assert_allclose([cosine(s) for s in (50, 80, 90, 100)], [1, 1, 0.55, 0.1], atol=1e-6)
    constant = optim.lr_schedule(_optim(decay="none"), total_steps=100)
    assert float(constant(99)) == 1.0
    with pytest.raises(ConfigError, match="must fit"):
        optim.lr_schedule(_optim(warmup_steps=90), total_steps=100)
    with pytest.raises(ConfigError, match="optim.decay"):
        _optim(decay="exp")


def test_beta_schedules():
    loss = functools.partial(LossSettings, beta=0.1, beta_final=0.05, beta_switch_step=10)
    step = optim.beta_schedule(loss(beta_schedule="step"))
    assert [round(float(step(s)), 6) for s in (0, 9, 10, 50)] == [0.1, 0.1, 0.05, 0.05]
    linear = optim.beta_schedule(loss(beta_schedule="linear"))
    np.testing.assert_allclose([linear(s) for s in (0, 5, 10, 20)], [0.1, 0.075, 0.05, 0.05])
    assert float(optim.beta_schedule(loss(beta_schedule="constant"))(1000)) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="beta_schedule"):
        loss(beta_schedule="cosine")
    with pytest.raises(ConfigError, match="beta_switch_step"):
        loss(beta_schedule="step", beta_switch_step=0)


def test_no_weight_decay_on_norm_gains_and_biases():
    params = nn.unbox(abstract_params(model_config(tiny_train_config())))
    mask = optim.weight_decay_mask(params)
    assert mask["final_norm"]["scale"] is False and mask["exit_gate"]["bias"] is False
    assert mask["decoder"]["layers"]["input_layernorm"]["scale"] is False
    assert mask["exit_gate"]["kernel"] is True and mask["lm_head"] is True and mask["embed_tokens"] is True
    # With zero gradients, AdamW only decays: norm gains and biases stay, weights shrink by lr * wd.
    values = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones(2)}, "gate": {"bias": jnp.ones(1)}}
    tx = optim.make_optimizer(_optim(warmup_steps=0, decay="none", peak_lr=0.5, clip_norm=None), total_steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, values), tx.init(values), values)
    new = optax.apply_updates(values, updates)
    np.testing.assert_allclose(new["w"], 0.95)
    np.testing.assert_array_equal(new["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["gate"]["bias"], 1.0)


def test_gradients_are_clipped_by_global_norm_before_adamw():
    """Two steps with gradients of norm 10 and 0.5 under clip_norm=1 equal unclipped AdamW fed the
    first gradient scaled to norm 1 and the second as it is."""
    params = {"w": jnp.zeros(4), "v": jnp.zeros(3)}
    g1 = {"w": jnp.array([6.0, 0.0, 0.0, 0.0]), "v": jnp.array([0.0, 8.0, 0.0])}   # norm 10
    g2 = {"w": jnp.array([0.1, 0.2, 0.0, 0.3]), "v": jnp.array([0.0, 0.0, 0.2])}   # norm < 1

    def run(tx, grads):
        state, p = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    clipped = run(optim.make_optimizer(_optim(warmup_steps=0, decay="none", clip_norm=1.0), 10), [g1, g2])
    manual = run(optim.make_optimizer(_optim(warmup_steps=0, decay="none", clip_norm=None), 10),
                 [jax.tree.map(lambda x: x / 10.0, g1), g2])
    unclipped = run(optim.make_optimizer(_optim(warmup_steps=0, decay="none", clip_norm=None), 10), [g1, g2])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, manual)
    assert not np.allclose(clipped["w"], unclipped["w"])


def _train(cfg, steps, state=None, seeds=None, program=None):
    program = program or build_train_program(cfg, _one_device(), FAST_COMPILE)
    state = program.init(jax.random.key(0)) if state is None else state
    history = []
    for i in range(steps):
        batch = shd.global_batch(random_batch(cfg, seed=i if seeds is None else seeds[i]), program.mesh)
        state, metrics = program.step(state, batch)
        history.append(jax.device_get(metrics))
    return program, state, history


def test_gradient_accumulation_equals_the_full_batch():
    reference = reference_run()
    cfg = tiny_train_config()
    cfg.train.grad_accum = 4
    _, accum, history = _train(cfg, len(reference["history"]))
    for a, b in zip(reference["history"], history):
        for key in ("loss", "grad_norm", "step_ce", "exit_p", "entropy"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
    # AdamW divides by sqrt(v): f32 summation-order noise of tiny gradients shows at ~1e-6.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), reference["params"],
                 jax.device_get(accum.params))
    with pytest.raises(ValueError, match="divisible by train.grad_accum"):
        cfg.train.grad_accum = 3
        build_train_program(cfg, _one_device())


def test_step_metrics_match_the_loss_functions():
    reference = reference_run()
    cfg, params, metrics = reference["config"], reference["initial_params"], reference["history"][0]
    batch = random_batch(cfg, seed=0)
    out = Ouro(reference["program"].model_cfg).apply(
        {"params": params}, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
        targets=batch["targets"])
    mask = batch["loss_mask"]
    expected = losses.stage1_loss(out.step_ce, out.gate_logits, mask, cfg.loss.beta)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["step_ce"], losses.masked_mean(out.step_ce, mask), rtol=1e-5)
    assert metrics["exit_p"].shape == (3,) and float(metrics["exit_p"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["loss_tokens"]) == mask.sum() and float(metrics["learning_rate"]) == pytest.approx(1e-3)
    assert [int(m["skipped"]) for m in reference["history"]] == [0] * 5
    assert reference["history"][-1]["loss"] < reference["history"][0]["loss"]


def test_stage2_trains_only_the_gate_toward_its_labels():
    reference = reference_run()
    lm = reference["params"]  # an LM whose steps differ, so the labels are informative
    cfg = tiny_train_config()
    cfg.loss.objective = "stage2"
    cfg.optim.update(peak_lr=3e-2, weight_decay=0.1)
    program = build_train_program(cfg, _one_device(), FAST_COMPILE)
    state = place_params(program, lm)
    assert set(state.opt_state[1][0].mu) == {"exit_gate"}  # no optimizer state for the frozen LM
    batch = random_batch(cfg, seed=100)

    def gate_loss(params):
        out = Ouro(program.model_cfg).apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                                            segment_ids=batch["segment_ids"], targets=batch["targets"])
        return float(losses.stage2_loss(out.step_ce, out.gate_logits, batch["loss_mask"], cfg.loss.gate_k,
                                        cfg.loss.gate_gamma))

    before = gate_loss(lm)
    _, state, history = _train(cfg, 15, state=state, seeds=[100] * 15, program=program)
    after = jax.device_get(state.params)
    for name in lm:
        if name != "exit_gate":
            jax.tree.map(np.testing.assert_array_equal, lm[name], after[name])
    assert not np.array_equal(lm["exit_gate"]["kernel"], after["exit_gate"]["kernel"])
    assert gate_loss(after) < before - 0.01
    assert history[-1]["loss"] < history[0]["loss"]


def test_nonfinite_updates_are_skipped_counted_and_never_checkpointed(tmp_path):
    reference = reference_run()
    cfg, program = reference["config"], reference["program"]
    params = jax.tree.map(np.array, reference["initial_params"])
    params["lm_head"][0, 0] = np.inf  # every cross-entropy turns NaN
    state = place_params(program, params)
    opt_before = jax.device_get(state.opt_state)
    for i in range(3):
        state, metrics = program.step(state, shd.global_batch(random_batch(cfg, seed=i), program.mesh))
        assert int(metrics["skipped"]) == 1 and int(metrics["nonfinite_streak"]) == i + 1
        assert float(metrics["learning_rate"]) == pytest.approx(cfg.optim.init_lr)  # the schedule did not advance
    assert int(state.nonfinite_total) == 3 and int(state.step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(state.params), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(state.opt_state), opt_before)
    checkpointer = TrainCheckpointer(tmp_path / "ckpt", save_every=1)
    with pytest.raises(NonFiniteParamsError, match="NaN or Inf"):
        checkpointer.save(3, state, force=True)
    checkpointer.close()
    assert not checkpointer.all_steps()


def test_model_flops_count():
    cfg = model_config(tiny_train_config())
    d, f, n, v, t = 32, 64, 2, 64, 3
    per_layer = 4 * d * 2 * 16 + 3 * d * f  # q,k,v,o with 2 heads x 16 + SwiGLU
    assert matmul_flops_per_token(cfg) == 2 * (n * per_layer + d * v + d)
    attention = 4 * n * 2 * 16 * 16
    assert model_flops_per_token(cfg, 16) == 3 * t * (matmul_flops_per_token(cfg) + attention)
    assert model_flops_per_token(cfg, 16, stage=2) == t * (matmul_flops_per_token(cfg) + attention)
    peak, source = peak_flops(jax.devices()[:1], dtype="float32")
    assert peak > 1e8 and "measured" in source


def test_learning_rate_follows_applied_updates_only():
    reference = reference_run()
    rates = [float(m["learning_rate"]) for m in reference["history"]]
    run = RunSettings.of(reference["config"])
    schedule = optim.lr_schedule(run.optim, run.train.steps)
    np.testing.assert_allclose(rates, [schedule(i) for i in range(5)], rtol=1e-6)
