"""ouro-serve: a real server on a free port (started once for the module) driven by the `openai` client,
raw HTTP and lm-eval's API backends; continuous batching and per-row early exit at the library level."""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import lm_eval
import numpy as np
import openai
import pytest
import requests
from helpers import LM_EVAL_TASKS, golden_with_tokenizer, task_manager, with_chat_template
from jax.sharding import PartitionSpec

from ouro_jax.cli import serve as cli
from ouro_jax.data.chat_template import encode_chat_prompt
from ouro_jax.data.tokenizer import load_tokenizer
from ouro_jax.inference import generate
from ouro_jax.inference.slot_decode import decode_step
from ouro_jax.inference.slots import commit_prefill, prefill_chunk
from ouro_jax.params_io import load_model
from ouro_jax.serve.events import QueueFull, Token
from ouro_jax.serve.protocol import chat_format, chat_ids
from ouro_jax.serve.request import Request
from ouro_jax.serve.scheduler import Scheduler
from ouro_jax.serve.server import Running, build_server, parse_mesh
from ouro_jax.sharding import make_mesh

SLOTS, MAX_LEN, CHUNK, MAX_QUEUE = 4, 120, 8, 8


@pytest.fixture(scope="module")
def model(golden_dir, tmp_path_factory):
    directory = golden_with_tokenizer(golden_dir, tmp_path_factory.mktemp("serve") / "model")
    with_chat_template(directory, eos_ids=())   # a Thinking model's template; no extra stop ids
    cfg, params = load_model(directory)
    return directory, cfg, params, load_tokenizer(directory)


@pytest.fixture(scope="module")
def server(model):
    directory, cfg, params, tokenizer = model
    running = Running(build_server(cfg, params, tokenizer, model_name="tiny", slots=SLOTS, max_len=MAX_LEN,
                                   prefill_chunk=CHUNK, max_queue=MAX_QUEUE, tokenizer_dir=directory))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _expected_all(model, prompts, max_tokens, stops, **kw) -> list[str]:
    """The texts `generate` gives for a batch of id lists (tokens up to a stop id or max_tokens[i], decoded)."""
    _, cfg, params, tokenizer = model
    lengths = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else max_tokens
    result = generate(cfg, params, [list(p) for p in prompts], max_new_tokens=max(lengths), stop_token_ids=stops,
                      cache_length=2 * MAX_LEN, **kw)
    return [tokenizer.decode([t for t in row[:n] if t not in stops]) for row, n in zip(result.rows(), lengths)]


def _expected(model, ids, max_tokens, stops, **kw) -> str:
    return _expected_all(model, [ids], max_tokens, stops, **kw)[0]


def test_completions_equal_generate_greedy(model, client):
    tokenizer = model[3]
    for prompt, q in [("Say hi:", None), ("Count: 1 2 3 4 5 6 7 8 9 10 11 12", 0.6), ("abc", 0.3)]:
        extra = {} if q is None else {"exit_threshold": q}
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
        want = _expected(model, tokenizer.encode(prompt), 12, [tokenizer.eos_id], exit_threshold=q)
        assert out.choices[0].text == want, prompt
        assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
        assert 1 <= out.choices[0].model_extra["ouro"]["mean_depth"] <= 4
        assert tokenizer.decode(out.choices[0].model_extra["ouro"]["token_ids"]) == want   # the generated ids
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


def _chat(model, messages, **kwargs) -> list[int]:
    """A chat's prompt ids as `ouro-generate --chat` renders them: the model's own template."""
    return encode_chat_prompt(model[3], messages, model[0], add_generation_prompt=True, **kwargs)


