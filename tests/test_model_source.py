"""One resolver for every tool: HF directories, params checkpoints, training workdirs and their steps, hub ids
(from a pre-populated offline cache), local or gs://."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from helpers import golden_with_tokenizer

from ouro_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from ouro_jax.errors import CheckpointError
from ouro_jax.model_source import model_tokenizer, resolve_model
from ouro_jax.params_io import export_checkpoint, load_model, load_model_config, save_params
from ouro_jax.train.checkpointer import TrainCheckpointer
from ouro_jax.train.config import base_config, model_fields
from ouro_jax.train.step import TrainState

HUB_ID = "ouro-test/tiny-golden"


def _shifted(params, delta):
    return jax.tree.map(lambda x: np.asarray(x) + np.asarray(delta, x.dtype), params)


def write_workdir(workdir: pathlib.Path, cfg, params, steps=(10, 20)) -> dict[int, dict]:
    """A training workdir as `ouro-train` leaves it: config.json and finalized steps holding a TrainState
    (params + optimizer state); step s holds params + s/1000. Returns each step's params."""
    config = base_config()
    config.model = model_fields(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=2))
    checkpointer = TrainCheckpointer(workdir / "checkpoints", save_every=1, keep=None, async_save=False)
    saved = {}
    for step in steps:
        saved[step] = _shifted(params, step / 1000)
        zero = np.zeros((), np.int32)
        state = TrainState(np.int32(step), saved[step], optax.adam(1e-3).init(saved[step]), zero, zero)
        checkpointer.save(step, state, force=True)
    checkpointer.wait()
    checkpointer.close()
    return saved


