"""Exact released-mode selection (exit_mode='select') and lossless self-speculative decoding.

`select` must equal the full forward pass over the generated sequence with the per-token Q-exit
selection of `exit.select_logits`; speculative decoding must reproduce the tokens, logits, depths and
cache of plain decoding (greedy) and keep the sampling distribution (the rejection rule).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ouro_jax import config
from ouro_jax.exit import q_exit_step, select_logits
from ouro_jax.inference import generate, speculative_accept
from ouro_jax.model import Ouro, init_params

PROMPTS = [[5, 77, 3, 19, 101, 64, 12, 8, 90, 33], [41, 7, 120, 2, 56, 17]]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, ids, *, cfg):
    """Every step's logits [T, S, V], gate logits [T, S] and K/V ([T, N, S, KVH, hd]) of one sequence."""
    m = Ouro(cfg)
    out = m.apply({"params": params}, ids[None], return_kv=True)
    logits = m.apply({"params": params}, out.hidden_states, method=Ouro.logits)
    return logits[:, 0], out.gate_logits[:, 0], tuple(x[:, :, 0] for x in out.kv)


def _check_select_against_forward(cfg, params, prompts, result, q):
    for b, prompt in enumerate(prompts):
        seq = prompt + result.tokens[b, :-1].tolist()
        step_logits, gates, kv = (np.asarray(x) if not isinstance(x, tuple) else x
                                  for x in _forward(params, jnp.asarray(seq), cfg=cfg))
        decoded = slice(len(prompt) - 1, None)
        selected = np.asarray(select_logits(step_logits, gates, exit_threshold=q))[decoded]
        np.testing.assert_allclose(result.logits[b], selected, atol=1e-5, err_msg=f"row {b}")
        np.testing.assert_array_equal(result.tokens[b], selected.argmax(-1))
        np.testing.assert_array_equal(result.depths[b], np.asarray(q_exit_step(gates, q))[decoded] + 1)
        start = result.prompt_bucket - len(prompt)
        for ours, ref in zip(result.cache, kv):   # every step's K/V in its own slot, as the full forward has them
            np.testing.assert_allclose(np.asarray(ours)[:, :, b, start:start + len(seq)], np.asarray(ref), atol=1e-5)


def test_select_mode_equals_the_full_forward_with_per_token_q_exit(golden_model, golden):
    cfg, params = golden_model
    mask = golden["padded_attention_mask"].astype(bool)
    prompts = [row[m].tolist() for row, m in zip(golden["padded_input_ids"], mask)]
    kw = dict(max_new_tokens=10, exit_threshold=0.6, return_logits=True, return_cache=True)
    select = generate(cfg, params, prompts, exit_mode="select", **kw)
    _check_select_against_forward(cfg, params, prompts, select, 0.6)
    assert len(np.unique(select.depths)) > 1, select.depths               # tokens select different steps
    assert select.decode_steps == 9 * cfg.total_ut_steps                  # ... but every step runs
    early = generate(cfg, params, prompts, exit_mode="early", **kw)
    assert early.decode_steps < select.decode_steps                       # early exit skips steps
    assert np.abs(early.logits - select.logits).max() > 1e-4              # and its deeper slots differ


def _assert_same_decode(spec, plain, fed_positions):
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.depths, plain.depths)
    np.testing.assert_allclose(spec.logits, plain.logits, atol=1e-4)
    for a, b in zip(spec.cache, plain.cache):
        np.testing.assert_allclose(np.asarray(a)[:, :, :, :fed_positions], np.asarray(b)[:, :, :, :fed_positions],
                                   atol=1e-4)


@pytest.mark.parametrize("draft_tokens,draft_depth,exit_threshold",
                         [pytest.param(3, 1, 1.0, marks=pytest.mark.slow), (4, 3, 0.6)])  # the first: make test-all
def test_speculative_greedy_equals_plain_decoding_on_the_golden_model(golden_model, draft_tokens, draft_depth,
                                                                      exit_threshold):
    cfg, params = golden_model
    kw = dict(max_new_tokens=12, exit_threshold=exit_threshold, exit_mode="select", return_logits=True,
              return_cache=True, cache_length=32)
    plain = generate(cfg, params, PROMPTS, **kw)
    spec = generate(cfg, params, PROMPTS, draft_tokens=draft_tokens, draft_depth=draft_depth, **kw)
    _assert_same_decode(spec, plain, spec.prompt_bucket + 11)
    assert spec.draft_rounds >= 1 and spec.drafted_tokens == 2 * draft_tokens * spec.draft_rounds
    assert spec.decode_steps < plain.decode_steps or spec.acceptance_rate < 0.5
    assert spec.drafted_per_row.sum() == spec.drafted_tokens and spec.accepted_per_row.sum() == spec.accepted_tokens
    assert (spec.accepted_per_row <= spec.drafted_per_row).all()
    np.testing.assert_allclose(spec.row_acceptance_rates, spec.accepted_per_row / spec.drafted_per_row)


def test_speculative_acceptance_is_counted_per_row(golden_model):
    """One row alone: every round emits its accepted drafts plus one token, so the count is exact."""
    cfg, params = golden_model
    one = generate(cfg, params, PROMPTS[:1], max_new_tokens=12, exit_threshold=0.6, exit_mode="select",
                   draft_tokens=3, draft_depth=2, cache_length=32)
    assert one.lengths[0] == min(12, 1 + one.accepted_tokens + one.draft_rounds)
    assert one.drafted_per_row.tolist() == [3 * one.draft_rounds]


