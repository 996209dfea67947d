"""Upcycling N -> 2N layers, and training from the upcycled checkpoint's shape."""

import subprocess

import jax
import numpy as np
import pytest
from helpers import PYTHON, REPO, subprocess_env, tiny_train_config

from ouro_jax import config, model, upcycle
from ouro_jax.params_io import load_params, save_params
from ouro_jax.train import loop as train
from ouro_jax.train.config import model_config
from ouro_jax.train.settings import RunSettings


def test_upcycle_repeats_the_whole_stack():
    cfg = config.tiny(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, total_ut_steps=2)
    params = model.init_params(cfg, jax.random.key(0))
    big_cfg, big = upcycle.upcycle_params(cfg, params)
    assert big_cfg.num_hidden_layers == 6
    for small_leaf, big_leaf in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(big["decoder"])):
        assert big_leaf.shape[0] == 6
        for i in range(6):
            np.testing.assert_array_equal(big_leaf[i], small_leaf[i % 3])
    for name in ("embed_tokens", "final_norm", "exit_gate", "lm_head"):
        jax.tree.map(np.testing.assert_array_equal, params[name], big[name])
    per_layer = model.count_params(params["decoder"]) // 3
    assert model.count_params(big) == model.count_params(params) + 3 * per_layer
    out = jax.jit(model.Ouro(big_cfg).apply)({"params": big}, np.arange(5)[None] % cfg.vocab_size)
    assert np.isfinite(np.asarray(out.gate_logits)).all()
    triple_cfg, triple = upcycle.upcycle_params(cfg, params, repeats=3)
    assert triple_cfg.num_hidden_layers == 9
    np.testing.assert_array_equal(triple["decoder"]["layers"]["mlp"]["up_proj"][7],
                                  params["decoder"]["layers"]["mlp"]["up_proj"][1])


@pytest.mark.subprocess
@pytest.mark.slow  # a CLI process and a run (make test-all); the upcycle itself is tested above
def test_upcycle_cli_and_training_adopts_the_checkpoint_shape(tmp_path):
    train_config = tiny_train_config()
    cfg = model_config(train_config)
    save_params(tmp_path / "small", cfg, model.init_params(cfg, jax.random.key(0)))
    proc = subprocess.run([PYTHON, "-m", "ouro_jax.cli.upcycle", str(tmp_path / "small"), str(tmp_path / "big")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 layers" in proc.stdout
    big_cfg, big = load_params(tmp_path / "big")
    assert big_cfg.num_hidden_layers == 4 and big["decoder"]["layers"]["mlp"]["up_proj"].shape[0] == 4
    train_config.execution.dtype = "bfloat16"
    run = train.adopt_checkpoint_shape(RunSettings.of(train_config), str(tmp_path / "big"))
    assert run.model.num_hidden_layers == 4 and run.model.execution.dtype == "bfloat16"