def test_chat_and_streaming(model, client):
    tokenizer = model[3]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    stops = [tokenizer.im_end_id, tokenizer.eos_id]
    assert out.choices[0].message.content == _expected(model, _chat(model, messages), 10, stops)
    assert out.usage.prompt_tokens == len(_chat(model, messages))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    text = list(client.completions.create(model="tiny", prompt="Say hi:", max_tokens=9, temperature=0, stream=True))
    assert len(text) >= 9 and "".join(c.choices[0].text for c in text) == _expected(
        model, tokenizer.encode("Say hi:"), 9, [tokenizer.eos_id])
    ids = [i for c in text for i in c.choices[0].model_extra["ouro"]["token_ids"]]   # one per token chunk
    assert len(ids) == 9 and tokenizer.decode(ids) == "".join(c.choices[0].text for c in text)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_concurrent_requests_join_and_leave_slots_without_compiling(model, server, client):
    tokenizer = model[3]
    sizes = decode_step._cache_size(), prefill_chunk._cache_size(), commit_prefill._cache_size()
    stats = server.server.scheduler.stats
    steps, tokens = stats.decode_steps, stats.decode_tokens
    prompts = [("Count: 1 2 3" * (1 + i % 4))[:5 + 9 * i] for i in range(10)]   # 5..86 tokens: 1..11 chunks
    lengths = [3 + 4 * (i % 5) for i in range(10)]                               # they leave at different steps

    retrying = client.with_options(max_retries=10)  # a full queue answers 429 (backpressure): the client retries

    def ask(i):
        return retrying.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                         extra_body={"exit_threshold": 0.5, "ignore_eos": True}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        texts = list(pool.map(ask, range(10)))
    assert texts == _expected_all(model, [tokenizer.encode(p) for p in prompts], lengths, [], exit_threshold=0.5)
    assert stats.decode_tokens - tokens > 1.5 * (stats.decode_steps - steps)     # rows decoded side by side
    assert (decode_step._cache_size(), prefill_chunk._cache_size(), commit_prefill._cache_size()) == sizes


class _Collect:
    def __init__(self):
        self.tokens, self.done = [], None

    def __call__(self, event):
        if isinstance(event, Token):
            self.tokens.append(event.id)
        else:
            self.done = event


def test_per_row_exit_saves_layer_applications(model, server):
    """Four requests decoded together at q = 0.5: rows that exited do no more layer work, against the
    batch-level exit of `generate` (a batch stops only when every row has exited), token for token."""
    _, cfg, params, _ = model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (5, 7, 3, 8)]
    scheduler = Scheduler(params, server.server.scheduler.setup, prefill_chunk=CHUNK)   # its compiled programs
    sinks = [_Collect() for _ in prompts]
    for prompt, sink in zip(prompts, sinks):
        scheduler.submit(Request(tuple(prompt), max_tokens=24, exit_threshold=0.5), sink)
    while not all(s.done for s in sinks):
        scheduler.iterate()
    batch = generate(cfg, params, prompts, max_new_tokens=24, exit_threshold=0.5, cache_length=2 * MAX_LEN)
    assert [s.tokens for s in sinks] == batch.rows()
    stats, layers = scheduler.stats, cfg.num_hidden_layers
    per_token = stats.layer_applications_per_token(layers)
    batch_level = batch.decode_layer_applications * len(prompts) / (len(prompts) * 23)
    assert per_token["exact"] <= per_token["per_row_exit"] < per_token["batch_exit"]
    assert per_token["per_row_exit"] < 0.9 * batch_level
    assert per_token["exact"] == pytest.approx(layers * (batch.depths[:, 1:].mean()))   # each row its own depth


