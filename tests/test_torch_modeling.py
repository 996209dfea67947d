"""Our PyTorch modeling code (transformers 5.x remote code) against the golden reference and against JAX.

The model is always loaded the way users load it:
`AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import AutoModelForCausalLM, DynamicCache

from ouro_jax import config
from ouro_jax import exit as ex
from ouro_jax.hf import export_hf, load_hf
from ouro_jax.hf.export import REMOTE_CODE_DIR, REMOTE_CODE_FILES
from ouro_jax.inference import generate as jax_generate
from ouro_jax.model import Ouro, abstract_params

HF_DIR = REMOTE_CODE_DIR
TOL = 1e-4  # float32


def load(directory, attn="sdpa", **kwargs):
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, attn_implementation=attn, **kwargs)
    return model.eval()


def random_params(cfg, seed=0):
    """Params of the config's shapes, every leaf random (norm gains around 1, the gate bias too)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nn.unbox(abstract_params(cfg)))
    return traverse_util.unflatten_dict({
        path: jnp.asarray((path[-1] == "scale") + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        for path, leaf in flat.items()})


def jax_greedy(cfg, params, ids, mask, new_tokens):
    """Oracle: greedy decoding that reruns the full JAX forward for every token (no cache).

    Like `generate()`, a row that emitted eos continues with pad, and decoding stops when every row did.
    """
    model = Ouro(cfg)
    batch, length = ids.shape
    buf = np.full((batch, length + new_tokens), cfg.pad_token_id, np.int32)
    buf[:, :length] = ids
    buf_mask = np.zeros_like(buf)
    buf_mask[:, :length] = mask

    @jax.jit
    def next_logits(buf, buf_mask, last):
        hidden = model.apply({"params": params}, buf, attention_mask=buf_mask).hidden_states[-1]
        return model.apply({"params": params}, hidden[:, last], method=Ouro.logits)

    done, out = np.zeros(batch, bool), []
    for i in range(new_tokens):
        logits = np.asarray(next_logits(buf, buf_mask, length + i - 1))
        top2 = np.sort(logits, -1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] > 1e-3)[~done].all(), "near-tie: greedy parity would be luck"
        token = np.where(done, cfg.pad_token_id, logits.argmax(-1))
        out.append(token)
        buf[:, length + i], buf_mask[:, length + i] = token, 1
        done |= token == cfg.eos_token_id
        if done.all():
            break
    return np.stack(out, 1)


# ---- golden reference: our two files dropped into the released-format directory -----------------------


