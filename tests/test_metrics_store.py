"""Metrics on an object store: appended in pieces by a background thread (GCS compose on the fake server,
nothing re-uploaded), and the optional Weights & Biases logging (offline) with its one-line error when absent."""

import builtins
import subprocess
import sys
import time

import pytest
from helpers import subprocess_env

from ouro_jax import paths
from ouro_jax.errors import ConfigError
from ouro_jax.train.metrics import MetricsWriter, ObjectStoreLog


def test_object_store_log_appends_pieces_off_the_caller_thread(gcs_bucket, monkeypatch):
    path = paths.as_path(gcs_bucket) / "append" / "metrics.jsonl"
    uploads = []
    store = ObjectStoreLog._store
    monkeypatch.setattr(ObjectStoreLog, "_store", lambda self, piece: (uploads.append(piece), store(self, piece)))
    log = ObjectStoreLog(path, interval=3600)
    log.write("row 1\n")
    log.write("row 2\n")
    log.sync()  # returns at once; the thread appends
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text() == "row 1\nrow 2\n"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log.write("row 3\n")
    log.close()
    assert path.read_text() == "row 1\nrow 2\nrow 3\n"
    assert uploads == [b"row 1\nrow 2\n", b"row 3\n"]  # each byte uploaded once
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]  # no piece left behind


def test_wandb_offline_run_gets_every_row(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # the optional extra; its absence is tested below
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OURO_JAX_CACHE_DIR", str(tmp_path / "cache"))
    writer = MetricsWriter(tmp_path / "run", total_steps=2, progress_bar=False, wandb_project="ouro-test",
                           run_config={"seed": 0})
    run = writer._wandb
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": 1.5})
    writer.close()
    assert wandb.run is None
    logs = list((tmp_path / "cache" / "wandb").rglob(f"run-{run.id}.wandb"))
    data = logs[0].read_bytes()  # history rows hold JSON values: both steps' losses are in the log
    assert len(logs) == 1 and b"train/loss" in data and b"1.5" in data


def test_wandb_requested_but_missing_is_a_config_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"train.wandb_project needs Weights & Biases.*ouro_jax\[wandb\]"):
        MetricsWriter(tmp_path / "run", total_steps=1, progress_bar=False, wandb_project="p")


@pytest.mark.subprocess
def test_the_tensorboard_writer_starts_without_importing_torch(tmp_path):
    """tensorboardX imports torch when installed (~2 s of every run's start); the writer keeps it out, and
    torch still imports afterwards."""
    script = ("import sys; from ouro_jax.train.metrics import MetricsWriter; "
              f"w = MetricsWriter({str(tmp_path)!r}, total_steps=1, progress_bar=False); "
              "w.write(1, {'loss': 1.0}); w.close(); assert 'torch' not in sys.modules, 'torch imported'; "
              "import torch; print('ok', torch.__name__)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0 and "ok torch" in proc.stdout, proc.stderr
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
