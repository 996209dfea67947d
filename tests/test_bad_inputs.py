"""Bad input to every CLI ends in one line on stderr and a non-zero exit, and loses no existing file.

Each case calls the CLI's `main` in-process (train: `ouro_jax.cli.train.main` after flag parsing);
a few train cases go through the real process to cover absl flag parsing.
"""

import hashlib
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from helpers import PYTHON, REPO, subprocess_env, tiny_train_config

from ouro_jax.cli import eval as eval_cli
from ouro_jax.cli import export as export_cli
from ouro_jax.cli import generate as generate_cli
from ouro_jax.cli import prepare as prepare_cli
from ouro_jax.cli import train as train_cli
from ouro_jax.cli import upcycle as upcycle_cli
from ouro_jax.data import prepare as prepare_lib
from ouro_jax.model import init_params
from ouro_jax.params_io import save_params
from ouro_jax.train.config import model_config
from ouro_jax.train.workdir import WorkdirLock


@pytest.fixture(scope="module")
def env(tmp_path_factory, golden_dir):
    """A tree of good and broken inputs shared by every case (cases must not change it)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    hf = root / "hf"
    shutil.copytree(golden_dir, hf)
    for name, edit in (("hf_str_hidden", lambda c: c.update(hidden_size="64")), ("hf_bad_json", None)):
        shutil.copytree(golden_dir, root / name)
        if edit is None:
            (root / name / "config.json").write_text("{not json")
        else:
            config = json.loads((root / name / "config.json").read_text())
            edit(config)
            (root / name / "config.json").write_text(json.dumps(config))
    shutil.copytree(golden_dir, root / "hf_truncated")
    weights = root / "hf_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = model_config(tiny_train_config())
    save_params(root / "params", cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0))))
    shutil.copytree(root / "params", root / "params_truncated")
    biggest = max((p for p in (root / "params_truncated" / "params").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:10])
    workdir = root / "workdir"
    shutil.copytree(root / "params", workdir / "params")
    (workdir / "checkpoints").mkdir()
    (root / "emptyrun" / "checkpoints").mkdir(parents=True)  # a run that has not saved a step yet
    (root / "text.txt").write_text("hello world\n\nsecond document\n" * 20)
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    (root / "empty").mkdir()
    (root / "export_out").mkdir()
    (root / "export_out" / "keep.txt").write_text("existing export")
    (root / "a_file").write_text("a file, not a directory")
    prepare_lib.prepare([str(root / "text.txt")], root / "data", progress=False)
    shutil.copytree(root / "data", root / "data_truncated")
    shard = root / "data_truncated" / "shard-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:50])
    shutil.copytree(root / "data", root / "data_no_manifest")
    (root / "data_no_manifest" / "manifest.json").unlink()
    return root


def _snapshot(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _train(root, tmp_path, gs=None, **overrides):
    """ouro-train's main on the tiny config with `overrides` ('data.sources' -> config.data.sources)."""
    config = tiny_train_config()
    config.data.eval_examples = 0
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        target = config[section] if section else config
        target[name] = value.format(root=root, gs=gs) if isinstance(value, str) else value
    workdir = overrides.get("workdir", str(tmp_path / "run"))
    train_cli.main(config, workdir.format(root=root, gs=gs) if isinstance(workdir, str) else workdir)


def _gcs_bucket(request, case):
    """The local fake GCS bucket for cases on gs:// paths (None for the others)."""
    return request.getfixturevalue("gcs_bucket") if "{gs}" in str(case) or "gs://" in str(case) else None


