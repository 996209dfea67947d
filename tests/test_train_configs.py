"""Every training config builds its sharded program abstractly (nothing compiled or materialized)."""

import importlib.util
import math
import os

import jax
import numpy as np
import pytest
from helpers import REPO

from ouro_jax import model
from ouro_jax import sharding as shd
from ouro_jax.train import optim
from ouro_jax.train.settings import RunSettings
from ouro_jax.train.step import build_train_program


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("name,arg,params,steps_t,objective", [
    ("ouro_1p4b", None, 1_434_652_673, 8, "stage1"),
    ("ouro_1p4b", "stage1b", 1_434_652_673, 4, "stage1"),
    ("ouro_2p6b", None, 2_667_974_657, 4, "stage1"),
    ("stage2_gate", None, 1_434_652_673, 4, "stage2"),
])
def test_released_shapes_build_sharded_programs(name, arg, params, steps_t, objective):
    config = load_config(name, arg)
    program = build_train_program(config, shd.make_mesh(dict(config.mesh)))
    assert program.objective == objective and program.model_cfg.total_ut_steps == steps_t
    assert model.count_params(program.abstract_state.params) == params
    assert program.model_cfg.execution.dtype == "bfloat16" and program.model_cfg.execution.param_dtype == "float32"
    # FSDP over the 8 test devices: the embedding axis of every big matrix is split 8 ways.
    assert program.state_shardings.params["lm_head"].spec[0] == "fsdp"
    adam = program.abstract_state.opt_state[1][0]
    trained = model.count_params(adam.mu)
    assert trained == (params if objective == "stage1" else program.model_cfg.hidden_size + 1)
    assert program.abstract_batch["input_ids"].shape == (config.data.batch_size, config.data.seq_len)
    assert not config.data.sources  # the user names the token shards


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_small_configs_build_on_one_device(name):
    config = load_config(name)
    program = build_train_program(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    assert program.model_cfg.total_ut_steps >= 2 and config.data.sources.startswith("mano")


def test_bfloat16_compute_over_float32_master_weights():
    from helpers import tiny_train_config

    config = tiny_train_config()
    config.execution.update(dtype="bfloat16", param_dtype="float32")
    program = build_train_program(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    assert {x.dtype.name for x in jax.tree.leaves(program.abstract_state.params)} == {"float32"}
    assert {x.dtype.name for x in jax.tree.leaves(program.abstract_state.opt_state) if x.ndim} == {"float32"}
    text = program.step.lower(program.abstract_state, program.abstract_batch).as_text()
    matmuls = [line for line in text.splitlines() if "dot_general" in line]
    assert any("bf16" in line.split("->")[0] for line in matmuls)  # layer matmuls take bf16 operands


_M = 2**20
# The released recipe (SPEC 6): stage -> (T, beta, RoPE theta, seq len, batch tokens, stage tokens, peak and
# end learning rate of the stage's piece of the one schedule).
RECIPE = {
    "stage1a": (8, 0.1, 1e4, 4096, 8 * _M, 3e12, 3e-4, 3e-4),
    "stage1b": (4, 0.05, 1e4, 4096, 8 * _M, 3e12, 3e-4, 3e-4),
    "stage2": (4, 0.05, 4e4, 16384, 8 * _M, 1.4e12, 3e-4, 3e-5),
    "stage3": (4, 0.05, 1e6, 65536, 8 * _M, 20e9, 3e-5, 3e-5),
    "stage4": (4, 0.05, 1e6, 32768, 8 * _M, 300e9, 3e-5, 1e-5),
}
ORDER = ["stage1a", "stage1b", "stage2", "stage3", "stage4"]
RAMP_TOKENS = 3e11  # stage 1a: 4M-token steps for its first 300B tokens, then 8M


def stage_steps(stage):
    """Optimizer steps of a stage from its token budget and batches (1a: the ramp)."""
    tokens, batch = RECIPE[stage][5], RECIPE[stage][4]
    if stage == "stage1a":
        return int(RAMP_TOKENS // (4 * _M)) + int((tokens - RAMP_TOKENS) // batch)
    return int(tokens // batch)


def recipe_lr(stage, s, fresh):
    """SPEC 6's learning rate at step `s` of `stage`: a warmup (2000 steps in 1a, 200 where an upcycled model
    starts a fresh optimizer) only where the optimizer state is `fresh`, then constant or a cosine over the
    whole stage."""
    peak, end = RECIPE[stage][6:]
    warmup = (2000 if stage == "stage1a" else 200) if fresh else 0
    if warmup and s < warmup:
        return peak * s / warmup
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * s / stage_steps(stage)))


@pytest.mark.parametrize("name,layers,first", [("ouro_1p4b", 24, "stage1a"), ("ouro_2p6b", 48, "stage1b")])
@pytest.mark.parametrize("stage", sorted(RECIPE))
def test_every_pretraining_stage_builds_with_the_released_recipe(name, layers, first, stage):
    steps_t, beta, theta, seq_len, batch_tokens, tokens, *_ = RECIPE[stage]
    config = load_config(name, stage)
    program = build_train_program(config, shd.make_mesh(dict(config.mesh)))
    cfg = program.model_cfg
    assert (cfg.num_hidden_layers, cfg.total_ut_steps, cfg.rope_theta) == (layers, steps_t, theta)
    assert cfg.max_position_embeddings >= seq_len and program.objective == "stage1" and config.loss.beta == beta
    batch, length = program.abstract_batch["input_ids"].shape
    run = RunSettings.of(config)
    steps = config.train.steps
    assert length == seq_len and steps == stage_steps(stage)
    if stage == "stage1a":  # the ramp: 4M-token steps, then 8M from the step after 300B tokens
        ramp = int(RAMP_TOKENS // (4 * _M))
        assert batch * length == 4 * _M and run.data.batch_at(ramp - 1) == batch
        assert run.data.batch_at(ramp) * length == batch_tokens == 2 * batch * length
    else:
        assert batch * length == batch_tokens
    ramped = int(RAMP_TOKENS // (4 * _M)) if stage == "stage1a" else 0
    trained = ramped * 4 * _M + (steps - ramped) * batch_tokens
    assert trained <= tokens < trained + batch_tokens
    # One continuous schedule: after the first stage the optimizer state is carried and the stage's rates
    # are the recipe's at its offset (the steps of the stages before it), with no re-warmup.
    later = stage in ORDER and ORDER.index(stage) > ORDER.index(first)
    offset = sum(stage_steps(s) for s in ORDER[ORDER.index(first):ORDER.index(stage)]) if later else 0
    assert (run.train.carry_optimizer, run.optim.schedule_offset) == (later, offset)
    schedule = optim.lr_schedule(run.optim, steps)
    for s in (0, 1, 150, 2000, steps // 2, steps - 1):
        np.testing.assert_allclose(float(schedule(offset + s)), recipe_lr(stage, s, not later), rtol=2e-3, atol=1e-9)
    assert config.execution.remat_policy == "full" and program.state_shardings.params["lm_head"].spec[0] == "fsdp"


def test_the_recipe_schedule_is_continuous_across_stages():
    """Where SPEC 6 keeps a rate across a stage boundary, the last step of one stage and the first of the
    next train at the same rate (stage 2's cosine ends at stage 3's constant)."""
    runs = [RunSettings.of(load_config("ouro_1p4b", stage)) for stage in ORDER]
    for before, after in zip(runs, runs[1:]):
        last = before.optim.schedule_offset + before.train.steps - 1
        assert after.optim.schedule_offset == last + 1
        lr_before = float(optim.lr_schedule(before.optim, before.train.steps)(last))
        lr_after = float(optim.lr_schedule(after.optim, after.train.steps)(last + 1))
        np.testing.assert_allclose(lr_after, lr_before, rtol=1e-3)
