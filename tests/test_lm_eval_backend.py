"""The lm-eval backend's model args, chat templates, sampling, stop strings, auto batch size and data
parallelism, and the Ouro-Thinking recipe (chat template, few-shot as turns, thinking, pass@k) on a tiny task."""


import lm_eval
import numpy as np
import pytest
from helpers import LM_EVAL_TASKS, golden_with_tokenizer, task_manager, with_chat_template
from lm_eval.api.instance import Instance

from ouro_jax.evaluation import until as until_module
from ouro_jax.evaluation.batching import auto_batch_size
from ouro_jax.evaluation.lm_eval_adapter import OuroJaxLM
from ouro_jax.evaluation.pass_at_k import pass_at_k
from ouro_jax.evaluation.until import answer_text

GREEDY = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}


@pytest.fixture(scope="module")
def model_dir(golden_dir, tmp_path_factory):
    return with_chat_template(golden_with_tokenizer(golden_dir, tmp_path_factory.mktemp("lm") / "model"))


@pytest.fixture(scope="module")
def lm(model_dir):
    return OuroJaxLM(str(model_dir), batch_size=4, seed=3, data_parallel=1)


def _gen(lm, contexts, **gen_kwargs):
    requests = [Instance("generate_until", {}, (c, {**GREEDY, **gen_kwargs}), i) for i, c in enumerate(contexts)]
    return lm.generate_until(requests, disable_tqdm=True)


def _loglik(lm, pairs):
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]


PAIRS = [("The capital of France is", " Paris"), ("abc", "d"), ("Count: 1 2 3", " 4")]
PROMPTS = ["Say hi:", "Count: 1 2 3", "abc", "xyz"]


def test_sampling_gen_kwargs_and_seed(lm, model_dir):
    greedy = _gen(lm, PROMPTS)
    assert _gen(lm, PROMPTS, do_sample=True, temperature=1.0, top_k=1) == greedy      # top_k=1 is greedy
    assert _gen(lm, PROMPTS, do_sample=True, temperature=1.0, top_p=1e-6) == greedy   # so is a tiny nucleus
    sample = dict(do_sample=True, temperature=1.0, max_gen_toks=6, until=[])
    runs = {seed: _gen(OuroJaxLM(str(model_dir), batch_size=4, seed=seed, data_parallel=1), PROMPTS * 4, **sample)
            for seed in (3, 3, 4)}
    first = _gen(OuroJaxLM(str(model_dir), batch_size=4, seed=3, data_parallel=1), PROMPTS * 4, **sample)
    assert len(set(first)) > len(PROMPTS)                                    # repeats draw distinct samples
    assert runs[3] == first and runs[4] != first                            # the seed fixes them


def test_until_strings_stop_rows_while_generating(lm, monkeypatch):
    full = _gen(lm, ["abc"], until=[], max_gen_toks=32)[0]
    stop = full[3]
    asked = []
    real = until_module.generate
    monkeypatch.setattr(until_module, "generate", lambda *a, **kw: asked.append(kw["max_new_tokens"]) or real(*a, **kw))
    lm.generator.check_every = 4
    try:
        assert _gen(lm, ["abc"], until=[stop], max_gen_toks=32) == [full.split(stop)[0]]
    finally:
        lm.generator.check_every = 32
    assert sum(asked) <= 8, asked                                            # not 32: stopped within a round


def test_think_end_token_answers_and_stop_strings():
    assert answer_text("plan\n\nmore</think>\n\n42\nrest", ["\n"], "</think>") == "42"
    assert answer_text("no end of thinking\n", ["\n"], "</think>") == "no end of thinking"
    assert until_module._stopped("a\n\nb", ["\n"], "</think>") is False       # stops inside thinking don't count
    assert until_module._stopped("a\n</think> 4\n", ["\n"], "</think>") is True
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)