BAD_BODIES = [   # the messages are ouro_jax.validate's, as every other tool words them
    ("{not json", "not valid JSON"),
    ({"prompt": "abc", "temperature": -1}, "temperature must be a finite number in [0, inf) (0 = greedy), got -1"),
    ({"prompt": "abc", "top_p": 0}, "top_p must be a finite number in (0, 1] (1 = off), got 0"),
    ({"prompt": "abc", "top_k": -2}, "top_k must be an integer >= 0, got -2"),
    ({"prompt": "abc", "seed": -1}, "seed must be an integer in [0, 4294967296), got -1"),
    ({"prompt": "abc", "max_tokens": 0}, "max_tokens must be an integer in [1, "),
    ({"prompt": "abc", "max_tokens": "five"}, "max_tokens"),
    ({"max_tokens": 3}, "prompt is required"),
    ({"prompt": [5, 999]}, "prompt has token ids outside the vocabulary [0, 128): [999]"),
    ({"prompt": "abc", "stop_token_ids": [1, "x"]}, "stop_token_ids has token ids outside the vocabulary"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt is empty: generation needs at least one prompt token"),
    ({"prompt": "abc", "depth": 9}, "depth must be an integer in [1, 5), got 9"),
    ({"prompt": "abc", "exit_threshold": 1.5}, "exit_threshold must be a finite number in [0, 1], got 1.5"),
    ({"prompt": "abc", "kv_policy": "last"}, "kv_policy"),
    ({"prompt": "abc", "n": 2}, "n must be 1"),
    ({"prompt": "abc", "echo": True}, "echo"),
    ({"prompt": "abc", "logprobs": 9}, "logprobs must be an integer in [0, 6), got 9"),
    ({"prompt": "abc", "stop": [1]}, "stop"),
    ({"prompt": "abc", "timeout": 0}, "timeout must be a finite number in (0, 86400], got 0"),
    ({"prompt": "x" * 100, "max_tokens": 50}, "context"),
]


@pytest.mark.parametrize("body, needle", BAD_BODIES, ids=[n for _, n in BAD_BODIES])
def test_bad_requests_get_400_with_one_line(server, body, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(server.url + "/v1/completions", data=data, timeout=60)
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and needle in message and "\n" not in message, message


def test_chat_template_switches_thinking_per_request(model, client):
    """`chat_template_kwargs.enable_thinking` reaches the model's template: off, the prompt closes an empty
    think block (as `ouro-generate --chat --no-enable-thinking` renders it); the default leaves it open."""
    tokenizer, messages = model[3], [{"role": "user", "content": "1+1?"}]
    stops = [tokenizer.im_end_id, tokenizer.eos_id]
    for thinking in (None, False, True):
        extra = {} if thinking is None else {"chat_template_kwargs": {"enable_thinking": thinking}}
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                             extra_body=extra)
        ids = _chat(model, messages, **({} if thinking is None else {"enable_thinking": thinking}))
        assert tokenizer.decode(ids).endswith("</think>\n\n" if thinking is False else "<think>\n")
        assert out.usage.prompt_tokens == len(ids)
        assert out.choices[0].message.content == _expected(model, ids, 6, stops)


def test_the_chat_format_is_read_once_not_per_request(model, tmp_path):
    """The server reads the template and the stop ids when it is built: requests touch no file."""
    tokenizer, messages = model[3], [{"role": "user", "content": "1+1?"}]
    directory = shutil.copytree(model[0], tmp_path / "model")
    chat = chat_format(tokenizer, directory)
    rendered = chat_ids(tokenizer, messages, chat)
    shutil.rmtree(directory)
    assert chat_ids(tokenizer, messages, chat) == rendered and tokenizer.decode(rendered).endswith("<think>\n")
    assert chat.stop_ids == (tokenizer.eos_id, tokenizer.im_end_id)


def test_bad_chat_requests_and_the_server_keeps_serving(server, client):
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": 3}], "hi"):
        response = requests.post(server.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
        assert response.status_code == 400, response.text
    for kwargs in ({"enable_thinking": "yes"}, {"reasoning": True}):
        response = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs})
        assert response.status_code == 400 and "enable_thinking" in response.json()["error"]["message"], response.text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=-2)
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0).usage.completion_tokens
    assert requests.get(server.url + "/health", timeout=60).json()["status"] == "ok"


