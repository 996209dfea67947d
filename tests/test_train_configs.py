"""Every training config builds its sharded program abstractly (nothing compiled or materialized)."""

import importlib.util
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
# The released recipe (SPEC 6): stage -> (T, beta, RoPE theta, seq len, batch tokens, stage tokens,
# learning rate at step 0 / end of warmup / middle of the decay / last step).
RECIPE = {
    "stage1a": (8, 0.1, 1e4, 4096, 4 * _M, 3e12, (0.0, 3e-4, 3e-4, 3e-4)),
    "stage1b": (4, 0.05, 1e4, 4096, 8 * _M, 3e12, (0.0, 3e-4, 3e-4, 3e-4)),
    "stage2": (4, 0.05, 4e4, 16384, 8 * _M, 1.4e12, (0.0, 3e-4, 1.65e-4, 3e-5)),
    "stage3": (4, 0.05, 1e6, 65536, 8 * _M, 20e9, (0.0, 3e-5, 3e-5, 3e-5)),
    "stage4": (4, 0.05, 1e6, 32768, 8 * _M, 300e9, (0.0, 3e-5, 2e-5, 1e-5)),
}


@pytest.mark.parametrize("name,layers", [("ouro_1p4b", 24), ("ouro_2p6b", 48)])
@pytest.mark.parametrize("stage", sorted(RECIPE))
def test_every_pretraining_stage_builds_with_the_released_recipe(name, layers, stage):
    steps_t, beta, theta, seq_len, batch_tokens, tokens, lrs = RECIPE[stage]
    config = load_config(name, stage)
    program = build_train_program(config, shd.make_mesh(dict(config.mesh)))
    cfg = program.model_cfg
    assert (cfg.num_hidden_layers, cfg.total_ut_steps, cfg.rope_theta) == (layers, steps_t, theta)
    assert cfg.max_position_embeddings >= seq_len and program.objective == "stage1" and config.loss.beta == beta
    batch, length = program.abstract_batch["input_ids"].shape
    assert length == seq_len and batch * length == batch_tokens
    steps = config.train.steps
    assert steps * batch_tokens <= tokens < (steps + 1) * batch_tokens
    # A fresh optimizer state (every stage after 1a starts from init_from) warms up from 0.
    warmup = config.optim.warmup_steps
    assert 0 < warmup <= (2000 if stage == "stage1a" else 200)
    schedule = optim.lr_schedule(RunSettings.of(config).optim, steps)
    middle = warmup + (steps - warmup) // 2
    got = [float(schedule(s)) for s in (0, warmup, middle, steps)]
    np.testing.assert_allclose(got, lrs, rtol=1e-3)
    assert config.execution.remat_policy == "full" and program.state_shardings.params["lm_head"].spec[0] == "fsdp"
