"""The recipe as one continuous run: a stage carries the previous stage's optimizer state (train.carry_optimizer)
and continues its schedule (optim.schedule_offset); the stage-1a batch ramp (data.batch_ramp) doubles the
tokens per step with a fixed micro-batch and resumes exactly across the ramp."""

import json

import jax
import numpy as np
import pytest
from helpers import tiny_train_config

from ouro_jax import sharding as shd
from ouro_jax.errors import ConfigError
from ouro_jax.params_io import load_params
from ouro_jax.train.loop import carried_state, train
from ouro_jax.train.optim import lr_schedule
from ouro_jax.train.settings import RunSettings
from ouro_jax.train.step import build_train_program
from ouro_jax.train.workdir import RUN_CONFIG, ResumeConfigError, check_resume_config


def tiny(steps, **data):
    """A one-layer d=32 model on Mano, 16-token rows, a constant rate after a 2-step warmup."""
    c = tiny_train_config(num_hidden_layers=1)
    c.data.update(eval_examples=0, **data)
    c.optim.update(peak_lr=1e-2, init_lr=1e-3, warmup_steps=2, decay="none", decay_steps=0)
    c.train.update(steps=steps, log_every=1, checkpoint_every=2, keep_checkpoints=10, async_checkpointing=False,
                   export_params=True)
    return c


def train_rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"kind": "train"' in line]


RAMP = dict(batch_size=8, batch_ramp="3:16")  # from step 3 on (after 3 updates) 16 rows a step instead of 8


@pytest.fixture(scope="module")
def ramped_run(tmp_path_factory):
    """An uninterrupted 6-step run with the batch ramp (also the first stage of the carry tests)."""
    workdir = tmp_path_factory.mktemp("ramped") / "run"
    return workdir, train(tiny(6, **RAMP), workdir)


def test_batch_ramp_doubles_the_tokens_per_step_and_resumes_exactly_across_it(tmp_path, ramped_run):
    """A run stopped before the ramp and again after it resumes to the params of an uninterrupted run, bit
    for bit; the ramp step doubles the tokens per step."""
    straight_dir, straight = ramped_run
    rows = train_rows(straight_dir)
    assert [r["batch_tokens"] for r in rows] == [8 * 16] * 3 + [16 * 16] * 3
    for stop in (2, 4, 6):  # the same workdir: stopped before the ramp, after it, then to the end
        result = train(tiny(stop, **RAMP), tmp_path / "resumed")
    assert result.step == 6
    _, params = load_params(result.params_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.state.params), jax.device_get(params))
    resumed = {r["step"]: r for r in train_rows(tmp_path / "resumed")}
    assert [resumed[r["step"]]["loss"] for r in rows] == [r["loss"] for r in rows]


def test_batch_ramp_is_checked_and_a_changed_ramp_is_a_config_change(tmp_path):
    for bad, message in [("3:12", "multiple of data.batch_size"), ("3-16", "STEP:BATCH"),
                         ("4:16,2:32", "ascending")]:
        with pytest.raises(ConfigError, match=message):
            RunSettings.of(tiny(4, batch_size=8, batch_ramp=bad))
    run = RunSettings.of(tiny(4, batch_size=8, batch_ramp="2:16,3:32"))
    assert [run.data.batch_at(s) for s in range(5)] == [8, 8, 16, 32, 32] and run.data.batch_multiples == [1, 2, 4]
    ramped = run.at_batch_multiple(4)
    assert (ramped.data.batch_size, ramped.train.grad_accum) == (32, 4)  # the micro-batch stays 8 rows
    (tmp_path / RUN_CONFIG).write_text(json.dumps(run.to_dict()))
    check_resume_config(run.to_dict(), set(), tmp_path)
    changed = RunSettings.of(tiny(4, batch_size=8, batch_ramp="2:16")).to_dict()
    with pytest.raises(ResumeConfigError, match=r"data.batch_ramp '2:16,3:32' -> '2:16'"):
        check_resume_config(changed, set(), tmp_path)
    check_resume_config(changed, {"data.batch_ramp"}, tmp_path)


def next_stage(first_workdir, steps, offset, **changes):
    """The next stage of a continuous run: T changes, the optimizer state carries, the schedule continues."""
    c = tiny(steps)
    c.model.total_ut_steps = 2
    c.init_from = str(first_workdir)
    c.optim.update(warmup_steps=0, schedule_offset=offset, **changes)
    c.train.carry_optimizer = True
    return c


@pytest.mark.slow  # a second program and a short run: ~30 s of CPU
def test_a_stage_carries_the_optimizer_state_and_continues_the_schedule(tmp_path, ramped_run):
    first_dir, first = ramped_run
    config = next_stage(first_dir, 2, 6, peak_lr=5e-3, decay="cosine", decay_steps=2, end_lr=1e-3)
    run = RunSettings.of(config)
    program = build_train_program(run, shd.make_mesh(dict(run.mesh)))
    carried = jax.device_get(carried_state(run, program))
    ended = jax.device_get(first.state)
    jax.tree.map(np.testing.assert_array_equal, (ended.params, ended.opt_state), (carried.params, carried.opt_state))
    assert int(carried.step) == 0 and int(ended.step) == 6

    train(config, tmp_path / "1b")
    rows = train_rows(tmp_path / "1b")
    schedule = lr_schedule(run.optim, 2)
    # The first update of the stage uses the rate at the recipe's step 6 (its offset), the stage's peak: no warmup.
    assert rows[0]["learning_rate"] == pytest.approx(float(schedule(6))) == pytest.approx(5e-3)
    assert rows[1]["learning_rate"] == pytest.approx(float(schedule(7))) and float(schedule(7)) < 5e-3


def test_carrying_needs_a_training_run_whose_state_fits(tmp_path, ramped_run):
    first_dir, _ = ramped_run
    with pytest.raises(ConfigError, match=r"holds params only, no optimizer state"):
        train(next_stage(first_dir / "params", 2, 6), tmp_path / "from_params")
    # another objective trains another subtree: its AdamW moments have other shapes
    config = next_stage(first_dir, 2, 6)
    config.loss.objective = "last_step"
    with pytest.raises(ConfigError, match=r"does not fit this run .* set train.carry_optimizer=False"):
        train(config, tmp_path / "other_objective")
    config = next_stage(first_dir, 2, 6)
    config.train.carry_optimizer = False
    with pytest.raises(ConfigError, match=r"optim.schedule_offset=6 continues a carried optimizer state"):
        train(config, tmp_path / "fresh")
    config.init_from, config.optim.schedule_offset, config.train.carry_optimizer = "", 0, True
    with pytest.raises(ConfigError, match=r"carry_optimizer=True carries the optimizer state of init_from"):
        train(config, tmp_path / "nothing")
