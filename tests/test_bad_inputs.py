"""Bad input to every CLI ends in one line on stderr and a non-zero exit, and loses no existing file.

Each case calls the CLI's `main` in-process (train: `ouro_jax.cli.train.main` after flag parsing);
a few train cases go through the real process to cover absl flag parsing.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest
from helpers import FAST_COMPILE, PYTHON, REPO, subprocess_env, tiny_train_config

from ouro_jax import params_io, paths
from ouro_jax.cli import eval as eval_cli
from ouro_jax.cli import export as export_cli
from ouro_jax.cli import generate as generate_cli
from ouro_jax.cli import prepare as prepare_cli
from ouro_jax.cli import train as train_cli
from ouro_jax.cli import upcycle as upcycle_cli
from ouro_jax.data import prepare as prepare_lib
from ouro_jax.hf import export as hf_export
from ouro_jax.hf.safetensors_io import SafetensorsFile, write_safetensors
from ouro_jax.model import init_params
from ouro_jax.params_io import CHECKSUM_FILE, export_checkpoint, save_params
from ouro_jax.train.background import WRITER_TIMEOUT_ENV
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
    _broken_weights(root, golden_dir, cfg)
    (root / "cwd").mkdir()  # the current directory of every case
    (root / "cwd" / "notes.txt").write_text("the user's own file")
    (root / "textdir").mkdir()
    (root / "textdir" / "a.txt").write_text("some text\n" * 10)
    return root


def _broken_weights(root, golden_dir, cfg):
    """HF directories whose weights are int32 or hold a NaN; params checkpoints with a NaN or flipped bytes."""
    source = SafetensorsFile(golden_dir / "model.safetensors")
    tensors = {k: np.array(source.get(k)) for k in source.keys()}
    first = sorted(tensors)[0]
    for name, edit in (("hf_int32", lambda t: t.astype(np.int32)), ("hf_nan", lambda t: np.where(
            np.arange(t.size).reshape(t.shape) == 0, np.nan, t).astype(t.dtype))):
        shutil.copytree(golden_dir, root / name)
        write_safetensors(root / name / "model.safetensors", [(k, edit(v) if k == first else v)
                                                               for k, v in sorted(tensors.items())])
    export_checkpoint(golden_dir, root / "hf_flipped")
    weights = root / "hf_flipped" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of the last tensor: still a valid float
    weights.write_bytes(bytes(data))
    params = jax.tree.map(np.array, init_params(cfg, jax.random.key(0)))
    params["lm_head"][0, 0] = np.nan
    save_params(root / "params_nan", cfg, params)
    shutil.copytree(root / "params", root / "params_flipped")
    biggest = max((p for p in (root / "params_flipped" / "params").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)  # the array data: flip one bit every 512 bytes of its middle
    data = bytearray(biggest.read_bytes())
    for i in range(len(data) // 4, 3 * len(data) // 4, 512):
        data[i] ^= 0x01
    biggest.write_bytes(bytes(data))
    shutil.copytree(root / "params", root / "params_wrong_sums")  # arrays that differ from what was saved
    sums = json.loads((root / "params_wrong_sums" / CHECKSUM_FILE).read_text())
    (root / "params_wrong_sums" / CHECKSUM_FILE).write_text(json.dumps({**sums, "lm_head": sums["lm_head"] ^ 1}))


def _snapshot(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _train(root, tmp_path, gs=None, **overrides):
    """ouro-train's main on the tiny config with `overrides` ('data.sources' -> config.data.sources)."""
    config = tiny_train_config()
    config.data.eval_examples = 0
    workdir = overrides.pop("workdir", str(tmp_path / "run"))
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        target = config[section] if section else config
        target[name] = value.format(root=root, gs=gs) if isinstance(value, str) else value
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
    ("upcycle-onto-source", "upcycle", ["{root}/params", "{root}/params"], "is the source"),
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
# Nothing lost: an output never replaces the current directory, a source or a folder above one, a training
# workdir, or a directory of another kind, --overwrite or not. Nothing silent: every value out of range is refused.
CASES += [
    ("export-into-current-dir", "export", ["{root}/hf", "", "--overwrite"], "current directory"),
    ("export-into-dot", "export", ["{root}/hf", ".", "--overwrite"], "current directory"),
    ("export-into-parent-of-cwd", "export", ["{root}/hf", "..", "--overwrite"], "current directory"),
    ("export-onto-source-params", "export", ["{root}/params", "{root}/params", "--overwrite"], "is the source"),
    ("export-onto-source-hf", "export", ["{root}/hf", "{root}/hf", "--overwrite"], "is the source"),
    ("export-into-source-parent", "export", ["{root}/workdir/params", "{root}/workdir", "--overwrite"],
     "is the source"),
    ("export-into-workdir", "export", ["{root}/hf", "{root}/workdir", "--overwrite"], "training workdir"),
    ("export-over-other-files", "export", ["{root}/hf", "{root}/export_out", "--overwrite"], "not an HF export"),
    ("export-over-params-checkpoint", "export", ["{root}/hf", "{root}/params", "--overwrite"], "not an HF export"),
    ("export-over-shards", "export", ["{root}/hf", "{root}/data", "--overwrite"], "not an HF export"),
    ("export-existing-export", "export", ["{root}/params", "{root}/hf"], "already holds an HF export"),
    ("export-nan-weights", "export", ["{root}/hf_nan", "{root}/out8"], "NaN"),
    ("export-int32-weights", "export", ["{root}/hf_int32", "{root}/out9"], "stored as int32"),
    ("export-params-nan", "export", ["{root}/params_nan", "{root}/out10"], "NaN"),
    # flipped bits fail the saved checksums or, where they hit compressed bytes, the restore itself
    ("export-params-flipped", "export", ["{root}/params_flipped", "{root}/out11"], "params_flipped: "),
    ("export-params-wrong-sums", "export", ["{root}/params_wrong_sums", "{root}/out14"],
     "do not match their saved checksums"),
    ("export-bad-dtype", "export", ["{root}/hf", "{root}/out12", "--dtype", "int8"], "--dtype"),
    ("upcycle-onto-source-overwrite", "upcycle", ["{root}/params", "{root}/params", "--overwrite"], "is the source"),
    ("upcycle-into-current-dir", "upcycle", ["{root}/params", "", "--overwrite"], "current directory"),
    ("upcycle-into-workdir", "upcycle", ["{root}/hf", "{root}/workdir", "--overwrite"], "training workdir"),
    ("upcycle-over-hf-export", "upcycle", ["{root}/params", "{root}/hf", "--overwrite"], "not a params checkpoint"),
    ("upcycle-over-other-files", "upcycle", ["{root}/params", "{root}/export_out", "--overwrite"],
     "not a params checkpoint"),
    ("upcycle-existing-params", "upcycle", ["{root}/hf", "{root}/params"], "pass --overwrite"),
    ("upcycle-into-source-parent", "upcycle", ["{root}/workdir/params", "{root}/workdir", "--overwrite"],
     "is the source"),
    ("upcycle-negative-repeats", "upcycle", ["{root}/params", "{root}/up4", "--repeats", "-3"], "repeats"),
    ("upcycle-nan-weights", "upcycle", ["{root}/hf_nan", "{root}/up5"], "NaN"),
    ("prepare-into-current-dir", "prepare", ["{root}/text.txt", "--output", "", "--overwrite"], "current directory"),
    ("prepare-into-input-parent", "prepare", ["{root}/textdir/a.txt", "--output", "{root}/textdir", "--overwrite"],
     "is the source"),
    ("prepare-onto-input-dir", "prepare", ["{root}/textdir", "--output", "{root}/textdir"], "is the source"),
    ("prepare-into-workdir", "prepare", ["{root}/text.txt", "--output", "{root}/workdir", "--overwrite"],
     "training workdir"),
    ("generate-threshold-above-one", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--exit-threshold",
                                                  "1.5"], "exit_threshold must be a finite number in [0, 1]"),
    ("generate-threshold-nan", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--exit-threshold", "nan"],
     "exit_threshold must be a finite number in [0, 1], got nan"),
    ("generate-threshold-negative", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--exit-threshold",
                                                 "-0.1"], "exit_threshold"),
    ("generate-id-equal-vocab", "generate", ["--model", "{root}/hf", "--prompt-ids", "1,128"],
     "outside the vocabulary [0, 128): [128]"),
    ("generate-negative-id", "generate", ["--model", "{root}/hf", "--prompt-ids", "-1"],
     "outside the vocabulary [0, 128): [-1]"),
    ("generate-stop-id-out-of-range", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--stop-ids", "999"],
     "stop_token_ids has token ids outside the vocabulary"),
    ("generate-zero-depth", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--depth", "0"],
     "depth must be an integer >= 1"),
    ("generate-negative-temperature", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--temperature", "-1"],
     "temperature"),
    ("generate-nan-temperature", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--temperature", "nan"],
     "temperature"),
    ("generate-zero-top-p", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--top-p", "0"], "top_p"),
    ("generate-top-p-above-one", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--top-p", "1.5"], "top_p"),
    ("generate-negative-top-k", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--top-k", "-2"], "top_k"),
    ("generate-zero-new-tokens", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--max-new-tokens", "0"],
     "--max-new-tokens must be an integer >= 1"),
    ("generate-beyond-positions", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--max-new-tokens",
                                               "1000"], "prompt + --max-new-tokens (1001) exceeds the model's "
                                                        "max_position_embeddings (512)"),
    ("generate-draft-deeper-than-depth", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--draft-tokens",
                                                      "2", "--draft-depth", "9"], "draft_depth"),
    ("generate-bad-dtype", "generate", ["--model", "{root}/hf", "--prompt-ids", "1", "--dtype", "int8"], "--dtype"),
    ("generate-int32-weights", "generate", ["--model", "{root}/hf_int32", "--prompt-ids", "1"], "stored as int32"),
    ("generate-nan-weights", "generate", ["--model", "{root}/hf_nan", "--prompt-ids", "1"], "NaN"),
    ("generate-params-flipped", "generate", ["--model", "{root}/params_flipped", "--prompt-ids", "1"],
     "params_flipped: "),
    ("generate-export-flipped", "generate", ["--model", "{root}/hf_flipped", "--prompt-ids", "1"],
     "does not match its SHA-256"),
    ("export-from-flipped-export", "export", ["{root}/hf_flipped", "{root}/out13"], "does not match its SHA-256"),
    ("generate-params-nan", "generate", ["--model", "{root}/params_nan", "--prompt-ids", "1"], "NaN"),
    ("eval-nan-threshold", "eval", ["{root}/hf", "--task", "mano", "--thresholds", "0.5,nan"], "got nan"),
    ("eval-negative-threshold", "eval", ["{root}/hf", "--task", "mano", "--thresholds", "-0.5"], "[0, 1]"),
    ("eval-negative-max-tokens", "eval", ["{root}/hf", "--text", "{root}/text.txt", "--max-tokens", "-1"],
     "max_tokens must be an integer >= 1"),
    ("eval-seq-len-beyond-positions", "eval", ["{root}/hf", "--text", "{root}/text.txt", "--seq-len", "100000"],
     "exceeds the model's max_position_embeddings (512)"),
    ("eval-batch-does-not-fit", "eval", ["{root}/hf", "--text", "{root}/text.txt", "--batch-size", "100000000"],
     "does not fit: needs"),
    ("eval-bad-dtype", "eval", ["{root}/hf", "--task", "mano", "--dtype", "int8"], "--dtype"),
    ("eval-gate-from-unrelated-model", "eval", ["{root}/hf", "--task", "mano", "--gate-from", "{root}/params"],
     "not a gate trained on this model"),
    ("eval-zero-batch-size", "eval", ["{root}/hf", "--task", "mano", "--batch-size", "0"], "--batch-size"),
    ("eval-int32-weights", "eval", ["{root}/hf_int32", "--task", "mano"], "stored as int32"),
    ("eval-params-flipped", "eval", ["{root}/params_flipped", "--task", "mano"], "params_flipped: "),
    ("eval-params-wrong-sums", "eval", ["{root}/params_wrong_sums", "--task", "mano"], "saved checksums"),
]
MAINS = {"generate": generate_cli.main, "export": export_cli.main, "prepare": prepare_cli.main,
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
    ("train-nan-lr", dict(optim__peak_lr=float("nan")), "optim.peak_lr must be a finite number"),
    ("train-huge-lr", dict(optim__peak_lr=1e40), "optim.peak_lr must be a finite number"),
    ("train-bad-b2", dict(optim__b2=1.0), "optim.b2"),
    ("train-unknown-decay", dict(optim__decay="cosin"), "unknown optim.decay"),
    ("train-missing-gs-data", dict(data__sources="{gs}/nope"), "'gs://ouro-test/nope' is neither a prepared directory"),
    ("train-workdir-in-missing-bucket", dict(workdir="gs://ouro-no-such-bucket/run"),
     "bucket gs://ouro-no-such-bucket does not exist"),
    ("train-negative-beta", dict(loss__beta=-1.0), "loss.beta must be a finite number in [0, inf)"),
    ("train-nan-beta", dict(loss__beta=float("nan")), "loss.beta"),
    ("train-negative-final-beta", dict(loss__beta_final=-0.5), "loss.beta_final"),
    ("train-seq-len-beyond-positions", dict(model__max_position_embeddings=8),
     "data.seq_len (16) exceeds the model's max_position_embeddings (8)"),
    ("train-stage2-without-init-from", dict(loss__objective="stage2"), "set init_from"),
    ("train-unknown-objective", dict(loss__objective="stage3"), "unknown loss.objective 'stage3'"),
    ("train-zero-ce-chunk", dict(train__ce_chunk_size=0), "train.ce_chunk_size must be an integer >= 1"),
    ("train-zero-batch", dict(data__batch_size=0), "data.batch_size must be an integer >= 1"),
    ("train-zero-grad-accum", dict(train__grad_accum=0), "train.grad_accum"),
    ("train-threshold-above-one", dict(model__early_exit_threshold=1.5), "early_exit_threshold"),
    ("train-absurd-batch", dict(data__batch_size=2**34), "does not fit: needs"),
    ("train-init-from-nan-weights", dict(init_from="{root}/hf_nan"), "NaN"),
    ("train-init-from-int32-weights", dict(init_from="{root}/hf_int32"), "stored as int32"),
    ("train-init-from-flipped-params", dict(init_from="{root}/params_flipped"), "params_flipped: "),
    ("train-init-from-wrong-sums", dict(init_from="{root}/params_wrong_sums"), "saved checksums"),
    ("train-carry-from-params", dict(init_from="{root}/params", train__carry_optimizer=True),
     "holds params only, no optimizer state"),
    ("train-batch-ramp-not-multiple", dict(data__batch_ramp="2:12"), "must be a multiple of data.batch_size (8)"),
    ("train-negative-schedule-offset", dict(optim__schedule_offset=-1), "optim.schedule_offset must be an integer"),
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
def test_cli_bad_input(env, request, capsys, monkeypatch, name, cli, args, text):
    monkeypatch.chdir(env / "cwd")
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


# One process per case (~4 s of imports each). nan-lr runs in make test-all only: train-nan-lr above reaches
# its message in-process; the config-file cases have no in-process twin and stay in the default suite.
@pytest.mark.subprocess
@pytest.mark.parametrize("args,text", [
    (["--config", "nope.py", "--workdir", "W"], "nope.py"),
    (["--config", "configs/tiny.py", "--workdir", "W", "--config.mesh.data=64"], "needs 64 devices"),
    pytest.param(["--config", "configs/tiny.py", "--workdir", "W", "--config.optim.peak_lr=nan"], "optim.peak_lr",
                 marks=pytest.mark.slow, id="nan-lr"),
    (["--config", "configs/tiny.py", "--workdir", "W", "--config.model.total_ut_steps=2.7"], "total_ut_steps"),
    (["--config", "configs/ouro_1p4b.py:stage9", "--workdir", "W"], "unknown stage 'stage9'"),
], ids=["missing-config-file", "mesh-too-large", "nan-lr", "fractional-steps", "unknown-stage"])
def test_train_command_line(tmp_path, args, text):
    args = [str(tmp_path / "w") if a == "W" else a for a in args]
    proc = subprocess.run([PYTHON, "-m", "ouro_jax.cli.train", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ouro-train")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and text in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


# ---- a resumed run must keep its config ---------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run of the tiny config (a checkpoint at step 2); cases copy it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train_cli.main(_resume_config(), str(workdir))
    return workdir


def _resume_config(**changes):
    config = tiny_train_config()
    config.data.eval_examples = 0
    config.train.update(steps=2, checkpoint_every=2, export_params=False, compiler_options=FAST_COMPILE)
    config.optim.update(warmup_steps=1, decay_steps=1)
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


RESUME_CASES = [
    ("changed-depth", dict(model__total_ut_steps=4), "model.total_ut_steps 3 -> 4"),
    ("changed-batch", dict(data__batch_size=16), "data.batch_size 8 -> 16"),
    ("changed-seq-len", dict(data__seq_len=32), "data.seq_len 16 -> 32"),
    ("changed-sources", dict(data__sources="mano:max_len=4"), "data.sources"),
    ("changed-objective", dict(loss__objective="last_step"), "loss.objective 'stage1' -> 'last_step'"),
    ("changed-two-fields", dict(data__seq_len=32, data__seed=5), "data.seq_len 16 -> 32, data.seed 0 -> 5"),
    ("allowed-one-of-two", dict(data__seq_len=32, data__seed=5, train__allow_changes="data.seed"),
     "allow_changes=data.seq_len"),
]


@pytest.mark.parametrize("name,changes,text", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_with_a_changed_config_is_refused(finished_run, tmp_path, capsys, name, changes, text):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    before = _snapshot(workdir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(_resume_config(**changes), str(workdir))
    _expect_one_line(capsys, exit_info, text, {p: d for p, d in before.items() if not p.endswith(".lock")}, workdir)


def test_resume_with_allowed_changes_goes_on(finished_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    train_cli.main(_resume_config(train__steps=3, data__seed=5, train__allow_changes="data.seed"), str(workdir))
    assert "resumed from step 2" in capsys.readouterr().out
    assert json.loads((workdir / "config.json").read_text())["data"]["seed"] == 5
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]


# ---- full and read-only filesystems, stuck writers: bounded, one line, nothing left behind -------------

@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A directory on a 64 KiB tmpfs (where mounting is allowed), else one whose writes raise ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        _inject_write_error(monkeypatch, mount, errno.ENOSPC)
        yield mount
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory on a read-only bind mount (root ignores permission bits), else one whose writes raise EROFS."""
    target, source = tmp_path / "ro", tmp_path / "ro_source"
    target.mkdir()
    source.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True).returncode:
        _inject_write_error(monkeypatch, target, errno.EROFS)
        yield target
        return
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def _inject_write_error(monkeypatch, directory, code):
    """Where mounting is not allowed: temporary directories and small files under `directory` fail with `code`."""
    def under(path):
        return os.path.realpath(path).startswith(os.path.realpath(directory))

    def error():
        return OSError(code, os.strerror(code), str(directory))

    def temp_dir(original):
        return lambda parent, prefix: (_ for _ in ()).throw(error()) if under(parent) else original(parent, prefix)

    for module in (paths, params_io, hf_export):
        monkeypatch.setattr(module, "make_temp_dir", temp_dir(paths.make_temp_dir))
    write_text = type(paths.as_path(directory)).write_text

    def text(self, *args, **kwargs):
        if under(self):
            raise error()
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(type(paths.as_path(directory)), "write_text", text)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def _run_within(seconds, fn, *args):
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        fn(*args)
    assert time.monotonic() - started < seconds
    return exit_info


def test_export_into_a_full_disk(env, small_disk, capsys):
    (small_disk / "old").mkdir()
    (small_disk / "old" / "keep.txt").write_text("kept")
    before = _snapshot(env)
    exit_info = _run_within(60, export_cli.main, [str(env / "hf"), str(small_disk / "out")])
    # names the file being written
    _expect_one_line(capsys, exit_info, f"No space left on device: '{small_disk}/.out.tmp-", before, env)
    assert _leftovers(small_disk) == ["old"] and (small_disk / "old" / "keep.txt").read_text() == "kept"


def test_prepare_into_a_full_disk(env, small_disk, capsys, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("a paragraph of text\n\n" * 20000)
    before = _snapshot(env)
    exit_info = _run_within(60, prepare_cli.main, [str(big), "--output", str(small_disk / "d"), "--no-progress"])
    _expect_one_line(capsys, exit_info, "No space left on device", before, env)
    assert _leftovers(small_disk) == []


def test_upcycle_into_a_full_disk(env, small_disk, capsys):
    before = _snapshot(env)
    exit_info = _run_within(60, upcycle_cli.main, [str(env / "hf"), str(small_disk / "up"), "--repeats", "4"])
    _expect_one_line(capsys, exit_info, "No space left on device", before, env)
    assert _leftovers(small_disk) == []


def test_export_into_a_read_only_directory(env, read_only_dir, capsys):
    before = _snapshot(env)
    exit_info = _run_within(60, export_cli.main, [str(env / "hf"), str(read_only_dir / "out")])
    _expect_one_line(capsys, exit_info, "Read-only file system", before, env)


def test_train_with_read_only_checkpoints(env, tmp_path, read_only_dir, capsys):
    (tmp_path / "run").mkdir()
    os.symlink(read_only_dir, tmp_path / "run" / "checkpoints")
    before = _snapshot(env)
    exit_info = _run_within(60, _train, env, tmp_path, None)
    _expect_one_line(capsys, exit_info, "checkpoints: not writable (Read-only file system)", before, env)


def test_train_into_a_full_disk(env, small_disk, capsys):
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:  # fill it
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    before = _snapshot(env)
    exit_info = _run_within(60, lambda: _train(env, small_disk, None, workdir=str(small_disk / "run")))
    _expect_one_line(capsys, exit_info, "No space left on device", before, env)


def test_a_stuck_tensorboard_writer_ends_the_run_in_bounded_time(env, tmp_path, capsys, monkeypatch):
    """The event file cannot be written (a full disk): tensorboardX's thread dies and its queue blocks
    forever; the run still ends within the writer timeout, its checkpoint saved, with one line."""
    from tensorboardX import event_file_writer

    first_event = event_file_writer.EventsWriter.write_event
    written = []

    def disk_full(self, event):  # the file-version event at the writer's start goes through, then the disk is full
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(event)
        return first_event(self, event)

    monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", disk_full)
    monkeypatch.setenv(WRITER_TIMEOUT_ENV, "2")
    exit_info = _run_within(60, lambda: _train(env, tmp_path, None, train__steps=4, train__checkpoint_every=4,
                                               train__export_params=False, optim__warmup_steps=1,
                                               optim__decay_steps=1, train__compiler_options=FAST_COMPILE))
    _expect_one_line(capsys, exit_info, "tb: TensorBoard writer made no progress for 2 s", {}, env)
    assert "4" in os.listdir(tmp_path / "run" / "checkpoints")


# ---- every documented --dtype runs ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_dtype(env, capsys, dtype):
    assert eval_cli.main([str(env / "hf"), "--task", "mano:max_len=3", "--num-examples", "8", "--batch-size", "8",
                          "--thresholds", "0.5", "--dtype", dtype, "--no-progress"]) == 0
    assert "step 4: accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generate_dtype(env, dtype):
    result = generate_cli.main(["--model", str(env / "hf"), "--prompt-ids", "1,2,3", "--max-new-tokens", "3",
                                "--dtype", dtype, "--no-stream"])
    assert result.tokens.shape == (1, 3)
