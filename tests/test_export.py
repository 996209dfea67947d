"""HF export: files and config, bitwise round trip, shards, atomicity, overwrite, tokenizer, CLI."""

import ast
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ouro_jax import config, params_io
from ouro_jax.cli.export import main as export_main
from ouro_jax.errors import CheckpointError
from ouro_jax.hf import export as export_module
from ouro_jax.hf import export_hf, load_hf
from ouro_jax.hf.keys import INDEX_FILE, key_table
from ouro_jax.hf.safetensors_io import SafetensorsFile
from ouro_jax.model import abstract_params
from ouro_jax.params_io import export_checkpoint, save_params


def random_params(cfg, seed=0):
    """Params of the config's shapes, every leaf random (norm gains around 1, the gate bias too), so that
    no swapped or transposed tensor can hide."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nn.unbox(abstract_params(cfg)))
    return traverse_util.unflatten_dict({
        path: jnp.asarray((path[-1] == "scale") + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        for path, leaf in flat.items()})


@pytest.fixture(scope="module")
def model():
    cfg = config.tiny(num_key_value_heads=2, total_ut_steps=3)
    return cfg, random_params(cfg)


def assert_bitwise_equal(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(path))


def test_export_files_config_and_special_ids(model, tmp_path):
    cfg, params = model
    out = export_hf(tmp_path / "hf", cfg, params)
    assert sorted(os.listdir(out)) == ["config.json", "configuration_ouro.py", "generation_config.json",
                                       "model.safetensors", "modeling_ouro.py", "ouro_checksums.json"]
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    assert hf["model_type"] == "ouro" and hf["architectures"] == ["OuroForCausalLM"]
    assert hf["auto_map"] == {"AutoConfig": "configuration_ouro.OuroConfig",
                              "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
    assert (hf["pad_token_id"], hf["bos_token_id"], hf["eos_token_id"]) == (0, 1, 2)
    assert hf["total_ut_steps"] == 3 and hf["early_exit_threshold"] == 1.0 and hf["dtype"] == "float32"
    assert config.OuroConfig.from_hf_config(hf) == cfg
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    weights = SafetensorsFile(os.path.join(out, "model.safetensors"))
    assert weights.keys() == [m.hf_key for m in key_table(cfg)]
    assert weights.metadata == {"format": "pt"}
    for name in ("configuration_ouro.py", "modeling_ouro.py"):  # plain PyTorch files: no ouro_jax, no jax
        tree = ast.parse(open(os.path.join(out, name)).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert imported <= {"__future__", "copy", "dataclasses", "torch", "transformers"}, imported


def test_round_trip_is_bitwise_fp32_and_bf16(model, tmp_path):
    cfg, params = model
    cfg_back, back = load_hf(export_hf(tmp_path / "f32", cfg, params))
    assert cfg_back == cfg
    assert_bitwise_equal(back, params)

    cfg16 = cfg.with_execution(param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out16 = export_hf(tmp_path / "bf16", cfg16, params16)
    assert SafetensorsFile(os.path.join(out16, "model.safetensors")).dtype("lm_head.weight").name == "bfloat16"
    cfg16_back, back16 = load_hf(out16)
    assert cfg16_back == cfg16
    assert_bitwise_equal(back16, params16)

    # fp32 params exported as bf16 are rounded once, exactly as jnp rounds them.
    _, rounded = load_hf(export_hf(tmp_path / "f32_as_bf16", cfg, params, dtype="bfloat16"))
    assert_bitwise_equal(rounded, params16)


def test_sharded_export_has_an_index_and_loads_back(model, tmp_path):
    cfg, params = model
    limit = 40_000
    out = export_hf(tmp_path / "sharded", cfg, params, max_shard_size=limit)
    with open(os.path.join(out, INDEX_FILE)) as f:
        index = json.load(f)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    assert shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(m.hf_key for m in key_table(cfg))
    total = 0
    for name in shards:
        file = SafetensorsFile(os.path.join(out, name))
        sizes = [file.get(k).nbytes for k in file.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    _, back = load_hf(out)
    assert_bitwise_equal(back, params)


def test_existing_directory_is_refused_unless_overwrite(model, tmp_path):
    cfg, params = model
    target = tmp_path / "out"
    target.mkdir()
    export_hf(target, cfg, params)  # an empty directory is fine
    (target / "stale-00001-of-00009.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already holds an HF export; pass --overwrite"):
        export_hf(target, cfg, params)
    assert (target / "stale-00001-of-00009.safetensors").exists()
    export_hf(target, cfg, params, overwrite=True)  # replaces the whole directory: no stale shards remain
    assert not (target / "stale-00001-of-00009.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_hf(tmp_path / "file", cfg, params, overwrite=True)


def _fail_after(monkeypatch, count, error):
    """Makes the export's tensor stream raise `error` once `count` tensors have been written."""
    original = export_module.hf_tensors

    def failing(cfg, params, dtype=None):
        for i, (key, fetch) in enumerate(original(cfg, params, dtype)):
            def maybe_fail(fetch=fetch, i=i):
                if i >= count:
                    raise error
                return fetch()
            yield key, maybe_fail

    monkeypatch.setattr(export_module, "hf_tensors", failing)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_leaves_nothing_behind(model, tmp_path, monkeypatch, error):
    cfg, params = model
    _fail_after(monkeypatch, 5, error)
    with pytest.raises(type(error)):
        export_hf(tmp_path / "new", cfg, params, max_shard_size=40_000)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_previous_export(model, tmp_path, monkeypatch):
    cfg, params = model
    out = export_hf(tmp_path / "out", cfg, params)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    _fail_after(monkeypatch, 7, RuntimeError("crash"))
    with pytest.raises(RuntimeError, match="crash"):
        export_hf(out, cfg, params, overwrite=True, dtype="bfloat16")
    assert os.listdir(tmp_path) == ["out"]
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_params_that_do_not_fit_the_config_are_refused(model, tmp_path):
    cfg, params = model
    wrong = {**params, "lm_head": params["lm_head"][:, :64]}
    with pytest.raises(CheckpointError, match=r"lm_head: shape \(64, 64\), expected \(64, 128\)"):
        export_hf(tmp_path / "bad", cfg, wrong)
    missing = {k: v for k, v in params.items() if k != "exit_gate"}
    with pytest.raises(CheckpointError, match="missing exit_gate/bias"):
        export_hf(tmp_path / "bad", cfg, missing)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_hf(tmp_path / "bad", cfg, params, dtype="float16")
    with pytest.raises(ValueError, match="cannot parse size"):
        export_hf(tmp_path / "bad", cfg, params, max_shard_size="lots")
    assert os.listdir(tmp_path) == []


