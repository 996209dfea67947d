"""A run started from a checkpoint (`init_from`): shapes from the checkpoint, T / RoPE / positions from the
run config, explicit command-line overrides win (and must match the checkpoint's architecture)."""

import json
import os

import jax
import pytest
from absl import flags
from helpers import REPO
from ml_collections import config_flags

from ouro_jax import config as model_presets
from ouro_jax import model
from ouro_jax import sharding as shd
from ouro_jax.cli import train as cli
from ouro_jax.errors import ConfigError
from ouro_jax.params_io import load_model_config, save_params
from ouro_jax.train.config import model_config, pretraining_config
from ouro_jax.train.loop import adopt_checkpoint_shape, train
from ouro_jax.train.settings import RunSettings
from ouro_jax.train.step import build_train_program


def tiny_stage(stage):
    """The released recipe's `stage` scaled down to a tiny model on Mano, two steps on one device, started
    from params alone (a fresh optimizer: no carried state, no schedule offset)."""
    c = pretraining_config(model_presets.tiny(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_attention_heads=2, num_key_value_heads=2), stage)
    c.execution.update(dtype="float32", remat_policy="none")
    c.mesh.update(data=-1, fsdp=1)
    c.data.update(sources="mano:max_len=3", seq_len=16, batch_size=8)
    c.optim.update(warmup_steps=1, schedule_offset=0)
    c.train.update(steps=2, carry_optimizer=False, ce_chunk_size=16, checkpoint_every=100, async_checkpointing=False,
                   compiler_options={"xla_backend_optimization_level": 0})
    return c


@pytest.mark.slow  # a real (two-step) training run: ~10 s of CPU
def test_stage1a_to_stage1b_changes_T_from_8_to_4(tmp_path):
    stage1a = model_config(tiny_stage("stage1a"))
    assert stage1a.total_ut_steps == 8
    save_params(tmp_path / "1a", stage1a, model.init_params(stage1a, jax.random.key(0)))
    config = tiny_stage("stage1b")
    config.init_from = str(tmp_path / "1a")
    result = train(config, str(tmp_path / "1b"))
    trained = load_model_config(result.params_dir)
    assert trained.total_ut_steps == 4 and trained.rope_theta == 1e4
    assert {k: v for k, v in trained.to_dict().items() if k != "total_ut_steps"} == {
        k: v for k, v in stage1a.to_dict().items() if k != "total_ut_steps"}
    with open(tmp_path / "1b" / "metrics.jsonl") as f:
        assert all(len(json.loads(line)["step_ce"]) == 4 for line in f if '"step_ce"' in line)


@pytest.fixture
def upcycled_1a(tmp_path):
    """The 48-layer checkpoint upcycled after stage 1a (T=8, theta 10K), as an HF directory: config only."""
    directory = tmp_path / "upcycled"
    os.makedirs(directory)
    with open(directory / "config.json", "w") as f:
        json.dump(model_presets.ouro_2p6b(total_ut_steps=8, rope_theta=1e4).to_hf_config(), f)
    return str(directory)


def parse_command_line(*overrides, config_file="ouro_2p6b.py"):
    """(config, explicit model fields) exactly as `ouro-train --config ... OVERRIDES` parses them."""
    argv = ["ouro-train", f"--config={os.path.join(REPO, 'configs', config_file)}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config, cli.explicit_model_fields(flag_values["config"])


def test_upcycled_2p6b_stage1b_runs_T4(upcycled_1a):
    config, explicit = parse_command_line(f"--config.init_from={upcycled_1a}")
    assert not explicit
    run = adopt_checkpoint_shape(RunSettings.of(config), config.init_from, explicit)
    program = build_train_program(run, shd.make_mesh(dict(config.mesh)))  # abstract: nothing 2.6B-sized
    cfg = program.model_cfg
    assert (cfg.num_hidden_layers, cfg.total_ut_steps, cfg.rope_theta) == (48, 4, 1e4)
    assert model.count_params(program.abstract_state.params) == 2_667_974_657


def test_command_line_overrides_win(upcycled_1a):
    config, explicit = parse_command_line(f"--config.init_from={upcycled_1a}", "--config.model.total_ut_steps=6",
                                          "--config.model.rope_theta=5e5", "--config.model.num_hidden_layers=48")
    assert explicit == {"total_ut_steps", "rope_theta", "num_hidden_layers"}
    adopted = adopt_checkpoint_shape(RunSettings.of(config), config.init_from, explicit).model
    assert (adopted.total_ut_steps, adopted.rope_theta, adopted.num_hidden_layers) == (6, 5e5, 48)
    # An architecture override cannot reshape the checkpoint: a clear error, not a silent replacement.
    config, explicit = parse_command_line(f"--config.init_from={upcycled_1a}", "--config.model.num_hidden_layers=24",
                                          "--config.model.hidden_size=1024")
    clash = r"hidden_size=1024 \(checkpoint: 2048\), num_hidden_layers=24 \(checkpoint: 48\)"
    with pytest.raises(ConfigError, match=clash):
        adopt_checkpoint_shape(RunSettings.of(config), config.init_from, explicit)
    # Without an override the checkpoint's shapes replace the config file's (here the 24-layer 1.4B).
    config, explicit = parse_command_line(f"--config.init_from={upcycled_1a}", config_file="ouro_1p4b.py:stage1b")
    adopted = adopt_checkpoint_shape(RunSettings.of(config), config.init_from, explicit).model
    assert (adopted.num_hidden_layers, adopted.total_ut_steps) == (48, 4)


def test_stage2_runs_the_frozen_lm_as_it_was_trained(upcycled_1a):
    """Stage II takes T and RoPE theta from the checkpoint too (the config file's are the 1.4B's); explicit wins."""
    config, explicit = parse_command_line(f"--config.init_from={upcycled_1a}", config_file="stage2_gate.py")
    assert config.model.rope_theta == 1e6
    adopted = adopt_checkpoint_shape(RunSettings.of(config), config.init_from, explicit).model
    assert (adopted.num_hidden_layers, adopted.total_ut_steps, adopted.rope_theta) == (48, 8, 1e4)
    config, explicit = parse_command_line(f"--config.init_from={upcycled_1a}", "--config.model.total_ut_steps=4",
                                          config_file="stage2_gate.py")
    adopted = adopt_checkpoint_shape(RunSettings.of(config), config.init_from, explicit).model
    assert (adopted.total_ut_steps, adopted.rope_theta) == (4, 1e4)
