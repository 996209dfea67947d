"""Nothing lost, nothing cryptic: mismatched or corrupt checkpoints, atomic prepare, non-finite updates,
corrupt shards, workdir lock, metrics on resume, export leftovers, checkpoint fingerprints."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST_COMPILE, random_batch, tiny_train_config

from ouro_jax import sharding as shd
from ouro_jax.cli import prepare as prepare_cli
from ouro_jax.data import TokenShards
from ouro_jax.data import prepare as prepare_lib
from ouro_jax.errors import ConfigError, ShardCorruptError
from ouro_jax.hf.export import export_hf
from ouro_jax.train import loop
from ouro_jax.train.checkpointer import TrainCheckpointer
from ouro_jax.train.metrics import MetricsWriter
from ouro_jax.train.settings import RunSettings
from ouro_jax.train.step import build_train_program, place_params
from ouro_jax.train.workdir import ResumeConfigError, WorkdirBusyError, WorkdirLock


def _run_config(steps=10, intermediate_size=64):
    config = tiny_train_config()
    config.model.intermediate_size = intermediate_size
    config.data.eval_examples = 0
    config.train.update(steps=steps, checkpoint_every=5, keep_checkpoints=2, compiler_options=FAST_COMPILE,
                        export_params=False)
    return config


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def _flip_bits(step_dir: pathlib.Path, every: int = 512):
    """Flips one bit every `every` bytes in the middle half of each array data file of a step."""
    for path in (step_dir / "state").rglob("d/*"):
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 4, 3 * len(data) // 4, every):
            data[i] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 10-step run of the tiny config (checkpoints 5 and 10); tests copy it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    loop.train(_run_config(), str(workdir))
    return workdir


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_mismatched_config_stops_the_run_and_keeps_the_old_one(finished_run, tmp_path, capsys):
    workdir = _copy(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(ResumeConfigError, match=r"changed config: model.intermediate_size 64 -> 96; pass "
                                                  r"--config.train.allow_changes=model.intermediate_size"):
        loop.train(_run_config(intermediate_size=96), str(workdir))
    assert all(p.read_bytes() == data for p, data in before.items()), "the old run was changed"
    assert _steps(workdir) == [5, 10]

    loop.train(_restart_config(), str(workdir))
    assert "old run moved to" in capsys.readouterr().out
    moved = [d for d in os.listdir(workdir) if d.startswith("replaced-")]
    assert len(moved) == 1 and sorted(os.listdir(workdir / moved[0] / "checkpoints")) == ["10", "5"]
    assert _steps(workdir) == [5, 10]


def _restart_config():
    config = _run_config(intermediate_size=96)
    config.train.restart_incompatible = True
    return config


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_finishes(finished_run, tmp_path, capsys):
    workdir = _copy(finished_run, tmp_path)
    _flip_bits(workdir / "checkpoints" / "10")
    loop.train(_run_config(), str(workdir))
    out = capsys.readouterr().out
    assert "skipping step 10" in out and "resumed from step 5" in out
    assert _steps(workdir) == [5, 10] and os.path.isdir(workdir / "checkpoints" / "10.unrestorable")
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, 11)), "rows after the restored step must not be duplicated"


def test_unrestorable_step_without_fingerprint_is_skipped_only_when_an_older_one_restores(tmp_path):
    checkpointer = TrainCheckpointer(tmp_path, save_every=5, keep=2)
    for step in (5, 10):
        checkpointer.save(step, {"w": jnp.full(4, float(step))})
    checkpointer.wait()
    checkpointer.close()
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    for path in (tmp_path / "10" / "state").rglob("*"):
        if path.is_file() and path.name != "_METADATA":
            path.write_bytes(b"")  # truncated
    checkpointer = TrainCheckpointer(tmp_path, save_every=5, keep=2)
    step, state = checkpointer.restore_latest(abstract)
    assert step == 5 and float(state["w"][0]) == 5.0 and checkpointer.all_steps() == [5]
    checkpointer.close()
    assert (tmp_path / "10.unrestorable").is_dir()


def test_flipped_bytes_fail_the_fingerprint(tmp_path, capsys):
    state = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.arange(10)}
    checkpointer = TrainCheckpointer(tmp_path, save_every=5)
    for step in (5, 10):
        checkpointer.save(step, state)
    checkpointer.wait()
    checkpointer.close()
    path = max((p for p in (tmp_path / "10" / "state").rglob("d/*")), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit of one float: orbax alone restores this silently
    path.write_bytes(bytes(data))
    checkpointer = TrainCheckpointer(tmp_path, save_every=5)
    step, restored = checkpointer.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    checkpointer.close()
    assert step == 5 and "arrays ['w'] do not match the fingerprint" in capsys.readouterr().out
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert (tmp_path / "10.unrestorable").is_dir()


def test_starting_from_scratch_is_said(tmp_path, capsys):
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints", save_every=5)
    config = _run_config()
    program = build_train_program(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), FAST_COMPILE)
    step, _, resumed = loop._initial_state(config, program, checkpointer, None)
    checkpointer.close()
    assert (step, resumed) == (0, False) and "starting from scratch" in capsys.readouterr().out


def test_prepare_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path, monkeypatch, capsys):
    text = tmp_path / "a.txt"
    text.write_text("one\n\ntwo\n")
    prepare_lib.prepare([str(text)], tmp_path / "out", progress=False)
    (tmp_path / "out" / "NOTES.md").write_text("mine")
    old = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_lib.shards_lib.ShardWriter, "write", disk_full)
    with pytest.raises(SystemExit):
        prepare_cli.main([str(text), "--output", str(tmp_path / "out"), "--overwrite", "--no-progress"])
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == old
    assert not list(tmp_path.glob(".out.tmp-*"))
    monkeypatch.undo()

    (tmp_path / ".out.tmp-killed").mkdir()  # what a SIGKILL leaves
    prepare_lib.prepare([str(text)], tmp_path / "out", progress=False, overwrite=True)
    assert "incomplete output of an interrupted prepare" in capsys.readouterr().err
    assert not (tmp_path / ".out.tmp-killed").exists() and (tmp_path / "out" / "NOTES.md").read_text() == "mine"
    assert TokenShards(tmp_path / "out").num_documents == 2


@pytest.mark.parametrize("field,value", [("peak_lr", float("nan")), ("peak_lr", 1e40), ("init_lr", -1.0),
                                         ("eps", 0.0), ("b1", float("inf")), ("clip_norm", 0.0)])
def test_bad_optimizer_settings_are_refused(field, value):
    config = tiny_train_config()
    config.optim[field] = value
    with pytest.raises(ConfigError, match=f"optim.{field}"):
        RunSettings.of(config)


def test_an_update_that_overflows_is_skipped():
    config = tiny_train_config()
    config.optim.update(peak_lr=1.0, init_lr=1.0, weight_decay=1e3)  # valid settings, decoupled decay overflows
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    program = build_train_program(config, mesh, FAST_COMPILE)
    state = program.init(jax.random.key(0))
    params = jax.tree.map(np.array, jax.device_get(state.params))
    params["embed_tokens"][0, 0] = 1e37  # token 0 is in no batch: finite loss and gradient
    state = place_params(program, params)
    new_state, metrics = program.step(state, shd.global_batch(random_batch(config), mesh))
    assert int(metrics["skipped"]) == 1 and np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.params), params)


def test_truncated_shard_names_the_file(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("one\n\ntwo\n" * 50)
    prepare_lib.prepare([str(text)], tmp_path / "out", progress=False)
    shard = tmp_path / "out" / "shard-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ShardCorruptError, match=r"shard-00000.array_record: \d+ bytes, its manifest says"):
        TokenShards(tmp_path / "out")
    data = bytearray(shard.read_bytes() + b"1234567")
    data[40] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match="shard-00000.array_record: does not match the SHA-256"):
        TokenShards(tmp_path / "out")
    TokenShards(tmp_path / "out", verify=False)  # an explicit opt-out


def test_workdir_lock(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirBusyError, match=f"in use by another training run \\(pid {os.getpid()}\\)"):
            WorkdirLock(str(tmp_path)).__enter__()
    (tmp_path / ".lock").write_text("999999\n")  # a stale lock file of a dead process
    with WorkdirLock(str(tmp_path)):
        pass


def test_resumed_metrics_drop_the_rows_after_the_restored_step(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=10, progress_bar=False)
    for step in range(1, 9):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "kind": "tr')  # torn by a kill
    writer = MetricsWriter(str(tmp_path), total_steps=10, progress_bar=False, initial_step=5)
    writer.write(6, {"loss": 60.0})
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]


def test_export_removes_leftovers_of_a_killed_export(tmp_path, golden_model):
    cfg, params = golden_model
    (tmp_path / ".hf.tmp-abc123").mkdir()
    (tmp_path / ".hf.old-xyz").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()
    export_hf(tmp_path / "hf", cfg, params)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-1", "hf"]