def test_auto_batch_size_by_memory_and_data_parallel(lm, model_dir):
    class Device:
        def __init__(self, free):
            self.free = free

        def memory_stats(self):
            return {"bytes_limit": self.free, "bytes_in_use": 0}

    assert auto_batch_size(100, [Device(10_000)], params_bytes=0) == 32       # 0.5 * 10000 / 100 = 50 -> 32
    assert auto_batch_size(100, [Device(10_000), Device(2_000)], params_bytes=0) == 16  # the smallest: 8 each
    assert auto_batch_size(10**9, [Device(10_000)], params_bytes=0) == 1
    # two of the test process's CPU devices, the batch split across them: the results of one device
    auto = OuroJaxLM(str(model_dir), batch_size="auto", max_batch_size=4, data_parallel=2)
    assert len(auto.parallel.devices) == 2
    assert np.allclose(_loglik(auto, PAIRS), _loglik(lm, PAIRS), atol=1e-5) and auto.last_batch_size == 4
    assert _gen(auto, PROMPTS) == _gen(lm, PROMPTS) and auto.last_batch_size == 4
    assert OuroJaxLM(str(model_dir), batch_size=3, data_parallel=2).batch_size == 4   # whole rows per device


def test_model_args_dtype_length_tokenizer_policy_exit(lm, model_dir):
    reference = _loglik(lm, PAIRS)
    half = OuroJaxLM(str(model_dir), dtype="bfloat16", batch_size=2, data_parallel=1)
    assert str(half.cfg.compute_dtype) == "bfloat16"
    assert np.allclose(_loglik(half, PAIRS), reference, atol=0.1)
    short = OuroJaxLM(str(model_dir), max_length=4, tokenizer=str(model_dir / "tokenizer.json"), policy="average",
                      depth=2, exit_at_step=1, exit_threshold=0.5, stop_check_tokens=0, data_parallel=1)
    assert short.max_length == 4 and short.policy == "average" and short.depth == 2 and short.exit_at_step == 1
    # at most 4 inputs: the long context is cut to its end, so it scores like its last three characters
    (long_ctx,), (tail,) = _loglik(short, [("The capital of France is", " P")]), _loglik(short, [("is", " P")])
    assert long_ctx != pytest.approx(tail) and len(_gen(short, ["abc"], max_gen_toks=2)[0]) <= 2
    with pytest.raises(ValueError, match="unknown ouro_jax model args"):
        OuroJaxLM(str(model_dir), flux_capacitor=1)
    with pytest.raises(ValueError, match="stop_check_tokens"):
        OuroJaxLM(str(model_dir), stop_check_tokens=-1)


def test_thinking_recipe_chat_template_fewshot_turns_pass_at_k(model_dir, monkeypatch, tmp_path):
    """The documented Ouro-Thinking command on a tiny task: the prompt is the model's chat template with the
    few-shot examples as turns, 4 samples per question at temperature 1.0, pass@k from them."""
    monkeypatch.chdir(LM_EVAL_TASKS)
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_CACHE": str(tmp_path / "datasets")}.items():
        monkeypatch.setenv(key, value)
    out = lm_eval.simple_evaluate(
        model="ouro_jax",
        model_args=f"pretrained={model_dir},think_end_token=</think>,enable_thinking=true,seed=1,data_parallel=1",
        tasks=["ouro_tiny_think"], task_manager=task_manager(),
        num_fewshot=2,
        apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True, batch_size=8)
    samples = out["samples"]["ouro_tiny_think"]
    prompt = samples[0]["arguments"][0][0]
    assert prompt.count("<|im_start|>user\n") == 3 and prompt.count("<|im_start|>assistant\n") == 3
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")              # thinking on: the template opens it
    responses = [r for s in samples for r in s["resps"][0]]                 # one request, 4 repeats
    assert len(responses) == 4 * 4 and len(set(responses)) > 4
    want = np.mean([np.mean([r.strip() == s["doc"]["answer"] for r in s["resps"][0]]) for s in samples])
    assert out["results"]["ouro_tiny_think"]["pass@1,all_samples"] == pytest.approx(want)
    assert "pass@4,all_samples" in out["results"]["ouro_tiny_think"]