# (name, CLI, arguments with {root}, text the one line must contain)
CASES = [
    ("generate-missing-model", "generate", ["--model", "{root}/nope", "--prompt-ids", "1"], "no such directory"),
    ("generate-empty-dir", "generate", ["--model", "{root}/empty", "--prompt-ids", "1"], "neither an HF Ouro"),
    ("generate-workdir", "generate", ["--model", "{root}/emptyrun", "--prompt-ids", "1"], "without a finalized step"),
    ("generate-str-hidden-size", "generate", ["--model", "{root}/hf_str_hidden", "--prompt-ids", "1"], "hidden_size"),
    ("generate-bad-config-json", "generate", ["--model", "{root}/hf_bad_json", "--prompt-ids", "1"], "config.json"),
    ("generate-truncated-safetensors", "generate", ["--model", "{root}/hf_truncated", "--prompt-ids", "1"],
     "model.safetensors"),
    ("generate-truncated-params", "generate", ["--model", "{root}/params_truncated", "--prompt-ids", "1"],
     "cannot restore params"),
    ("generate-hub-id-offline", "generate", ["--model", "ByteDance/Ouro-1.4B", "--prompt-ids", "1"],
     "no such directory"),
    ("generate-bad-ids", "generate", ["--model", "{root}/hf", "--prompt-ids", "1,x"], "--prompt-ids must be integers"),
    ("generate-bad-policy", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--policy", "x"],
     "unknown --policy 'x'"),
    ("generate-missing-tokenizer", "generate", ["--model", "{root}/hf", "--prompt", "hi", "--tokenizer",
                                                "{root}/nope.json"], "nope.json"),
    ("generate-bad-int-flag", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--max-new-tokens", "x"],
     "--max-new-tokens"),
    ("generate-no-prompt", "generate", ["--model", "{root}/hf"], "--prompt"),
    ("export-missing", "export", ["{root}/nope", "{root}/out"], "no such directory"),
    ("export-existing-target", "export", ["{root}/hf", "{root}/export_out"], "--overwrite"),
    ("export-target-is-file", "export", ["{root}/hf", "{root}/a_file", "--overwrite"], "not a directory"),
    ("export-bad-shard-size", "export", ["{root}/hf", "{root}/out2", "--max-shard-size", "5XB"], "5XB"),
    ("export-bad-config", "export", ["{root}/hf_bad_json", "{root}/out3"], "config.json"),
    ("export-truncated-params", "export", ["{root}/params_truncated", "{root}/out4"], "cannot restore params"),
    ("export-hub-id-offline", "export", ["ByteDance/Ouro-2.6B", "{root}/out5"], "no such directory"),
    ("prepare-missing-input", "prepare", ["{root}/nope.txt", "--output", "{root}/o1"], "no such file"),
    ("prepare-existing-output", "prepare", ["{root}/text.txt", "--output", "{root}/data"], "--overwrite"),
    ("prepare-output-is-file", "prepare", ["{root}/text.txt", "--output", "{root}/a_file"], "not a directory"),
    ("prepare-bad-jsonl", "prepare", ["{root}/bad.jsonl", "--output", "{root}/o2"], "bad.jsonl:2: invalid JSON"),
    ("prepare-bad-tokenizer", "prepare", ["{root}/text.txt", "--output", "{root}/o3", "--tokenizer", "{root}/nope"],
     "nope"),
    ("prepare-empty-dir", "prepare", ["{root}/empty", "--output", "{root}/o4"], "no files of a known type"),
    ("prepare-zero-shard-tokens", "prepare", ["{root}/text.txt", "--output", "{root}/o5", "--max-shard-tokens", "0"],
     "max_shard_tokens"),
    ("upcycle-missing", "upcycle", ["{root}/nope", "{root}/up"], "no such directory"),
    ("upcycle-existing-destination", "upcycle", ["{root}/params", "{root}/params"], "--overwrite"),
    ("upcycle-zero-repeats", "upcycle", ["{root}/params", "{root}/up2", "--repeats", "0"], "repeats"),
    ("upcycle-truncated", "upcycle", ["{root}/params_truncated", "{root}/up3"], "cannot restore params"),
    ("eval-missing-model", "eval", ["{root}/nope", "--task", "mano"], "nope"),
    ("eval-text-missing", "eval", ["{root}/hf", "--text", "{root}/nope.txt"], "nope.txt"),
    ("eval-truncated-shard", "eval", ["{root}/hf", "--text", "{root}/data_truncated"], "shard-00000.array_record"),
    ("eval-shards-without-manifest", "eval", ["{root}/hf", "--text", "{root}/data_no_manifest"], "data_no_manifest"),
    ("eval-unknown-task", "eval", ["{root}/hf", "--task", "nosuchtask"], "nosuchtask"),
    ("eval-zero-steps", "eval", ["{root}/hf", "--task", "mano", "--num-steps", "0"], "--num-steps must be >= 1"),
    ("eval-bad-thresholds", "eval", ["{root}/hf", "--thresholds", "2"], "[0, 1]"),
    ("eval-truncated-params", "eval", ["{root}/params_truncated", "--task", "mano"], "cannot restore params"),
    # on the local fake GCS server: {gs} is its bucket; gs://ouro-no-such-bucket does not exist
    ("export-missing-gs-checkpoint", "export", ["{gs}/nope", "{root}/out7"], "gs://ouro-test/nope: no such directory"),
    ("export-to-missing-bucket", "export", ["{root}/hf", "gs://ouro-no-such-bucket/out"],
     "bucket gs://ouro-no-such-bucket does not exist"),
    ("prepare-missing-gs-input", "prepare", ["{gs}/nope.txt", "--output", "{root}/o6"],
     "gs://ouro-test/nope.txt: no such file"),
    ("prepare-to-missing-bucket", "prepare", ["{root}/text.txt", "--output", "gs://ouro-no-such-bucket/d"],
     "bucket gs://ouro-no-such-bucket does not exist"),
    ("eval-missing-gs-text", "eval", ["{root}/hf", "--text", "{gs}/nope.txt"], "gs://ouro-test/nope.txt: no such file"),
]
MAINS = {"generate": generate_cli.run, "export": export_cli.main, "prepare": prepare_cli.main,
         "upcycle": upcycle_cli.main, "eval": eval_cli.main}