def test_full_queue_gets_429_and_drains(server, client):
    """The loop is held inside a sink: requests pile up in the queue; past its bound, 429 with a message."""
    scheduler = server.server.scheduler
    entered, release = threading.Event(), threading.Event()

    def blocking(event):
        entered.set()
        release.wait(timeout=60)

    scheduler.submit(Request((5, 6, 7), max_tokens=2), blocking)
    assert entered.wait(timeout=60)
    waiting = [_Collect() for _ in range(MAX_QUEUE)]
    for sink in waiting:
        scheduler.submit(Request((5, 6, 7), max_tokens=2), sink)
    with pytest.raises(QueueFull):
        scheduler.submit(Request((5, 6, 7), max_tokens=2), _Collect())
    response = requests.post(server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2}, timeout=60)
    assert response.status_code == 429 and "busy" in response.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt="abc", max_tokens=2)
    release.set()
    for sink in waiting:
        while sink.done is None:
            threading.Event().wait(0.05)
    assert all(s.done.reason == "length" and len(s.tokens) == 2 for s in waiting)


def test_disconnect_and_timeout_free_the_slot(server):
    scheduler = server.server.scheduler
    finished = scheduler.stats.finished.copy()
    body = {"prompt": "abc", "max_tokens": 110, "temperature": 0, "ignore_eos": True, "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith(b"data: ")
    for _ in range(400):      # the slot frees when the loop sees the cancellation
        if scheduler.stats.finished["cancelled"] > finished["cancelled"]:
            break
        threading.Event().wait(0.05)
    assert scheduler.stats.finished["cancelled"] == finished["cancelled"] + 1
    response = requests.post(server.url + "/v1/completions", json={**body, "stream": False, "timeout": 1e-6},
                             timeout=60)
    assert response.status_code == 504 and "timed out" in response.json()["error"]["message"]
    assert scheduler.stats.finished["timeout"] == finished["timeout"] + 1
    assert scheduler.load()["busy_slots"] == 0


def test_stopped_scheduler_answers_503(server):
    scheduler = server.server.scheduler
    scheduler.stop()
    try:
        response = requests.post(server.url + "/v1/completions", json={"prompt": "abc"}, timeout=60)
        assert response.status_code == 503 and "retry" in response.json()["error"]["message"]
    finally:
        scheduler.start()


@pytest.fixture
def lm_eval_offline(monkeypatch, tmp_path):
    monkeypatch.chdir(LM_EVAL_TASKS)  # the task YAMLs name their JSONL files relative to it
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    return task_manager()


def _api_args(server, path: str) -> str:
    return f"base_url={server.url}{path},model=tiny,tokenizer_backend=None,tokenized_requests=False,max_retries=1"


def test_lm_eval_local_completions_equals_the_ouro_jax_backend(model, server, lm_eval_offline):
    directory = model[0]
    served = lm_eval.simple_evaluate(model="local-completions", model_args=_api_args(server, "/v1/completions")
                                     + ",num_concurrent=3", tasks=["ouro_tiny_gen"], task_manager=lm_eval_offline,
                                     log_samples=True)
    ours = lm_eval.simple_evaluate(model="ouro_jax", model_args=f"pretrained={directory},batch_size=4",
                                   tasks=["ouro_tiny_gen"], task_manager=lm_eval_offline, log_samples=True)
    resps = lambda out: [s["resps"] for s in out["samples"]["ouro_tiny_gen"]]
    assert resps(served) == resps(ours) and any(r[0][0] for r in resps(ours))
    assert served["results"]["ouro_tiny_gen"] == ours["results"]["ouro_tiny_gen"]


def test_lm_eval_local_chat_completions_equals_generate(model, server, lm_eval_offline):
    tokenizer = model[3]
    served = lm_eval.simple_evaluate(model="local-chat-completions",
                                     model_args=_api_args(server, "/v1/chat/completions"), tasks=["ouro_tiny_gen"],
                                     task_manager=lm_eval_offline, log_samples=True, apply_chat_template=True)
    samples = served["samples"]["ouro_tiny_gen"]
    chats = [json.loads(s["arguments"][0][0][0]) for s in samples]   # [((messages JSON,), gen_kwargs)]
    stops = [tokenizer.im_end_id, tokenizer.eos_id]
    want = _expected_all(model, [_chat(model, m) for m in chats], 6, stops)
    assert [s["resps"][0][0] for s in samples] == [text.split("\n")[0] for text in want] and any(want)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_until_stopped(model, server):
    """`ouro-serve` in-process with the module server's shapes (its compiled programs), on a free port."""
    port, ready, stop = _free_port(), threading.Event(), threading.Event()
    args = ["--model", str(model[0]), "--port", str(port), "--slots", str(SLOTS), "--max-len", str(MAX_LEN),
            "--prefill-chunk", str(CHUNK), "--model-name", "cli"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        status = pool.submit(cli.main, args, ready, stop)
        assert ready.wait(timeout=120)
        try:
            models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).json()
            assert models["data"][0]["id"] == "cli"
            body = {"prompt": "abc", "max_tokens": 2, "ignore_eos": True}  # a random model may emit eos early
            out = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body,
                                timeout=60).json()
            assert out["usage"]["completion_tokens"] == 2
        finally:
            stop.set()
        assert status.result(timeout=60) == 0