def hub_cache(hf_home: pathlib.Path, repo_id: str, source: pathlib.Path) -> None:
    """Lays `source` out in HF_HOME as huggingface_hub caches a downloaded snapshot of `repo_id`."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def golden_loaded(golden_dir):
    return load_model(golden_dir)


@pytest.fixture(scope="module")
def workdir(golden_loaded, tmp_path_factory):
    cfg, params = golden_loaded
    directory = tmp_path_factory.mktemp("run") / "workdir"
    return directory, write_workdir(directory, cfg, params)


def test_every_local_kind_resolves_and_loads(golden_dir, golden_loaded, workdir, tmp_path):
    cfg, params = golden_loaded
    assert resolve_model(golden_dir).kind == "hf"
    save_params(tmp_path / "ours", cfg, params)
    assert resolve_model(tmp_path / "ours").kind == "params"
    _same(load_model(tmp_path / "ours")[1], params)

    directory, saved = workdir
    newest = resolve_model(directory)
    assert (newest.kind, newest.step, newest.workdir) == ("train_step", 20, directory)
    for spec, step in [(directory, 20), (directory / "checkpoints" / "10", 10)]:
        step_cfg, step_params = load_model(spec)
        assert step_cfg.to_dict() == cfg.to_dict()
        _same(step_params, saved[step])
    assert load_model_config(directory / "checkpoints" / "10").to_dict() == cfg.to_dict()


def test_bad_specs_are_one_line_errors(workdir, tmp_path):
    directory, _ = workdir
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for spec, message in [(tmp_path / "empty", "neither an HF Ouro directory"), (tmp_path / "file", "not a directory"),
                          ("./no/such", "no such directory")]:
        with pytest.raises(CheckpointError, match=message):
            resolve_model(spec)
    torn = tmp_path / "torn"
    shutil.copytree(directory, torn)
    os.remove(torn / "config.json")
    with pytest.raises(CheckpointError, match="training config of this run is missing"):
        load_model(torn)


@pytest.fixture
def offline_hub(golden_dir, tmp_path, monkeypatch):
    """An offline huggingface_hub whose cache holds HUB_ID (the golden model with a tokenizer)."""
    from huggingface_hub import constants

    hub_cache(tmp_path / "hf_home", HUB_ID, golden_with_tokenizer(golden_dir, tmp_path / "golden"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "golden"


def test_hub_id_from_the_offline_cache(offline_hub, golden_loaded, workdir, capsys):
    source = resolve_model(HUB_ID)
    assert source.kind == "hf" and (source.tokenizer_dir / "tokenizer.json").is_file()
    _same(load_model(HUB_ID)[1], golden_loaded[1])
    with pytest.raises(CheckpointError) as e:
        resolve_model("ouro-test/not-cached")
    assert "not in the Hugging Face cache" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    from ouro_jax.cli import generate as generate_cli

    result = generate_cli.main(["--model", str(workdir[0] / "checkpoints" / "10"), "--prompt-ids", "1,5,9",
                                "--max-new-tokens", "2", "--no-stream"])
    assert result.tokens.shape == (1, 2) and "2 tokens" in capsys.readouterr().out


@pytest.mark.slow  # six CLI processes (~1 min alone); the fast tests above cover the same resolver in-process
@pytest.mark.subprocess
def test_every_tool_reads_a_training_step_and_a_cached_hub_id(golden_dir, workdir, tmp_path):
    """ouro-generate, ouro-eval, ouro-export and ouro-upcycle on a training run or step and on an offline-cached
    hub id; an uncached id offline is one line."""
    directory, _ = workdir
    hf_home = tmp_path / "hf_home"
    hub_cache(hf_home, HUB_ID, golden_with_tokenizer(golden_dir, tmp_path / "golden"))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    bin_dir = pathlib.Path(sys.executable).parent

    def run(*argv):
        return subprocess.run([str(bin_dir / argv[0]), *map(str, argv[1:])], capture_output=True, text=True,
                              env=env, timeout=300)

    for model in (directory / "checkpoints" / "10", HUB_ID):
        proc = run("ouro-generate", "--model", model, "--prompt-ids", "1,5,9", "--max-new-tokens", "2")
        assert proc.returncode == 0 and "2 tokens" in proc.stdout, proc.stderr[-1500:]
    proc = run("ouro-eval", directory, "--task", "mano:max_len=2,modulus=5", "--num-examples", "8", "--no-progress")
    assert proc.returncode == 0 and "step 1: accuracy" in proc.stdout, proc.stderr[-1500:]
    proc = run("ouro-export", directory, tmp_path / "export", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert resolve_model(tmp_path / "export").kind == "hf"
    proc = run("ouro-upcycle", HUB_ID, tmp_path / "up")
    assert proc.returncode == 0 and load_model_config(tmp_path / "up").num_hidden_layers == 2 * load_model_config(
        golden_dir).num_hidden_layers, proc.stderr[-1500:]
    proc = run("ouro-generate", "--model", "ouro-test/not-cached", "--prompt-ids", "1", "--max-new-tokens", "1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "not in the Hugging Face cache" in lines[0], proc.stderr


def test_gcs_workdir_step(golden_loaded, gcs_bucket, tmp_path):
    """A training workdir on gs:// resolves to its newest step and exports like a local one."""
    cfg, params = golden_loaded
    local = tmp_path / "run"
    saved = write_workdir(local, cfg, params, steps=(5,))
    remote = f"{gcs_bucket}/runs/{tmp_path.name}"
    from ouro_jax.paths import copy_tree

    copy_tree(local, remote)
    source = resolve_model(remote)
    assert (source.kind, source.step) == ("train_step", 5)
    _same(load_model(remote)[1], saved[5])
    out = export_checkpoint(remote, tmp_path / "export", dtype="float32")
    _same(load_model(out)[1], saved[5])


def test_model_tokenizer_is_the_models_own_else_the_given_one_else_bytes(golden_dir, tmp_path):
    with_tokenizer = resolve_model(golden_with_tokenizer(golden_dir, tmp_path / "golden"))
    assert isinstance(model_tokenizer(with_tokenizer), HFTokenizer)
    assert isinstance(model_tokenizer(with_tokenizer, "byte"), ByteTokenizer)
    plain = resolve_model(golden_dir)
    assert plain.tokenizer_dir is None and isinstance(model_tokenizer(plain), ByteTokenizer)
    assert isinstance(model_tokenizer(plain, with_tokenizer.path / "tokenizer.json"), HFTokenizer)