@pytest.fixture(scope="module")
def golden_copy(golden_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("golden") / "ouro_tiny"
    shutil.copytree(golden_dir, directory, copy_function=shutil.copyfile)
    directory.chmod(0o755)  # shared/ is read-only; the copy must not be
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(HF_DIR, name), directory / name)
    with open(directory / "config.json") as f:  # the released config points auto_map at these two files
        assert json.load(f)["auto_map"]["AutoModelForCausalLM"] == "modeling_ouro.OuroForCausalLM"
    return directory


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_golden_steps_and_exit_modes(golden_copy, golden, attn):
    model = load(golden_copy, attn)
    assert model.config._attn_implementation == attn and model.dtype == torch.float32
    ids = torch.tensor(golden["input_ids"])
    with torch.no_grad():
        out = model(ids, output_steps=True)
        by_mode = {name: model(ids, **kw).logits.numpy() for name, kw in [
            ("logits_exit_threshold_0p5", dict(exit_threshold=0.5)),
            ("logits_exit_at_step_1", dict(exit_at_step=1)),
            ("logits_weighted", dict(use_weighted_exit=True)),  # config threshold 1.0 comes first: the last step
            ("logits_default", {})]}
    np.testing.assert_allclose(out.step_hidden_states.numpy(), golden["hidden_states"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.gate_logits.numpy(), golden["gate_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.step_logits.numpy(), golden["step_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.moveaxis(out.exit_pdf.numpy(), 0, -1), golden["exit_pdf"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out.logits.numpy(), out.step_logits[-1].numpy())
    for name, logits in by_mode.items():
        np.testing.assert_allclose(logits, golden[name], atol=1e-5, rtol=0, err_msg=name)
    # The threshold really switches steps per token, so that mode is not the last step in disguise.
    assert not np.allclose(by_mode["logits_exit_threshold_0p5"], golden["logits_default"], atol=1e-3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_golden_greedy_and_left_padded_batch(golden_copy, golden, attn):
    model = load(golden_copy, attn)
    ids, padded, mask = (torch.tensor(golden[k]) for k in ("input_ids", "padded_input_ids", "padded_attention_mask"))
    with torch.no_grad():
        logits = model(padded, attention_mask=mask).logits.numpy()
        real = golden["padded_attention_mask"].astype(bool)
        np.testing.assert_allclose(logits[real], golden["padded_logits"][real], atol=1e-5, rtol=0)
        new = golden["greedy_tokens"].shape[1]
        greedy = model.generate(ids[:1], max_new_tokens=new, do_sample=False)
        np.testing.assert_array_equal(greedy[:, ids.shape[1]:].numpy(), golden["greedy_tokens"])
        out = model.generate(padded, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True)
    np.testing.assert_array_equal(out.sequences[:, ids.shape[1]:].numpy(), golden["padded_greedy_tokens"])
    # One cache slot per (step, layer), each holding every token but the last one generated.
    cfg = model.config
    assert len(out.past_key_values.layers) == cfg.total_ut_steps * cfg.num_hidden_layers
    assert {layer.keys.shape[2] for layer in out.past_key_values.layers} == {ids.shape[1] + new - 1}


def test_golden_weighted_exit_without_threshold(golden_copy, golden):
    model = load(golden_copy)
    ids = torch.tensor(golden["input_ids"])
    model.config.early_exit_threshold = None  # released default 1.0 would take priority
    with torch.no_grad():
        weighted = model(ids, use_weighted_exit=True).logits.numpy()
        with pytest.raises(ValueError, match=r"exit_at_step must lie in \[0, 4\)"):
            model(ids, exit_at_step=4)
    expected = np.einsum("bst,tbsv->bsv", golden["exit_pdf"], golden["step_logits"])
    np.testing.assert_allclose(weighted, expected, atol=1e-5, rtol=0)


# ---- JAX -> export -> PyTorch ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A GQA model with 3 recurrent steps, exported as float32."""
    cfg = config.tiny(num_key_value_heads=2, total_ut_steps=3)
    params = random_params(cfg)
    directory = export_hf(tmp_path_factory.mktemp("export") / "ouro_gqa", cfg, params)
    return cfg, params, directory


def jax_steps(cfg, params, ids):
    """(step logits [T, B, S, V], gate logits [T, B, S]) of the JAX model."""
    model = Ouro(cfg)

    @jax.jit
    def run(params, ids):
        out = model.apply({"params": params}, ids)
        return model.apply({"params": params}, out.hidden_states, method=Ouro.logits), out.gate_logits

    return tuple(np.asarray(x) for x in run(params, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def jax_reference(exported):
    """JAX outputs for the exported model, computed once: step logits, gate logits, greedy tokens of the
    no-cache oracle and of our inference engine."""
    cfg, params, _ = exported
    rng = np.random.default_rng(1)
    ids = rng.integers(3, cfg.vocab_size, (2, 11))
    step_logits, gate_logits = jax_steps(cfg, params, ids)
    prompts = rng.integers(3, cfg.vocab_size, (3, 7))
    mask = np.ones_like(prompts)
    for row, pad in enumerate([0, 2, 4]):
        prompts[row, :pad], mask[row, :pad] = cfg.pad_token_id, 0
    greedy = jax_greedy(cfg, params, prompts, mask, 8)
    # Our inference engine (KV cache, one compiled decode loop) on the same ragged prompts.
    engine = jax_generate(cfg, params, [row[m.astype(bool)].tolist() for row, m in zip(prompts, mask)],
                          max_new_tokens=8, stop_token_ids=[cfg.eos_token_id]).tokens
    return dict(ids=ids, step_logits=step_logits, gate_logits=gate_logits, prompts=prompts, mask=mask, greedy=greedy,
                engine=engine[:, :greedy.shape[1]])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_exported_model_matches_jax_at_every_step(exported, jax_reference, attn):
    cfg, _, directory = exported
    model = load(directory, attn)
    ids, step_logits, gate_logits = (jax_reference[k] for k in ("ids", "step_logits", "gate_logits"))
    with torch.no_grad():
        got = model(torch.tensor(ids), output_steps=True)
        threshold = model(torch.tensor(ids), exit_threshold=0.5).logits.numpy()
        at_step = model(torch.tensor(ids), exit_at_step=0).logits.numpy()
    assert got.step_logits.shape == (3, 2, 11, cfg.vocab_size)
    np.testing.assert_allclose(got.step_logits.numpy(), step_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.gate_logits.numpy(), gate_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(threshold, ex.select_logits(step_logits, gate_logits, exit_threshold=0.5),
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(at_step, step_logits[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_exported_greedy_generate_matches_jax_with_left_padding(exported, jax_reference, attn):
    _, _, directory = exported
    model = load(directory, attn)
    ids, mask, expected = (jax_reference[k] for k in ("prompts", "mask", "greedy"))
    new = expected.shape[1]
    with torch.no_grad():
        got = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                             do_sample=False)
        single = model.generate(torch.tensor(ids[:1]), max_new_tokens=new, do_sample=False)
        uncached = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                                  do_sample=False, use_cache=False)
    np.testing.assert_array_equal(got[:, ids.shape[1]:].numpy(), expected)
    np.testing.assert_array_equal(got[:, ids.shape[1]:].numpy(), jax_reference["engine"])
    np.testing.assert_array_equal(single[:, ids.shape[1]:].numpy(), expected[:1])
    np.testing.assert_array_equal(uncached.numpy(), got.numpy())
    # Row 2 alone (its 4 pads dropped) continues exactly as inside the padded batch.
    with torch.no_grad():
        alone = model.generate(torch.tensor(ids[2:, 4:]), max_new_tokens=new, do_sample=False)
    np.testing.assert_array_equal(alone[:, 3:].numpy(), expected[2:])


def test_exported_bfloat16(exported, tmp_path):
    cfg, params, _ = exported
    cfg16 = cfg.with_execution(param_dtype="bfloat16", dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    model = load(export_hf(tmp_path / "bf16", cfg16, params16))
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 9))
    step_logits, _ = jax_steps(cfg16, params16, ids)
    # float32 compute on the same bf16-rounded weights: what both bf16 computations approximate.
    reference, _ = jax_steps(cfg, jax.tree.map(lambda x: x.astype(jnp.float32), params16), ids)
    with torch.no_grad():
        got = model(torch.tensor(ids), output_steps=True).step_logits.numpy()
    assert got.dtype == np.float32
    # Logits here span about +-3; bf16 compute noise is ~0.05 in JAX and torch alike (measured).
    np.testing.assert_allclose(got, step_logits, atol=0.15, rtol=0)
    torch_err, jax_err = np.abs(got - reference).max(), np.abs(step_logits - reference).max()
    assert torch_err < 1.5 * jax_err + 0.02, (torch_err, jax_err)
    with torch.no_grad():
        tokens = model.generate(torch.tensor(ids), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (2, 13)


def test_sharded_export_loads_in_torch(exported, tmp_path):
    cfg, params, directory = exported
    sharded = export_hf(tmp_path / "sharded", cfg, params, max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    ids = torch.tensor(np.random.default_rng(4).integers(3, cfg.vocab_size, (1, 6)))
    with torch.no_grad():
        a = load(sharded)(ids).logits
        b = load(directory)(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_labels_loss_and_fine_tuning_gradients(exported):
    _, _, directory = exported
    model = load(directory)
    ids = torch.tensor(np.random.default_rng(5).integers(3, 128, (2, 8)))
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    # Training mode with gradient checkpointing: the same gradients reach the shared layers and the gate.
    grads = []
    model.config.early_exit_threshold = None  # else the config's Q-exit (q = 1) outranks the weighted mode
    for checkpointing in (False, True):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids, labels=ids, use_cache=False, use_weighted_exit=True).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == {n for n, _ in model.named_parameters()}
    assert grads[0]["model.early_exit_gate.weight"].abs().sum() > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_cache_reuse_static_cache_and_beams(exported):
    cfg, _, directory = exported
    model = load(directory)
    rng = np.random.default_rng(6)
    ids = torch.tensor(rng.integers(3, cfg.vocab_size, (2, 10)))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids).logits
        # A prefix, then the rest on top of its cache (one slot per step and layer), equals one pass.
        first = model(ids[:, :4], use_cache=True)
        assert len(first.past_key_values.layers) == cfg.total_ut_steps * cfg.num_hidden_layers
        rest = model(ids[:, 4:], past_key_values=first.past_key_values)
        torch.testing.assert_close(rest.logits, full[:, 4:], atol=TOL, rtol=0)
        # A cache built from the config (one slot per layer, as generate builds it) is given T x N slots.
        cache = DynamicCache(config=model.config)
        torch.testing.assert_close(model(ids, past_key_values=cache).logits, full, atol=0, rtol=0)
        assert len(cache.layers) == cfg.total_ut_steps * cfg.num_hidden_layers
        with pytest.raises(ValueError, match="needs 6"):
            filled = DynamicCache(config=model.config)
            filled.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
            model(ids, past_key_values=filled)
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        static = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                cache_implementation="static")
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=3)
    torch.testing.assert_close(static, dynamic, atol=0, rtol=0)
    assert beams.shape[0] == 2 and beams.shape[1] <= 16


def test_torch_save_pretrained_loads_back_in_jax(exported, tmp_path):
    cfg, params, directory = exported
    load(directory).save_pretrained(tmp_path / "saved")
    assert {"configuration_ouro.py", "modeling_ouro.py"} <= set(os.listdir(tmp_path / "saved"))
    cfg_back, back = load_hf(tmp_path / "saved")
    assert cfg_back == cfg
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tied_embeddings(tmp_path):
    cfg = config.tiny(tie_word_embeddings=True, total_ut_steps=2)
    params = random_params(cfg, seed=7)
    directory = export_hf(tmp_path / "tied", cfg, params)
    model = load(directory)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = np.random.default_rng(8).integers(3, cfg.vocab_size, (1, 6))
    step_logits, _ = jax_steps(cfg, params, ids)
    with torch.no_grad():
        got = model(torch.tensor(ids), output_steps=True).step_logits.numpy()
    np.testing.assert_allclose(got, step_logits, atol=TOL, rtol=0)


@pytest.mark.torch
def test_labels_loss_is_the_released_mixture_cross_entropy(exported):
    """`labels=`, as in the released code: CE of sum_t p(t) logits_t, whatever the exit mode asked for."""
    _, _, directory = exported
    model = load(directory)
    ids = torch.tensor(np.random.default_rng(8).integers(3, 128, (2, 9)))
    labels = ids.clone()
    labels[0, 4] = labels[1, -1] = -100  # ignored positions
    with torch.no_grad():
        steps = model(ids, output_steps=True)
        losses = [model(ids, labels=labels, **mode).loss for mode in
                  ({}, {"exit_at_step": 0}, {"exit_threshold": 0.5}, {"use_weighted_exit": True})]
    step_logits = steps.step_logits.double().numpy()                                  # [T, B, S, V]
    lam = 1.0 / (1.0 + np.exp(-steps.gate_logits.double().numpy()))                   # [T, B, S]
    survival = np.cumprod(np.concatenate([np.ones_like(lam[:1]), 1.0 - lam[:-1]]), axis=0)
    pdf = np.concatenate([lam[:-1] * survival[:-1], survival[-1:]])                   # p(T) = S_{T-1}
    mixture = (pdf[..., None] * step_logits).sum(0)[:, :-1]
    targets = labels[:, 1:].numpy()
    logz = np.log(np.exp(mixture - mixture.max(-1, keepdims=True)).sum(-1)) + mixture.max(-1)
    ce = logz - np.take_along_axis(mixture, np.maximum(targets, 0)[..., None], -1)[..., 0]
    expected = ce[targets != -100].mean()
    for loss in losses:
        assert float(loss) == pytest.approx(expected, abs=1e-5)
