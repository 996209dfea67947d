"""gs:// paths end to end on a local fake GCS server (the `gcs_bucket` fixture): the path helpers, prepared
data, a training run with its workdir on the bucket (checkpoints, metrics, TensorBoard, params) that
resumes, and an HF export read back; plus the local behaviour of the helpers."""

import hashlib
import json
import os
import subprocess

import jax
import numpy as np
import pytest
from helpers import FAST_COMPILE, PYTHON, REPO, subprocess_env, tiny_train_config

from ouro_jax import paths
from ouro_jax.data import TokenShards
from ouro_jax.data import prepare as prepare_lib
from ouro_jax.hf import load_hf
from ouro_jax.params_io import export_checkpoint, load_params
from ouro_jax.train import loop
from ouro_jax.train.workdir import move_run_aside


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.as_path("runs/a")) == str(tmp_path / "runs" / "a")
    assert os.fspath(paths.as_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert os.fspath(paths.as_path("gs://bucket/runs") / "a") == "gs://bucket/runs/a"
    assert paths.is_local("runs/a") and paths.is_local(tmp_path) and not paths.is_local("gs://bucket/x")


def test_local_helpers(tmp_path):
    paths.write_atomic(tmp_path / "f.txt", "one")
    paths.write_atomic(tmp_path / "f.txt", "two")
    assert os.listdir(tmp_path) == ["f.txt"] and (tmp_path / "f.txt").read_text() == "two"
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "DONE").write_text("new")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "DONE").write_text("old")
    paths.replace_tree(tmp_path / "new", tmp_path / "out", "DONE")
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "out"] and (tmp_path / "out" / "DONE").read_text() == "new"
    assert paths.local_copy(tmp_path / "f.txt", "not checked for local files") == str(tmp_path / "f.txt")


def _tree(root):
    return {os.path.relpath(p, root): p.read_text() for p in paths.files(root)}


def test_object_store_helpers(gcs_bucket):
    root = paths.as_path(gcs_bucket) / "helpers"
    paths.write_atomic(root / "src" / "sub" / "a.txt", "a")
    paths.write_atomic(root / "src" / "DONE", "1")
    paths.move_tree(root / "src", root / "dst", "DONE")
    assert _tree(root / "dst") == {"DONE": "1", "sub/a.txt": "a"} and not (root / "src").exists()

    paths.write_atomic(root / "new" / "DONE", "2")
    paths.replace_tree(root / "new", root / "dst", "DONE")
    assert _tree(root) == {"dst/DONE": "2"}

    # a killed publish: a complete copy beside an incomplete target is kept, an incomplete one removed
    paths.write_atomic(root / ".dst.old-1" / "DONE", "1")
    paths.write_atomic(root / ".dst.tmp-2" / "x", "partial")
    (root / "dst" / "DONE").unlink()
    assert paths.remove_leftovers(root / "dst", "DONE", "test") == [root / ".dst.tmp-2"]
    assert (root / ".dst.old-1" / "DONE").exists()

    blob = paths.as_path(gcs_bucket) / "blob.bin"
    blob.write_bytes(b"shard bytes")
    digest = hashlib.sha256(b"shard bytes").hexdigest()
    local = paths.local_copy(blob, digest)
    assert paths.is_local(local) and open(local, "rb").read() == b"shard bytes"
    assert paths.local_copy(blob, digest) == local  # cached
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        paths.local_copy(blob, "0" * 64)


def test_move_run_aside_on_object_store(gcs_bucket):
    workdir = paths.as_path(gcs_bucket) / "aside"
    paths.write_atomic(workdir / "checkpoints" / "5" / "commit_success.txt", "ok")
    paths.write_atomic(workdir / "metrics.jsonl", "{}\n")
    moved = move_run_aside(workdir)
    assert moved.startswith(f"{gcs_bucket}/aside/replaced-")
    assert sorted(_tree(workdir)) == sorted(f"{os.path.basename(moved)}/{name}" for name in
                                            ("checkpoints/5/commit_success.txt", "metrics.jsonl"))


def _rows(path):
    return [json.loads(line) for line in paths.as_path(path).read_text().splitlines()]


@pytest.mark.slow  # three runs on gs:// (make test-all); test_tpu_scripts trains on the fake bucket by default
def test_train_resume_and_export_on_gcs(gcs_bucket, tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("hello world\n\nsecond document\n" * 30)
    data, run = f"{gcs_bucket}/data", f"{gcs_bucket}/run"
    prepare_lib.prepare([str(text)], data, progress=False)
    shards = TokenShards(data)
    assert shards.num_documents == 31 and all(p.startswith(data) for p in shards.paths)

    config = tiny_train_config()
    config.model.vocab_size = shards.vocab_size
    config.data.update(sources=data, eval_examples=0)
    config.train.update(steps=10, checkpoint_every=5, keep_checkpoints=3, compiler_options=FAST_COMPILE,
                        compilation_cache_dir="", compilation_cache_min_secs=0.0)   # the workdir's
    loop.train(config, run)
    config.train.steps = 20
    result = loop.train(config, run)
    out = capsys.readouterr().out
    assert "no workdir lock" in out and "resumed from step 10" in out
    assert result.checkpoint_dir == f"{run}/checkpoints" and result.params_dir == f"{run}/params"

    root = paths.as_path(run)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "compilation_cache", "config.json",
                                                      "metrics.jsonl", "params", "tb"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["10", "15", "20"]
    assert len(list((root / "tb").iterdir())) == 2  # one events file per run
    rows = [r for r in _rows(root / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 21))

    hf = f"{gcs_bucket}/hf"
    assert export_checkpoint(f"{run}/params", hf) == hf
    assert not [p for p in paths.as_path(gcs_bucket).iterdir() if p.name.startswith(".hf.")]
    _, exported = load_hf(hf)
    _, trained = load_params(f"{run}/params")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported), jax.device_get(trained))


@pytest.mark.subprocess
@pytest.mark.slow  # gcsfs retries a refused connection for ~15 s before it gives up
def test_unreachable_endpoint_is_one_line(tmp_path):
    env = {**subprocess_env(), "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", "TENSORSTORE_GCS_HTTP_URL":
           "http://127.0.0.1:9", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    proc = subprocess.run([PYTHON, "-m", "ouro_jax.cli.export", "gs://ouro-test/params", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("ouro-export: error: ") and "127.0.0.1:9" in lines[0], lines[0]