BAD_ARGS = [(["--model", "/nonexistent/model"], "cannot load --model"),
            (["--slots", "0"], "slots must be an integer >= 1"),
            (["--policy", "most"], "unknown --policy"),
            (["--max-len", "100000"], "max_position_embeddings")]


def _argv(model, args):
    return args if args[0] == "--model" else ["--model", str(model[0]), *args]


@pytest.mark.parametrize("args, needle", BAD_ARGS)
def test_cli_bad_input_is_one_line(model, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_argv(model, args))
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and needle in err and err.strip().count("\n") == 0, err


@pytest.mark.subprocess  # one process per case (~4 s of imports): the default suite runs one, make test-all all
@pytest.mark.parametrize("args, needle", [BAD_ARGS[0], *(pytest.param(*case, marks=pytest.mark.slow)
                                                         for case in BAD_ARGS[1:])])
def test_ouro_serve_process_bad_input_is_one_line(model, args, needle):
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ouro-serve"), *_argv(model, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_sharded_over_8_devices_decodes_like_generate(model):
    """Weights and KV cache over a (data=2, tensor=4) mesh of 8 fake CPU devices: same tokens as `generate`.
    16 slots: the decode step compacts live rows in tiles of 2 (3 live rows: one padded row per step)."""
    _, cfg, params, tokenizer = model
    mesh = make_mesh(parse_mesh("data=2,tensor=4"))
    server = build_server(cfg, params, tokenizer, model_name="tiny", slots=16, max_len=56, prefill_chunk=CHUNK,
                          mesh=mesh)
    scheduler = server.scheduler
    keys = scheduler.cache.keys
    assert scheduler.setup.tile == 2
    assert scheduler.setup.rows_sharded   # the slots split over 'data': row gathers (no per-row slices)
    assert not dataclasses.replace(scheduler.setup, mesh=make_mesh(parse_mesh("tensor=8"))).rows_sharded
    assert keys.sharding.spec == PartitionSpec(None, None, ("data", "fsdp"), None, "tensor", None)
    assert keys.addressable_shards[0].data.shape == (4, 2, 8, 64, 1, 16)
    assert len({s.device for s in scheduler.params["decoder"]["layers"]["self_attn"]["q_proj"].addressable_shards}) == 8
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, n).tolist() for n in (5, 11, 3)]
    sinks = [_Collect() for _ in prompts]
    for prompt, sink in zip(prompts, sinks):
        scheduler.submit(Request(tuple(prompt), max_tokens=6, exit_threshold=0.5), sink)
    while not all(s.done for s in sinks):
        scheduler.iterate()
    want = generate(cfg, params, prompts, max_new_tokens=6, exit_threshold=0.5, cache_length=2 * MAX_LEN).rows()
    assert [s.tokens for s in sinks] == want
    assert scheduler.stats.row_steps <= 2 * scheduler.stats.batch_steps     # tiles of 2, not all 16 slots
