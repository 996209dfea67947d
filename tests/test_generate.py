"""The generation API around the engine: sampling, stop tokens, streaming, one compilation, errors, CLI."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax import config
from ouro_jax.cli import generate as cli
from ouro_jax.inference import SamplingParams, filter_logits, generate, resolve_exit_threshold, sample_tokens
from ouro_jax.inference.loop import generate_program
from ouro_jax.inference.settings import cache_positions, default_cache_length, prompt_bucket


@pytest.fixture(scope="module")
def prompt(golden):
    return golden["input_ids"][0].tolist()


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))[0]
    np.testing.assert_array_equal(kept(0, 1.0), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(kept(2, 1.0), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(kept(0, 0.6), [0, 1, 0, 1, 0])    # 0.4 < 0.6 <= 0.7
    np.testing.assert_array_equal(kept(0, 0.75), [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(kept(0, 1e-6), [0, 1, 0, 0, 0])   # the top token always stays
    np.testing.assert_array_equal(kept(4, 0.75), [0, 1, 0, 1, 1])


def test_sampling_frequencies_follow_the_tempered_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs))[None]
    params = SamplingParams.make(temperature=2.0, top_k=3, top_p=1.0)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_tokens(logits, k, params)[0]))(keys))
    tempered = probs[:3] ** 0.5 / np.sum(probs[:3] ** 0.5)
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [*tempered, 0.0], atol=0.03)
    greedy = SamplingParams.make()
    assert int(sample_tokens(logits, keys[0], greedy)[0]) == 0


def test_sampling_through_generate(golden_model, golden, prompt):
    cfg, params = golden_model
    run = lambda **kw: generate(cfg, params, [prompt], max_new_tokens=10, return_logits=True, **kw)
    greedy = run()
    np.testing.assert_array_equal(greedy.tokens, golden["greedy_tokens"])
    np.testing.assert_array_equal(run(temperature=1.0, top_k=1, seed=3).tokens, greedy.tokens)
    np.testing.assert_array_equal(run(temperature=0.7, top_p=1e-6, seed=4).tokens, greedy.tokens)
    a, b, c = (run(temperature=1.5, top_k=3, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any() and (a.tokens != greedy.tokens).any()
    for result in (a, c):   # every sampled token lies in the top 3 of the logits that produced it
        top3 = np.argsort(result.logits[0], axis=-1)[:, -3:]
        assert all(t in row for t, row in zip(result.tokens[0], top3))


def test_stop_tokens_end_rows_and_the_loop(golden_model, golden):
    cfg, params = golden_model
    prompts = [golden["input_ids"][0].tolist(), golden["input_ids"][1, 3:].tolist()]
    stop = int(golden["greedy_tokens"][0, 3])          # row 0 says it at its 4th token, row 1 never
    result = generate(cfg, params, prompts, max_new_tokens=10, stop_token_ids=[stop, 127], return_logits=True,
                      return_cache=True)
    np.testing.assert_array_equal(result.lengths, [4, 10])
    np.testing.assert_array_equal(result.tokens[0], [*golden["greedy_tokens"][0, :4], 0, 0, 0, 0, 0, 0])
    assert result.rows()[0] == golden["greedy_tokens"][0, :4].tolist()
    np.testing.assert_array_equal(result.depths[0], [4, 4, 4, 4, 0, 0, 0, 0, 0, 0])
    both = generate(cfg, params, prompts[:1], max_new_tokens=10, stop_token_ids=[stop], return_logits=True)
    assert both.lengths.tolist() == [4] and both.decode_steps == 3 * cfg.total_ut_steps   # the loop ended


def test_streaming_callback_sees_every_token_in_order(golden_model, prompt):
    cfg, params = golden_model
    seen = []
    result = generate(cfg, params, [prompt], max_new_tokens=10,
                      stream=lambda i, t, live: seen.append((i, t.copy(), live.copy())))
    assert [i for i, _, _ in seen] == list(range(10))
    np.testing.assert_array_equal(np.stack([t for _, t, _ in seen], axis=1), result.tokens)
    assert all(live.all() for _, _, live in seen)


def test_one_compilation_serves_other_prompts_lengths_and_settings(golden_model, golden, prompt):
    cfg, params = golden_model
    generate(cfg, params, [prompt], max_new_tokens=10, return_logits=True)
    compiled = generate_program._cache_size()
    shorter = golden["input_ids"][1, 3:].tolist()            # 9 tokens: the same bucket of 16
    for kw in (dict(max_new_tokens=3), dict(max_new_tokens=16, cache_length=32), dict(temperature=0.9, top_k=5, seed=9),
               dict(top_p=0.5, temperature=1.0), dict(exit_threshold=0.3), dict(stop_token_ids=[5, 6, 7])):
        kw = {"max_new_tokens": 10, **kw}
        result = generate(cfg, params, [shorter], return_logits=True, **kw)
        assert result.tokens.shape == (1, kw["max_new_tokens"]) and result.cache_length == 32
    assert generate_program._cache_size() == compiled


@pytest.mark.parametrize("draft_tokens", [0, pytest.param(3, marks=pytest.mark.slow)])  # 3: make test-all
def test_a_cache_of_exactly_the_written_positions_suffices(golden_model, prompt, draft_tokens):
    """The last new token is never fed, so bucket + max_new_tokens - 1 (+ a verified chunk) positions give the
    tokens a roomier cache gives; the default length is the power of two that holds them."""
    cfg, params = golden_model
    bucket, max_new_tokens = prompt_bucket(len(prompt)), 9
    needed = cache_positions(bucket, max_new_tokens, draft_tokens)
    run = lambda length: generate(cfg, params, [prompt], max_new_tokens=max_new_tokens, cache_length=length,
                                  draft_tokens=draft_tokens).tokens
    np.testing.assert_array_equal(run(needed), run(needed + 16))
    assert default_cache_length(len(prompt), max_new_tokens, draft_tokens=draft_tokens) == prompt_bucket(needed)
    assert default_cache_length(16, 17) == 32      # 16 + 17 - 1 = 32 positions


def test_bad_input_gets_clear_errors(golden_model, prompt):
    cfg, params = golden_model
    cases = [
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[prompt, [3, 128, -1]]),
         r"prompt 1 has token ids outside the vocabulary \[0, 128\): \[128, -1\]"),
        (dict(max_new_tokens=600), r"exceeds max_position_embeddings \(512\)"),
        (dict(cache_length=16), r"needs 25 cache positions, beyond cache_length \(16\)"),
        (dict(policy="middle"), "unknown KV-cache policy 'middle'"),
        (dict(exit_threshold=1.5), r"exit_threshold must be a finite number in \[0, 1\]"),
        (dict(depth=0), "depth must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be a finite number in \(0, 1\]"),
        (dict(temperature=-1.0), r"temperature must be a finite number in \[0, inf\)"),
        (dict(stop_token_ids=[200]), "stop_token_ids has token ids outside the vocabulary"),
        (dict(seed=-3), "seed must be an integer"),
        (dict(exit_mode="fast"), "unknown exit_mode 'fast'"),
        (dict(draft_tokens=2, policy="last"), "speculative decoding needs the 'full' KV-cache policy"),
        (dict(draft_tokens=2, exit_threshold=0.5), "use exit_mode='select'"),
        (dict(draft_tokens=2, draft_depth=4), r"draft_depth must be an integer in \[1, depth=4\)"),
        (dict(draft_tokens=-1), "draft_tokens must be an integer >= 0"),
        (dict(draft_tokens=8, cache_length=32), r"\+ draft_tokens \(8\) needs 33 cache positions"),
    ]
    for overrides, message in cases:
        kw = {"prompts": [prompt], "max_new_tokens": 10, **overrides}
        with pytest.raises(ValueError, match=message):
            generate(cfg, params, **kw)


def test_exit_threshold_defaults_to_the_config():
    cfg = config.tiny()
    assert resolve_exit_threshold(cfg, None) == 1.0 and resolve_exit_threshold(cfg, 0.3) == 0.3
    assert resolve_exit_threshold(cfg.replace(early_exit_threshold=0.7), None) == 0.7
    assert resolve_exit_threshold(cfg.replace(early_exit_threshold=None), None) == 1.0   # no threshold: last step
    assert resolve_exit_threshold(cfg.replace(early_exit_threshold=0.7), 1.0) == 1.0


def _chat_model_dir(tmp_path, golden_dir) -> str:
    """The golden checkpoint with a small word-level tokenizer.json (specials at ids 0, 1, 2)."""
    import tokenizers

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), 127)] + ["[UNK]"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(words[:3])
    model_dir = tmp_path / "chat_model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(golden_dir / name, model_dir / name)
    tok.save(str(model_dir / "tokenizer.json"))
    return str(model_dir)


def test_cli_generates_chat_and_prints_speed_and_depth(tmp_path, golden_dir, golden_model, capsys):
    from ouro_jax.data.chatml import encode_chat
    from ouro_jax.data.tokenizer import load_tokenizer

    model_dir = _chat_model_dir(tmp_path, golden_dir)
    result = cli.main(["--model", model_dir, "--chat", "--system", "w7 w8", "--prompt", "w9 w10 w11",
                       "--max-new-tokens", "10", "--exit-threshold", "0.6"])
    out = capsys.readouterr().out
    tokenizer = load_tokenizer(model_dir)
    ids, _ = encode_chat(tokenizer, [{"role": "system", "content": "w7 w8"}, {"role": "user", "content": "w9 w10 w11"}],
                         add_generation_prompt=True)
    assert ids.tolist()[:2] == [1, 3] and ids.tolist()[-2:] == [1, 5]
    cfg, params = golden_model
    expected = generate(cfg, params, [ids.tolist()], max_new_tokens=10, exit_threshold=0.6, stop_token_ids=[0, 2],
                        stream=lambda *_: None)
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    text = tokenizer.decode([t for t in expected.rows()[0] if t not in (0, 2)])
    assert out.startswith(text) and "tokens/s" in out and f"mean depth {expected.mean_depth:.2f} of 4" in out


def _fails(run, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and message in err and err.count("\n") == 1, err


def test_cli_errors_name_the_problem(golden_dir, capsys):
    _fails(cli.main, ["--model", str(golden_dir), "--prompt-ids", "1,2", "--policy", "middle"],
           "unknown --policy 'middle'", capsys)
    _fails(cli.main, ["--model", str(golden_dir), "--prompt", "café"], "outside the vocabulary", capsys)  # 'é' -> 198
    _fails(cli.main, ["--model", str(golden_dir), "--prompt-ids", " "], "prompt 0 is empty", capsys)
    _fails(cli.main, ["--model", str(golden_dir), "--prompt-ids", "1,x"], "--prompt-ids must be integers", capsys)
    _fails(cli.main, ["--model", str(golden_dir / "missing"), "--prompt-ids", "1,2"], "error: cannot load --model",
           capsys)
    _fails(cli.main, ["--model", str(golden_dir), "--prompt-ids", "1,2", "--draft-tokens", "2", "--draft-depth", "9"],
           "draft_depth must be an integer", capsys)


@pytest.mark.slow
def test_console_script_run_prints_speculation(golden_dir, golden_model, capsys, monkeypatch):
    args = ["ouro-generate", "--model", str(golden_dir), "--prompt-ids", "5,77,3,19", "--max-new-tokens", "6",
            "--no-stream"]
    monkeypatch.setattr("sys.argv", args + ["--draft-tokens", "3", "--draft-depth", "2"])
    cli.run()
    speculative = capsys.readouterr().out
    monkeypatch.setattr("sys.argv", args + ["--exit-mode", "select", "--exit-threshold", "0.6"])
    cli.run()
    select = capsys.readouterr().out
    cfg, params = golden_model
    full = generate(cfg, params, [[5, 77, 3, 19]], max_new_tokens=6)
    assert speculative.startswith(" ".join(map(str, full.rows()[0])) + "\n") and "drafts accepted" in speculative
    chosen = generate(cfg, params, [[5, 77, 3, 19]], max_new_tokens=6, exit_threshold=0.6, exit_mode="select")
    assert select.startswith(" ".join(map(str, chosen.rows()[0])) + "\n")