TRAIN_CASES = [
    ("train-batch-not-divisible", dict(data__batch_size=5), "not divisible"),
    ("train-mesh-too-large", dict(mesh__data=16), "needs 16 devices"),
    ("train-missing-data-dir", dict(data__sources="{root}/nope"), "nope"),
    ("train-empty-data-dir", dict(data__sources="{root}/empty"), "manifest.json"),
    ("train-truncated-shard", dict(data__sources="{root}/data_truncated"), "shard-00000.array_record"),
    ("train-bad-init-from", dict(init_from="{root}/nope"), "no such directory"),
    ("train-init-from-workdir", dict(init_from="{root}/emptyrun"), "without a finalized step"),
    ("train-workdir-is-file", dict(workdir="{root}/a_file"), "a_file"),
    ("train-vocab-mismatch", dict(data__sources="{root}/data"), "vocab_size"),
    ("train-nan-lr", dict(optim__peak_lr=float("nan")), "optim.peak_lr must be finite"),
    ("train-huge-lr", dict(optim__peak_lr=1e40), "optim.peak_lr must be finite"),
    ("train-bad-b2", dict(optim__b2=1.0), "optim.b2"),
    ("train-unknown-decay", dict(optim__decay="cosin"), "optim.decay must be one of"),
    ("train-missing-gs-data", dict(data__sources="{gs}/nope"), "'gs://ouro-test/nope' is neither a prepared directory"),
    ("train-workdir-in-missing-bucket", dict(workdir="gs://ouro-no-such-bucket/run"),
     "bucket gs://ouro-no-such-bucket does not exist"),
]


def _expect_one_line(capsys, exit_info, text, before, root):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code not in (0, None), err
    assert "Traceback" not in err and len(lines) == 1, err
    assert text in lines[0], lines[0]
    after = _snapshot(root)
    assert all(after.get(path) == digest for path, digest in before.items()), "an existing file was lost or changed"


@pytest.mark.parametrize("name,cli,args,text", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input(env, request, capsys, name, cli, args, text):
    gs = _gcs_bucket(request, args)
    before = _snapshot(env)
    with pytest.raises(SystemExit) as exit_info:
        args = [a.format(root=env, gs=gs) for a in args]
        MAINS[cli](args + (["--no-progress"] if cli in ("prepare", "eval") else []))
    _expect_one_line(capsys, exit_info, text, before, env)


@pytest.mark.parametrize("name,overrides,text", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(env, request, tmp_path, capsys, name, overrides, text):
    gs = _gcs_bucket(request, overrides)
    before = _snapshot(env)
    with pytest.raises(SystemExit) as exit_info:
        _train(env, tmp_path, gs=gs, **overrides)
    _expect_one_line(capsys, exit_info, text, before, env)


def test_train_locked_workdir(env, tmp_path, capsys):
    with WorkdirLock(str(tmp_path / "run")):
        with pytest.raises(SystemExit) as exit_info:
            _train(env, tmp_path)
    _expect_one_line(capsys, exit_info, "in use by another training run", {}, env)


@pytest.mark.subprocess
@pytest.mark.parametrize("args,text", [
    (["--config", "nope.py", "--workdir", "W"], "nope.py"),
    (["--config", "configs/tiny.py", "--workdir", "W", "--config.mesh.data=64"], "needs 64 devices"),
    (["--config", "configs/tiny.py", "--workdir", "W", "--config.optim.peak_lr=nan"], "optim.peak_lr"),
], ids=["missing-config-file", "mesh-too-large", "nan-lr"])
def test_train_command_line(tmp_path, args, text):
    args = [str(tmp_path / "w") if a == "W" else a for a in args]
    proc = subprocess.run([PYTHON, "-m", "ouro_jax.cli.train", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ouro-train")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and text in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
