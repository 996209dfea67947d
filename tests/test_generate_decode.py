"""Decode correctness: golden greedy tokens, full-forward parity, KV-cache policies, early exit, depth.

The reference decodes one row alone, token by token and step by step in Python, with each policy's
rule written out in numpy (and the exit CDF in float64); the engine decodes a left-padded batch in
one compiled program. Both must agree on every logit, every realized depth and the final cache.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax.exit import select_logits
from ouro_jax.inference import cache_bytes, generate
from ouro_jax.model import Ouro

REF_LENGTH = 32  # cache length of the reference decoder


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"))
def _forward_padded(params, ids, *, cfg, num_steps):
    m = Ouro(cfg)
    out = m.apply({"params": params}, ids, num_steps=num_steps, return_kv=True)
    return m.apply({"params": params}, out.hidden_states, method=Ouro.logits), out.gate_logits, out.kv


def _forward(params, ids: list[int], *, cfg, num_steps):
    """A plain forward pass over one sequence: every step's logits [D, S, V], gate logits [D, S] and
    K/V ([D, N, S, KVH, hd] each); right-padded to REF_LENGTH (causal: padding changes nothing) so
    one compilation serves every length."""
    padded = jnp.zeros((1, REF_LENGTH), jnp.int32).at[0, :len(ids)].set(jnp.asarray(ids))
    logits, gates, kv = _forward_padded(params, padded, cfg=cfg, num_steps=num_steps)
    n = len(ids)
    return np.asarray(logits)[:, 0, :n], np.asarray(gates)[:, 0, :n], tuple(np.asarray(x)[:, :, 0, :n] for x in kv)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _step(params, h, position, keys, values, index, *, cfg):
    m = Ouro(cfg)
    mask = (jnp.arange(keys.shape[2]) <= index)[None, None, None, :]
    h, gate, kv = m.apply({"params": params}, h, position[None, None], mask, kv_cache=(keys, values),
                          cache_index=index, method=Ouro.step)
    return h, gate, kv, m.apply({"params": params}, h[:, 0], method=Ouro.logits)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _embed(params, token, *, cfg):
    return Ouro(cfg).apply({"params": params}, jnp.full((1, 1), token, jnp.int32), method=Ouro.embed)


def _exits(gates: list[float], q: float, depth: int) -> bool:
    """Q-exit after the last of `gates` (float64): CDF(t) = 1 - prod(1 - sigmoid(z_j)) >= q."""
    t = len(gates) - 1
    if t == depth - 1:
        return True
    survival = np.prod([1.0 - 1.0 / (1.0 + np.exp(-z)) for z in gates])
    return q < 1.0 and 1.0 - survival >= q


def reference_decode(cfg, params, prompt, generated, policy, q=1.0, depth=None):
    """(logits [G, V], depths [G], cache [2, slots, N, S+G-1, KVH, hd]) of one row, teacher-forced."""
    depth = depth or cfg.total_ut_steps
    size = len(prompt)
    step_logits, gate_logits, kv = _forward(params, prompt, cfg=cfg, num_steps=depth)
    kv = np.stack(kv)                                                       # [2, D, N, S, KVH, hd]
    stored = {"full": kv, "last": kv[:, -1:], "first": kv[:, :1], "average": kv.mean(axis=1, keepdims=True)}[policy]
    cache = np.zeros(stored.shape[:3] + (REF_LENGTH,) + stored.shape[4:], np.float32)
    cache[:, :, :, :size] = stored

    gates = [float(z) for z in gate_logits[:, -1]]
    first_exit = next(t for t in range(depth) if _exits(gates[:t + 1], q, depth))
    logits, depths = [step_logits[first_exit, -1]], [first_exit + 1]
    for i, token in enumerate(generated[:-1]):
        pos = size + i
        h, gates, seen = _embed(params, token, cfg=cfg), [], []
        for t in range(depth):
            slot = t if policy == "full" else 0
            view = (cache[0, slot][:, None], cache[1, slot][:, None])           # [N, 1, L, KVH, hd]
            h, gate, (k, v), step_out = _step(params, h, jnp.int32(pos), *view, jnp.int32(pos), cfg=cfg)
            new = np.stack([np.asarray(k)[:, 0, 0], np.asarray(v)[:, 0, 0]])   # [2, N, KVH, hd]: this token's K/V
            seen.append(new)
            if policy == "full":
                cache[:, t:, :, pos] = new[:, None]   # deeper slots keep it if the row stops here
            elif policy == "last" or (policy == "first" and t == 0):
                cache[:, 0, :, pos] = new
            elif policy == "average":
                cache[:, 0, :, pos] = np.mean(seen, axis=0)
            gates.append(float(gate[0, 0]))
            if _exits(gates, q, depth):
                break
        logits.append(np.asarray(step_out)[0])
        depths.append(t + 1)
    return np.stack(logits), np.asarray(depths), cache[:, :, :, :size + len(generated) - 1]


def _golden_prompts(golden) -> list[list[int]]:
    mask = golden["padded_attention_mask"].astype(bool)
    return [row[m].tolist() for row, m in zip(golden["padded_input_ids"], mask)]


def test_greedy_matches_golden_and_a_full_forward_pass(golden_model, golden):
    cfg, params = golden_model
    prompt = golden["input_ids"][0].tolist()
    result = generate(cfg, params, [prompt], max_new_tokens=10, return_logits=True)
    np.testing.assert_array_equal(result.tokens, golden["greedy_tokens"])
    step_logits, _, _ = _forward(params, prompt + result.tokens[0, :-1].tolist(), cfg=cfg, num_steps=cfg.total_ut_steps)
    np.testing.assert_allclose(result.logits[0], step_logits[-1, len(prompt) - 1:], atol=1e-5)
    assert (result.depths == cfg.total_ut_steps).all() and result.mean_depth == cfg.total_ut_steps
    assert result.decode_steps == 9 * cfg.total_ut_steps and result.prompt_bucket == 16


def test_padded_batch_matches_golden_and_each_row_alone(golden_model, golden):
    cfg, params = golden_model
    prompts = _golden_prompts(golden)
    batch = generate(cfg, params, prompts, max_new_tokens=10, return_logits=True, return_cache=True)
    np.testing.assert_array_equal(batch.tokens, golden["padded_greedy_tokens"])
    np.testing.assert_allclose(batch.logits[:, 0], golden["padded_logits"][:, -1], atol=1e-5)
    for b, prompt in enumerate(prompts):
        alone = generate(cfg, params, [prompt], max_new_tokens=10, return_logits=True)
        np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(batch.logits[b], alone.logits[0], atol=1e-5)


@pytest.fixture(scope="module")
def gqa_model(golden_model):
    """A grouped-query model (2 KV heads for 4 query heads) and T = 3, cut from the golden weights."""
    cfg, params = golden_model
    attn = params["decoder"]["layers"]["self_attn"]
    attn = {**attn, "k_proj": attn["k_proj"][:, :, :2], "v_proj": attn["v_proj"][:, :, :2]}
    layers = {**params["decoder"]["layers"], "self_attn": attn}
    return cfg.replace(num_key_value_heads=2, total_ut_steps=3), {**params, "decoder": {"layers": layers}}


PROMPTS = [[5, 77, 3, 19, 101, 64, 12, 8, 90, 33], [41, 7, 120, 2, 56, 17]]


def _check_against_reference(cfg, params, prompts, result, policy, q=1.0, depth=None):
    for b, prompt in enumerate(prompts):
        generated = result.tokens[b].tolist()
        logits, depths, cache = reference_decode(cfg, params, prompt, generated, policy, q, depth)
        np.testing.assert_allclose(result.logits[b], logits, atol=1e-5, err_msg=f"{policy} row {b} logits")
        np.testing.assert_array_equal(result.depths[b], depths, err_msg=f"{policy} row {b} depths")
        start = result.prompt_bucket - len(prompt)
        ours = np.stack([np.asarray(c)[:, :, b, start:start + cache.shape[3]] for c in result.cache])
        np.testing.assert_allclose(ours, cache, atol=1e-5, err_msg=f"{policy} row {b} cache")


@pytest.mark.parametrize("policy", ["full", "last", "first", "average"])
def test_policy_matches_reference_and_reports_cache_bytes(gqa_model, policy):
    cfg, params = gqa_model
    result = generate(cfg, params, PROMPTS, max_new_tokens=6, policy=policy, return_logits=True, return_cache=True)
    assert result.tokens.shape == (2, 6) and (result.depths == cfg.total_ut_steps).all()
    _check_against_reference(cfg, params, PROMPTS, result, policy)
    slots = cfg.total_ut_steps if policy == "full" else 1
    assert result.cache.keys.shape == (slots, cfg.num_hidden_layers, 2, result.cache_length, 2, cfg.head_dim)
    assert result.cache_bytes == 2 * result.cache.keys.size * 4
    full = cache_bytes(cfg, "full", cfg.total_ut_steps, 2, result.cache_length)
    assert result.cache_bytes * (1 if policy == "full" else cfg.total_ut_steps) == full
    assert result.decode_steps == 5 * cfg.total_ut_steps


def test_policies_differ_where_the_paper_says(gqa_model):
    """`first` starves deep steps of context, so its decode logits leave those of `full`."""
    cfg, params = gqa_model
    full = generate(cfg, params, PROMPTS, max_new_tokens=6, return_logits=True, return_cache=True)
    first = generate(cfg, params, PROMPTS, max_new_tokens=6, policy="first", return_logits=True, return_cache=True)
    np.testing.assert_allclose(first.logits[:, 0], full.logits[:, 0], atol=1e-6)  # token 0 comes from prefill
    assert np.abs(first.logits[:, 1] - full.logits[:, 1]).max() > 1e-4


@pytest.mark.parametrize("policy", ["full", "average"])
def test_mixed_early_exit_matches_reference_and_saves_steps(golden_model, golden, policy):
    cfg, params = golden_model
    prompts = _golden_prompts(golden)
    result = generate(cfg, params, prompts, max_new_tokens=10, exit_threshold=0.6, policy=policy,
                      return_logits=True, return_cache=True)
    _check_against_reference(cfg, params, prompts, result, policy, q=0.6)
    decoded = result.depths[:, 1:]
    assert len(np.unique(decoded)) > 1 and decoded.min() >= 1, result.depths    # rows exit at different steps
    assert result.decode_steps == decoded.max(axis=0).sum()                    # the loop stops with the last row
    assert result.decode_layer_applications == result.decode_steps * cfg.num_hidden_layers
    if policy == "full":   # here some positions end early in both rows: the batch skips those steps
        assert result.decode_steps < 9 * cfg.total_ut_steps


def test_early_exit_gate_saves_layer_applications_and_q1_is_full_depth(golden_model, golden):
    """With a gate biased to exit at once, q < 1 runs one step per token; q = 1 still runs all T."""
    cfg, params = golden_model
    eager = {**params, "exit_gate": {**params["exit_gate"], "bias": params["exit_gate"]["bias"] + 12.0}}
    prompts = [PROMPTS[0], PROMPTS[1]]
    kwargs = dict(max_new_tokens=10, return_logits=True, return_cache=True)
    fast = generate(cfg, eager, prompts, exit_threshold=0.9, **kwargs)
    full = generate(cfg, eager, prompts, exit_threshold=1.0, **kwargs)
    fixed = generate(cfg, eager, prompts, depth=cfg.total_ut_steps, **kwargs)
    assert (fast.depths == 1).all() and fast.decode_steps == 9
    assert (full.depths == cfg.total_ut_steps).all() and full.decode_steps == 9 * cfg.total_ut_steps
    assert fast.decode_layer_applications * cfg.total_ut_steps == full.decode_layer_applications
    for name in ("tokens", "depths", "logits"):   # q = 1.0 is the full depth, bit for bit
        np.testing.assert_array_equal(getattr(full, name), getattr(fixed, name))
    jax.tree.map(np.testing.assert_array_equal, full.cache, fixed.cache)

    # selected-step semantics over the whole sequence: every token exits at step 0 under q = 0.9
    for b, prompt in enumerate(prompts):
        for result, q, step in ((fast, 0.9, 0), (full, 1.0, -1)):
            step_logits, gates, _ = _forward(eager, prompt + result.tokens[b, :-1].tolist(), cfg=cfg,
                                             num_steps=cfg.total_ut_steps)
            decoded = slice(len(prompt) - 1, None)
            np.testing.assert_allclose(result.logits[b], step_logits[step, decoded], atol=1e-5)
            if q < 1.0:
                selected = select_logits(step_logits, gates, exit_threshold=q)[decoded]
                np.testing.assert_allclose(result.logits[b], selected, atol=1e-5)


@pytest.mark.parametrize("depth", [2, 6])
def test_fixed_depth_and_extrapolation_equal_a_forward_pass_of_that_depth(golden_model, depth):
    cfg, params = golden_model
    result = generate(cfg, params, [PROMPTS[0]], max_new_tokens=10, depth=depth, return_logits=True)
    assert (result.depths == depth).all() and result.decode_steps == 9 * depth
    assert result.cache_bytes == cache_bytes(cfg, "full", depth, 1, result.cache_length)
    step_logits, _, _ = _forward(params, PROMPTS[0] + result.tokens[0, :-1].tolist(), cfg=cfg, num_steps=depth)
    np.testing.assert_allclose(result.logits[0], step_logits[-1, len(PROMPTS[0]) - 1:], atol=1e-5)
