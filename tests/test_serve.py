"""ouro-serve: a real server on a free port (started once for the module) driven by the `openai` client,
raw HTTP and lm-eval's API backends; continuous batching and per-row early exit at the library level."""

import concurrent.futures
import json
import threading

import requests
import numpy as np
import openai
import pytest
from helpers import golden_with_tokenizer

from ouro_jax.data.chatml import encode_chat
from ouro_jax.data.tokenizer import load_tokenizer
from ouro_jax.inference import generate
from ouro_jax.inference.slot_decode import decode_step
from ouro_jax.inference.slots import commit_prefill, prefill_chunk, slot_setup
from ouro_jax.params_io import load_model
from ouro_jax.serve.request import Request
from ouro_jax.serve.scheduler import Finished, QueueFull, Scheduler, Token
from ouro_jax.serve.server import Running, build_server

SLOTS, MAX_LEN, CHUNK, MAX_QUEUE = 4, 120, 8, 8


@pytest.fixture(scope="module")
def model(golden_dir, tmp_path_factory):
    directory = golden_with_tokenizer(golden_dir, tmp_path_factory.mktemp("serve") / "model")
    cfg, params = load_model(directory)
    return directory, cfg, params, load_tokenizer(directory)


@pytest.fixture(scope="module")
def server(model):
    _, cfg, params, tokenizer = model
    running = Running(build_server(cfg, params, tokenizer, model_name="tiny", slots=SLOTS, max_len=MAX_LEN,
                                   prefill_chunk=CHUNK, max_queue=MAX_QUEUE))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _expected(model, ids, max_tokens, stops, **kw) -> str:
    """The text `generate` gives for ids (its tokens up to a stop id, decoded)."""
    _, cfg, params, tokenizer = model
    row = generate(cfg, params, [list(ids)], max_new_tokens=max_tokens, stop_token_ids=stops, **kw).rows()[0]
    return tokenizer.decode([t for t in row if t not in stops])


def test_completions_equal_generate_greedy(model, client):
    tokenizer = model[3]
    for prompt, q in [("Say hi:", None), ("Count: 1 2 3 4 5 6 7 8 9 10 11 12", 0.6), ("abc", 0.3)]:
        extra = {} if q is None else {"exit_threshold": q}
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
        want = _expected(model, tokenizer.encode(prompt), 12, [tokenizer.eos_id], exit_threshold=q)
        assert out.choices[0].text == want, prompt
        assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
        assert 1 <= out.choices[0].model_extra["ouro"]["mean_depth"] <= 4
    ids = tokenizer.encode("Say hi:").tolist()      # token ids in, and a batch of prompts
    out = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert [c.text for c in out.choices] == [_expected(model, p, 5, [tokenizer.eos_id]) for p in (ids, ids[:3])]


def test_sampling_seed_stop_strings_and_logprobs(model, client):
    tokenizer = model[3]
    ask = lambda **kw: client.completions.create(model="tiny", prompt="abc", max_tokens=10, **kw)
    a, b = (ask(temperature=1.0, seed=7, extra_body={"top_k": 5}) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text          # seeded sampling repeats
    ids = tokenizer.encode("abc")
    want = generate(model[1], model[2], [ids.tolist()], max_new_tokens=10, temperature=1.0, top_k=5, seed=7,
                    stop_token_ids=[tokenizer.eos_id]).rows()[0]
    assert a.choices[0].text == tokenizer.decode([t for t in want if t != tokenizer.eos_id])
    greedy = ask(temperature=0).choices[0].text
    cut = greedy[3:5]
    stopped = ask(temperature=0, stop=[cut])
    assert stopped.choices[0].text == greedy[:greedy.find(cut)] and stopped.choices[0].finish_reason == "stop"
    first = tokenizer.encode(greedy[0]).tolist()[0]
    by_id = ask(temperature=0, extra_body={"stop_token_ids": [first]})
    assert by_id.choices[0].text == "" and by_id.choices[0].finish_reason == "stop"
    scored = ask(temperature=0, logprobs=3)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == greedy and len(lp.top_logprobs[0]) == 3
    assert all(t == max(top.values()) for t, top in zip(lp.token_logprobs, lp.top_logprobs))   # greedy = argmax


def test_chat_and_streaming(model, client):
    tokenizer = model[3]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
    stops = [tokenizer.im_end_id, tokenizer.eos_id]
    assert out.choices[0].message.content == _expected(model, ids, 10, stops)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    text = list(client.completions.create(model="tiny", prompt="Say hi:", max_tokens=9, temperature=0, stream=True))
    assert len(text) >= 9 and "".join(c.choices[0].text for c in text) == _expected(
        model, tokenizer.encode("Say hi:"), 9, [tokenizer.eos_id])
    assert [m.id for m in client.models.list().data] == ["tiny"]