def test_parse_size():
    assert export_module.parse_size("5GB") == 5 * 10**9
    assert export_module.parse_size("2GiB") == 2 * 2**30
    assert export_module.parse_size("1.5 mb") == 1_500_000
    assert export_module.parse_size(1234) == 1234


def test_tokenizer_files_are_copied(model, tmp_path):
    cfg, params = model
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (tok / "unrelated.bin").write_bytes(b"no")
    out = export_hf(tmp_path / "with_tok", cfg, params, tokenizer=tok)
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"version": "1.0"}'
    assert open(os.path.join(out, "tokenizer_config.json")).read() == '{"model_max_length": 512}'
    assert not os.path.exists(os.path.join(out, "unrelated.bin"))
    out = export_hf(tmp_path / "one_file", cfg, params, tokenizer=[tok / "tokenizer.json"])
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        export_hf(tmp_path / "none", cfg, params, tokenizer=tmp_path / "one_file" / "..")


def test_cli_exports_a_params_checkpoint(model, tmp_path, capsys):
    cfg, params = model
    save_params(tmp_path / "ckpt", cfg, params)
    out = tmp_path / "hf"
    assert export_main([str(tmp_path / "ckpt"), str(out), "--dtype", "bfloat16", "--max-shard-size", "50KB"]) == 0
    assert "exported" in capsys.readouterr().out
    cfg_back, back = load_hf(out)
    assert cfg_back == cfg.with_execution(param_dtype="bfloat16")
    assert_bitwise_equal(back, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    assert os.path.exists(out / INDEX_FILE)
    with pytest.raises(SystemExit, match="1"):  # refuses the non-empty target
        export_main([str(tmp_path / "ckpt"), str(out)])
    assert "already holds an HF export" in capsys.readouterr().err
    assert export_main([str(tmp_path / "ckpt"), str(out), "--overwrite"]) == 0
    with pytest.raises(SystemExit, match="1"):
        export_main([str(tmp_path / "missing"), str(tmp_path / "x")])


def test_reexport_of_a_released_directory_fixes_the_special_ids(golden_dir, golden_model, tmp_path):
    released = tmp_path / "released"
    shutil.copytree(golden_dir, released, copy_function=shutil.copyfile)
    released.chmod(0o755)  # shared/ is read-only; the copy must not be
    with open(released / "config.json") as f:
        hf = json.load(f)
    hf.update(bos_token_id=0, eos_token_id=0)  # what the released Ouro configs say
    (released / "config.json").write_text(json.dumps(hf))
    out = export_checkpoint(released, tmp_path / "re")
    with open(os.path.join(out, "config.json")) as f:
        fixed = json.load(f)
    assert (fixed["pad_token_id"], fixed["bos_token_id"], fixed["eos_token_id"]) == (0, 1, 2)
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2
    cfg, params = load_hf(out)
    assert cfg == golden_model[0]
    assert_bitwise_equal(params, golden_model[1])


def test_a_config_with_the_execution_fields_of_older_checkpoints_still_reads(tmp_path):
    """Checkpoints written before the config split stored execution settings beside the model fields."""
    cfg = config.tiny()
    older = {**cfg.to_dict(), "dtype": "bfloat16", "remat_policy": "full"}
    (tmp_path / "ouro_config.json").write_text(json.dumps(older))
    assert params_io._read_config(tmp_path) == cfg
    (tmp_path / "ouro_config.json").write_text(json.dumps({**cfg.to_dict(), "scan_layers": True}))
    with pytest.raises(CheckpointError, match="scan_layers"):
        params_io._read_config(tmp_path)
