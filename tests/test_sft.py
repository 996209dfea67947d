"""Chat SFT end to end: chat shards' assistant mask reaches the loss (user targets do not count, assistant
targets do), the `:sft` stage of the configs, and a short `:sft` run from a pretrained run (`init_from`)."""

import importlib.util
import json
import os
import subprocess

import jax
import numpy as np
import pytest
from helpers import FAST_COMPILE, PYTHON, REPO, subprocess_env, write_chats

from ouro_jax.data import TokenShards, make_batch_iterator
from ouro_jax.data.prepare import prepare
from ouro_jax.model import init_params
from ouro_jax.train.config import model_config
from ouro_jax.train.settings import RunSettings
from ouro_jax.train.step import batch_loss_sums


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


@pytest.fixture
def chat_shards(tmp_path):
    prepare([str(write_chats(tmp_path / "chats.jsonl"))], tmp_path / "sft", chat=True, progress=False)
    return tmp_path / "sft"


def test_loss_counts_assistant_targets_only(chat_shards):
    cfg = model_config(load_config("tiny", "sft")).replace(num_hidden_layers=1, total_ut_steps=2)
    batch = next(make_batch_iterator(TokenShards(chat_shards), seq_len=128, batch_size=2, shuffle=False,
                                     process_index=0, process_count=1, prefetch=0))
    rng = np.random.default_rng(0)  # random weights of the right shapes (cheaper than the initializers on CPU)
    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)

    def loss_of(targets):
        return batch_loss_sums(cfg, params, {**batch, "targets": targets}, objective="stage1", beta=0.05,
                               gate_k=50.0, gate_gamma=0.005, ce_chunk_size=64)[0]

    loss = jax.jit(loss_of).lower(batch["targets"]).compile(FAST_COMPILE)
    mask, seg = batch["loss_mask"], batch["segment_ids"]
    user = np.argwhere((mask == 0) & (seg > 0) & (batch["targets"] > 2))[5]   # a user/template token's target
    answer = np.argwhere(mask > 0)[3]                                          # an assistant token's target
    base = float(loss(batch["targets"]))
    changed_user, changed_answer = batch["targets"].copy(), batch["targets"].copy()
    changed_user[tuple(user)] = (changed_user[tuple(user)] + 7) % cfg.vocab_size
    changed_answer[tuple(answer)] = (changed_answer[tuple(answer)] + 7) % cfg.vocab_size
    assert np.isfinite(base) and float(loss(changed_user)) == base
    assert abs(float(loss(changed_answer)) - base) > 1e-4
    assert 0 < mask.sum() < (seg > 0).sum()  # the batch holds prompts and answers


@pytest.mark.subprocess
@pytest.mark.parametrize("name,layers", [("ouro_1p4b", 24), ("ouro_2p6b", 48)])
def test_sft_stage_of_the_released_models(name, layers):
    from ouro_jax import sharding as shd
    from ouro_jax.train import optim
    from ouro_jax.train.step import build_train_program

    config = load_config(name, "sft")
    program = build_train_program(config, shd.make_mesh(dict(config.mesh)))
    cfg = program.model_cfg
    assert (cfg.num_hidden_layers, cfg.total_ut_steps, cfg.rope_theta) == (layers, 4, 1e6)
    assert program.objective == "stage1" and config.loss.beta == 0.05 and not config.data.sources
    assert program.abstract_batch["input_ids"].shape == (128, 32768)
    steps, warmup = int(config.train.steps), int(config.optim.warmup_steps)
    assert steps * 128 * 32768 <= 2 * 4e9 < (steps + 1) * 128 * 32768 and warmup == 200
    schedule = optim.lr_schedule(RunSettings.of(config).optim, steps)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, warmup, steps)], [0.0, 2e-5, 2e-6], rtol=1e-3)
    with pytest.raises(ValueError, match="unknown stage 'sfft'"):
        load_config(name, "sfft")


def _train(workdir, *flags):
    cmd = [PYTHON, "-m", "ouro_jax.cli.train", "--config", "configs/tiny.py:sft", "--workdir", str(workdir), *flags]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"], result.stdout


@pytest.mark.slow
def test_sft_run_from_a_pretrained_run_ends_with_finite_loss(chat_shards, tmp_path):
    data = f"--config.data.sources={chat_shards}"
    short = ["--config.train.steps=6", "--config.optim.decay_steps=3", "--config.train.checkpoint_every=6"]
    first, _ = _train(tmp_path / "pretrained", data, *short)
    params = tmp_path / "pretrained" / "params"
    rows, out = _train(tmp_path / "sft", data, *short, f"--config.init_from={params}")
    masked = sum(int(b["loss_mask"].sum()) for b in make_batch_iterator(
        TokenShards(chat_shards), seq_len=128, batch_size=4, num_epochs=1, shuffle=False, process_index=0,
        process_count=1, prefetch=0))
    assert f"initialized from {params}" in out
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)
    assert 0 < rows[0]["loss_tokens"] <= masked  # the assistant tokens of a batch, not every token
    assert rows[0]["loss"] < first[0]["loss"]  # it starts where the first run ended, not from random weights
