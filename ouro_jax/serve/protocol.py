"""The OpenAI request bodies (completions and chat completions) as scheduler `Request`s, and the
response objects. Every bad value is a ValueError with one line naming the field."""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ouro_jax.data.chat_template import encode_chat_prompt, load_chat_template, stop_token_ids
from ouro_jax.paths import PathLike
from ouro_jax.serve.request import Request


@dataclasses.dataclass(frozen=True)
class Call:
    """One parsed API call: the requests to run (one per prompt) and how to answer."""

    requests: tuple[Request, ...]
    stop: tuple[str, ...] = ()
    stream: bool = False
    logprobs: int | None = None


def _get(body: Mapping, name: str, kind, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{name} must be of type {names}, got {value!r}")
    return value


def _stop_strings(body: Mapping) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {body.get('stop')!r}")
    return tuple(stop)


def _options(body: Mapping, default_stop_ids: Sequence[int], server: Mapping[str, Any]) -> dict[str, Any]:
    """The Request fields every call shares (sampling, stops, exit settings)."""
    if _get(body, "n", int, 1) != 1:
        raise ValueError("n must be 1 (one choice per prompt)")
    policy = _get(body, "kv_policy", str, server["policy"])
    if policy != server["policy"]:
        raise ValueError(f"kv_policy {policy!r} differs from the server's cache layout ({server['policy']!r}); "
                         "start the server with --policy to change it")
    stop_ids = tuple(_get(body, "stop_token_ids", list, []))   # ids are checked with the request
    if not _get(body, "ignore_eos", bool, False):
        stop_ids = (*stop_ids, *default_stop_ids)
    top_k = _get(body, "top_k", int, 0)
    return dict(temperature=float(_get(body, "temperature", (int, float), 1.0)), top_k=0 if top_k == -1 else top_k,
                top_p=float(_get(body, "top_p", (int, float), 1.0)),
                seed=_get(body, "seed", int, random.randrange(2**32)), stop_ids=stop_ids,
                exit_threshold=float(_get(body, "exit_threshold", (int, float), server["exit_threshold"])),
                depth=_get(body, "depth", int, None), timeout_s=_get(body, "timeout", (int, float), server["timeout"]))


def _prompts(prompt, tokenizer) -> list[tuple[int, ...]]:
    if isinstance(prompt, str):
        return [tuple(tokenizer.encode(prompt).tolist())]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [tuple(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [p for item in prompt for p in _prompts(item, tokenizer)]
    raise ValueError("prompt must be a string, a list of token ids, or a list of those")


def parse_completion(body: Mapping, tokenizer, server: Mapping[str, Any]) -> Call:
    """A /v1/completions body."""
    if "prompt" not in body:
        raise ValueError("prompt is required")
    if _get(body, "echo", bool, False):
        raise ValueError("echo is not supported (prompt log-probabilities are not computed)")
    logprobs = _get(body, "logprobs", int, None)
    options = _options(body, [tokenizer.eos_id] if tokenizer.eos_id is not None else [], server)
    max_tokens = _get(body, "max_tokens", int, 16)
    requests = tuple(Request(p, max_tokens=max_tokens, logprobs=logprobs, **options)
                     for p in _prompts(body["prompt"], tokenizer))
    return Call(requests, _stop_strings(body), _get(body, "stream", bool, False), logprobs)


def _enable_thinking(body: Mapping) -> bool | None:
    """`chat_template_kwargs.enable_thinking` (the Thinking models' switch; None: the template's default)."""
    kwargs = _get(body, "chat_template_kwargs", dict, {})
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise ValueError(f"chat_template_kwargs: only enable_thinking is supported, got {unknown}")
    return _get(kwargs, "enable_thinking", bool, None)


class ChatFormat(NamedTuple):
    """How a model's chats are rendered, read once from its tokenizer directory: the chat template (None:
    ChatML), the special tokens it may name, and the token ids a reply stops at (generation config's eos)."""

    tokenizer_dir: PathLike | None
    template: str | None
    specials: dict[str, str]
    stop_ids: tuple[int, ...]


def chat_format(tokenizer, tokenizer_dir: PathLike | None = None) -> ChatFormat:
    template, specials = load_chat_template(tokenizer_dir)
    return ChatFormat(tokenizer_dir, template, specials, tuple(stop_token_ids(tokenizer, tokenizer_dir, chat=True)))


def chat_ids(tokenizer, messages, chat: ChatFormat, enable_thinking: bool | None = None) -> tuple[int, ...]:
    """The prompt of a chat: the messages rendered by the model's own chat template (ChatML without one),
    ready for the reply, as `ouro-generate --chat` renders it."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    plain = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]
    return tuple(encode_chat_prompt(tokenizer, plain, chat.tokenizer_dir, template=chat.template,
                                    specials=chat.specials, add_generation_prompt=True,
                                    enable_thinking=enable_thinking))


def parse_chat(body: Mapping, tokenizer, server: Mapping[str, Any], chat: ChatFormat) -> Call:
    """A /v1/chat/completions body, rendered in the model's `chat` format."""
    prompt = chat_ids(tokenizer, body.get("messages"), chat, _enable_thinking(body))
    logprobs = _get(body, "top_logprobs", int, 0) if _get(body, "logprobs", bool, False) else None
    options = _options(body, chat.stop_ids, server)
    max_tokens = _get(body, "max_completion_tokens", int, None) or _get(body, "max_tokens", int, None)
    max_tokens = max_tokens or server["context"] - len(prompt)
    return Call((Request(prompt, max_tokens=max_tokens, logprobs=logprobs, **options),), _stop_strings(body),
                _get(body, "stream", bool, False), logprobs)


def envelope(kind: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """A response (or stream chunk) object around `choices`."""
    out = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
           "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out
