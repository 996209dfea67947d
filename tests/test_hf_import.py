"""HF import: parity with the released PyTorch code (golden outputs), sharded/bf16 loading, errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ouro_jax import config, model
from ouro_jax import exit as ex
from ouro_jax.errors import CheckpointError
from ouro_jax.hf import hf_tensors, load_hf
from ouro_jax.hf.safetensors_io import SafetensorsFile, write_safetensors
from ouro_jax.model import Ouro

TOL = 1e-4


@pytest.fixture(scope="module")
def golden_forward(golden_model, golden):
    cfg, params = golden_model
    m = Ouro(cfg)
    out = jax.jit(m.apply)({"params": params}, jnp.asarray(golden["input_ids"]))
    step_logits = m.apply({"params": params}, out.hidden_states, method=Ouro.logits)
    return out, step_logits


def test_golden_hidden_states_gates_and_step_logits(golden_forward, golden):
    out, step_logits = golden_forward
    np.testing.assert_allclose(out.hidden_states, golden["hidden_states"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.gate_logits, golden["gate_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(step_logits, golden["step_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.moveaxis(ex.exit_pdf(out.gate_logits), 0, -1), golden["exit_pdf"], atol=TOL)


def test_golden_selection_modes(golden_forward, golden, golden_model):
    out, step_logits = golden_forward
    cfg = golden_model[0]
    select = lambda **kw: np.asarray(ex.select_logits(step_logits, out.gate_logits, **kw))
    np.testing.assert_allclose(select(exit_threshold=0.5), golden["logits_exit_threshold_0p5"], atol=TOL, rtol=0)
    np.testing.assert_allclose(select(exit_at_step=1), golden["logits_exit_at_step_1"], atol=TOL, rtol=0)
    np.testing.assert_allclose(select(), golden["logits_default"], atol=TOL, rtol=0)
    # The released code passes the config's threshold (1.0) ahead of the weighted mode.
    np.testing.assert_allclose(select(exit_threshold=cfg.early_exit_threshold, use_weighted_exit=True),
                               golden["logits_weighted"], atol=TOL, rtol=0)


def test_golden_left_padded_batch(golden_model, golden):
    cfg, params = golden_model
    m = Ouro(cfg)
    mask = golden["padded_attention_mask"]
    out = m.apply({"params": params}, jnp.asarray(golden["padded_input_ids"]), attention_mask=jnp.asarray(mask))
    logits = np.asarray(m.apply({"params": params}, out.hidden_states[-1], method=Ouro.logits))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], golden["padded_logits"][real], atol=TOL, rtol=0)


def _copy_golden(golden_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(golden_dir, target)
    return target


def _rewrite(directory, tensors, name="model.safetensors"):
    write_safetensors(directory / name, list(tensors.items()))


def test_sharded_index_checkpoint_loads_identically(golden_dir, golden_model, tmp_path):
    cfg, params = golden_model
    target = _copy_golden(golden_dir, tmp_path)
    source = SafetensorsFile(target / "model.safetensors")
    keys = source.keys()
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        _rewrite(target, {k: np.array(source.get(k)) for k in part}, name)
    (target / "model.safetensors").unlink()
    weight_map = {k: name for name, part in halves.items() for k in part}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, loaded = load_hf(target)
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_bf16_import_and_direct_sharded_placement(golden_dir, golden_model):
    cfg, params = golden_model
    _, bf16 = load_hf(golden_dir, param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).astype(ml_dtypes.bfloat16), b), params, bf16)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec()), params)
    shardings["embed_tokens"] = NamedSharding(mesh, PartitionSpec("tensor", None))
    _, placed = load_hf(golden_dir, shardings=shardings)
    assert placed["embed_tokens"].sharding == shardings["embed_tokens"]
    assert len(placed["embed_tokens"].addressable_shards) == 8
    np.testing.assert_array_equal(placed["embed_tokens"], params["embed_tokens"])


def test_tied_embedding_checkpoint(tmp_path):
    cfg = config.tiny(tie_word_embeddings=True)
    params = model.init_params(cfg, jax.random.key(3))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    write_safetensors(tmp_path / "model.safetensors", [(k, fetch()) for k, fetch in hf_tensors(cfg, params)])
    loaded_cfg, loaded = load_hf(tmp_path)
    assert loaded_cfg.tie_word_embeddings and "lm_head" not in loaded
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_our_safetensors_files_agree_with_the_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64)}
    write_safetensors(tmp_path / "ours.safetensors", list(tensors.items()))
    theirs = load_file(tmp_path / "ours.safetensors")
    save_file(tensors, tmp_path / "theirs.safetensors")
    ours = SafetensorsFile(tmp_path / "theirs.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
        np.testing.assert_array_equal(ours.get(k), v)


# ---- clear errors ------------------------------------------------------------------------------


def test_corrupt_safetensors_is_named(golden_dir, tmp_path):
    target = _copy_golden(golden_dir, tmp_path)
    path = target / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors.*(outside the file|exceeds)"):
        load_hf(target)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_hf(target)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_hf(target)


def test_missing_unexpected_and_misshaped_keys_are_listed(golden_dir, tmp_path):
    target = _copy_golden(golden_dir, tmp_path)
    source = SafetensorsFile(target / "model.safetensors")
    tensors = {k: np.array(source.get(k)) for k in source.keys()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:, :10]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # tolerated
    _rewrite(target, tensors)
    with pytest.raises(CheckpointError) as info:
        load_hf(target)
    message = str(info.value)
    assert "missing keys: ['model.layers.1.mlp.up_proj.weight']" in message
    assert "unexpected keys: ['model.extra.weight']" in message
    assert "model.layers.0.self_attn.q_proj.weight: shape (64, 10), expected (64, 64)" in message


def test_missing_files_and_bad_index(golden_dir, tmp_path):
    target = _copy_golden(golden_dir, tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(target)
    (target / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt index"):
        load_hf(target)


@pytest.mark.parametrize("change, field", [
    ({"use_sliding_window": True, "sliding_window": 128}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"mystery_knob": 1}, "mystery_knob"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
])
def test_unsupported_config_names_the_field(golden_dir, change, field):
    hf = json.loads((golden_dir / "config.json").read_text())
    with pytest.raises(config.ConfigError, match=field):
        config.OuroConfig.from_hf_config({**hf, **change})


def test_hf_config_round_trip(golden_dir):
    cfg = config.OuroConfig.from_hf_config(golden_dir)
    assert cfg == config.tiny(max_position_embeddings=512)
    assert config.OuroConfig.from_hf_config(cfg.to_hf_config()) == cfg
    rope5 = {**cfg.to_hf_config(), "rope_parameters": {"rope_type": "default", "rope_theta": 40000.0}}
    del rope5["rope_theta"]
    assert config.OuroConfig.from_hf_config(rope5).rope_theta == 40000.0
    with pytest.raises(config.ConfigError, match="unknown OuroConfig field"):
        cfg.replace(num_layers=3)


def test_config_without_default_threshold(golden_dir):
    hf = json.loads((golden_dir / "config.json").read_text())
    assert config.OuroConfig.from_hf_config({**hf, "early_exit_threshold": None}).early_exit_threshold is None
    with pytest.raises(config.ConfigError, match="early_exit_threshold"):
        config.OuroConfig.from_hf_config({**hf, "early_exit_threshold": 1.5})