def _train_tiny_model():
    """A 1-layer T=4 model that learns arithmetic progressions (x_{t+1} = x_t + c mod 13) in ~200 steps,
    every step trained (mean CE over steps), so shallow steps draft well."""
    cfg = config.tiny(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    start, stride = rng.integers(0, 13, (4096, 1)), rng.integers(1, 5, (4096, 1))
    data = (3 + (start + stride * np.arange(25)[None]) % 13).astype(np.int32)
    optimizer = optax.adam(1e-2)

    def loss_fn(params, batch):
        out = Ouro(cfg).apply({"params": params}, batch[:, :-1], targets=batch[:, 1:], return_hidden=False)
        return out.step_ce.mean()

    @jax.jit
    def train(params, opt_state, batches):
        def one(carry, batch):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(one, (params, opt_state), batches)[0]

    params = init_params(cfg, jax.random.key(0))
    params, _ = train(params, optimizer.init(params), jnp.asarray(data[:200 * 16].reshape(200, 16, 25)))
    return cfg, params


@pytest.fixture(scope="module")
def trained_model():
    return _train_tiny_model()


@pytest.mark.slow
def test_speculative_greedy_is_lossless_and_accepts_drafts_on_a_trained_model(trained_model):
    cfg, params = trained_model
    prompts = [[3, 5, 7], [10, 13, 3, 6, 9], [4, 8, 12, 3]]        # progressions with strides 2, 3, 4
    kw = dict(max_new_tokens=20, return_logits=True, return_cache=True, cache_length=32)
    plain = generate(cfg, params, prompts, **kw)
    expected = [(3 + (np.asarray(p[-1]) - 3 + s * np.arange(1, 21)) % 13).tolist()
                for p, s in zip(prompts, (2, 3, 4))]
    assert (plain.tokens == np.asarray(expected)).mean() > 0.6     # the model has learnt most of the task
    for draft_tokens, draft_depth in ((2, 1), (4, 2)):
        spec = generate(cfg, params, prompts, draft_tokens=draft_tokens, draft_depth=draft_depth, **kw)
        _assert_same_decode(spec, plain, spec.prompt_bucket + 19)
        assert spec.acceptance_rate > 0.5, (draft_tokens, draft_depth, spec.acceptance_rate)
        assert spec.draft_rounds < 19 / 2                           # > 2 tokens per round on average


def test_rejection_rule_keeps_the_target_distribution():
    """Draws from q, accepted by min(1, p/q) or replaced from (p - q)+: the emitted token follows p at the
    first position, and again at the second once the first draft was accepted."""
    p = jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = jnp.asarray([[0.25, 0.25, 0.25, 0.25], [0.4, 0.4, 0.1, 0.1]])
    n = 40000

    @jax.jit
    @jax.vmap
    def one(key):
        k_draft, k_accept = jax.random.split(key)
        drafts = jax.random.categorical(k_draft, jnp.log(q))             # [2]
        accepted, tokens = speculative_accept(drafts[None], q[None], p[None], k_accept)
        return accepted[0], tokens[0]

    accepted, tokens = (np.asarray(x) for x in one(jax.random.split(jax.random.key(0), n)))
    np.testing.assert_allclose(np.bincount(tokens[:, 0], minlength=4) / n, p[0], atol=0.01)
    second = tokens[accepted >= 1, 1]
    np.testing.assert_allclose(np.bincount(second, minlength=4) / len(second), p[1], atol=0.015)
    overlap = np.minimum(p[:2], q).sum(axis=1)                           # P(accept) = sum_x min(p, q)
    np.testing.assert_allclose((accepted >= 1).mean(), overlap[0], atol=0.01)
    np.testing.assert_allclose((accepted == 2).mean(), overlap[0] * overlap[1], atol=0.01)

    greedy_p, greedy_q = jax.nn.one_hot(jnp.asarray([[1, 2, 0]]), 4), jax.nn.one_hot(jnp.asarray([[1, 3]]), 4)
    accepted, tokens = speculative_accept(jnp.asarray([[1, 3]]), greedy_q, greedy_p, jax.random.key(1))
    assert int(accepted[0]) == 1 and tokens[0, :2].tolist() == [1, 2]   # greedy: match, then the target's argmax


@pytest.mark.slow
def test_speculative_sampling_follows_plain_sampling(golden_model):
    """Many identical rows sampled at temperature 1 (top-k 4): the first speculatively decoded token
    follows the full-depth distribution given each row's first token (computed by a forward pass)."""
    cfg, params = golden_model
    rows = 2048
    kw = dict(max_new_tokens=2, temperature=1.0, top_k=4, seed=7)
    spec = generate(cfg, params, [PROMPTS[1]] * rows, draft_tokens=2, draft_depth=1, **kw)

    def expected(first_tokens):
        probs = np.zeros(cfg.vocab_size)
        for t, count in zip(*np.unique(first_tokens, return_counts=True)):
            step_logits, _, _ = _forward(params, jnp.asarray(PROMPTS[1] + [int(t)]), cfg=cfg)
            top = np.sort(np.asarray(step_logits[-1, -1]))[-4]
            logits = np.where(np.asarray(step_logits[-1, -1]) >= top, np.asarray(step_logits[-1, -1]), -np.inf)
            probs += count * np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        return probs / len(first_tokens)

    freq = np.bincount(spec.tokens[:, 1], minlength=cfg.vocab_size) / rows
    tv = 0.5 * np.abs(freq - expected(spec.tokens[:, 0])).sum()
    assert tv < 0.05, tv
    assert spec.drafted_tokens == 2 * rows   # one round; across 2048 rows the common accepted prefix is empty,
    # so each row's first token is its accepted draft or the (p - q)+ resample: the rule under test
