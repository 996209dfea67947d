"""The HTTP API (FastAPI): /v1/completions, /v1/chat/completions, /v1/models, /health.

Handlers parse a body into scheduler requests (`protocol`), submit them and turn the scheduler's
events into an OpenAI response or an SSE stream. A bad request is answered 400 with one line, a full
queue 429, a stopped scheduler 503, a timed-out request 504; a client that disconnects frees its slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ouro_jax.errors import one_line
from ouro_jax.serve.events import Finished, QueueFull, Token
from ouro_jax.serve.protocol import Call, ChatFormat, envelope, parse_chat, parse_completion
from ouro_jax.serve.scheduler import Scheduler
from ouro_jax.serve.text import TextStream, decode


@dataclasses.dataclass
class Server:
    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    defaults: dict[str, Any]   # policy, exit_threshold, timeout, context: what a request gets unless it says
    chat: ChatFormat   # the model's chat template and its reply's stop ids, read once


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class Run:
    """One prompt's generation: the scheduler's events as text pieces, tokens and log-probabilities."""

    def __init__(self, server: Server, request, stop, http: HTTPRequest):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.http, self.tokens, self.finish = http, [], None
        try:
            self.handle = server.scheduler.submit(request, lambda e: loop.call_soon_threadsafe(self.events.put_nowait,
                                                                                               e))
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error") from None
        self.text = TextStream(server.tokenizer, stop, skip_ids=self.handle.request.stop_ids)   # checked ids

    async def pieces(self) -> AsyncIterator[tuple[str, Token | None]]:
        """(new text, token) as tokens arrive; a last ("", None) with the rest of the text when it ends."""
        try:
            while self.finish is None:
                try:
                    event = await asyncio.wait_for(self.events.get(), timeout=1.0)
                except TimeoutError:
                    if await self.http.is_disconnected():
                        return
                    continue
                if isinstance(event, Token):
                    self.tokens.append(event)
                    text = self.text.push(event.id)
                    if self.text.stopped:
                        self.handle.cancel()
                        self.finish = "stop"
                    yield text, event
                else:
                    self._finished(event)
            yield self.text.finish(), None
        finally:
            self.handle.cancel()   # frees the slot of a client that went away (no-op once finished)

    def _finished(self, event: Finished) -> None:
        if event.reason == "timeout":
            raise ApiError(504, "the request timed out before it finished; raise its timeout or max_tokens less",
                           "timeout")
        if event.reason == "error":
            raise ApiError(500, f"generation failed: {event.message}", "server_error")
        self.finish = "stop" if event.reason in ("stop", "cancelled") else event.reason


def _mean_depth(tokens: list[Token]) -> float:
    return sum(t.depth for t in tokens) / len(tokens) if tokens else 0.0


def _logprobs(server: Server, tokens: list[Token], chat: bool) -> dict | None:
    text = lambda i: decode(server.tokenizer, [i])
    if chat:
        return {"content": [{"token": text(t.id), "logprob": t.logprob,
                             "top_logprobs": [{"token": text(i), "logprob": p} for i, p in t.top]}
                            for t in tokens]}
    return {"tokens": [text(t.id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text(i): p for i, p in t.top} for t in tokens]}


def _choice(server: Server, call: Call, index: int, text: str, tokens: list[Token], finish, key: str) -> dict:
    """A choice with its text under `key`: "text" (completions), "message" or "delta" (chat)."""
    choice = {"index": index, "finish_reason": finish,
              "ouro": {"mean_depth": _mean_depth(tokens), "token_ids": [t.id for t in tokens]},
              "logprobs": _logprobs(server, tokens, key != "text") if call.logprobs is not None else None}
    choice[key] = text if key == "text" else {"role": "assistant", "content": text}
    return choice


def _submit(server: Server, call: Call, http: HTTPRequest) -> list[Run]:
    runs = []
    try:
        for request in call.requests:
            runs.append(Run(server, request, call.stop, http))
    except ApiError:
        for run in runs:
            run.handle.cancel()
        raise
    return runs


async def _answer(server: Server, call: Call, runs: list[Run], kind: str) -> dict:
    async def collect(run: Run) -> str:
        return "".join([text async for text, _ in run.pieces()])

    texts = await asyncio.gather(*(collect(run) for run in runs))
    key = "message" if kind == "chat.completion" else "text"
    choices = [_choice(server, call, i, text, run.tokens, run.finish, key)
               for i, (text, run) in enumerate(zip(texts, runs))]
    completion = sum(len(run.tokens) for run in runs)
    prompt = sum(len(r.prompt) for r in call.requests)
    return envelope(kind, server.model_name, choices, {"prompt_tokens": prompt, "completion_tokens": completion,
                                                       "total_tokens": prompt + completion})


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(server: Server, call: Call, runs: list[Run], kind: str) -> AsyncIterator[bytes]:
    key = "delta" if kind == "chat.completion.chunk" else "text"
    try:
        for index, run in enumerate(runs):
            async for text, token in run.pieces():
                if text or token is not None:
                    yield _sse(envelope(kind, server.model_name, [_choice(server, call, index, text,
                                                                          [token] if token else [], None, key)]))
            yield _sse(envelope(kind, server.model_name, [_choice(server, call, index, "", [], run.finish, key)]))
    except ApiError as e:
        yield _sse({"error": {"message": str(e), "type": e.kind, "code": e.status}})
    except Exception as e:  # the response has started: the error goes into the stream
        yield _sse({"error": {"message": f"internal error: {type(e).__name__}: {one_line(e)}",
                              "type": "server_error", "code": 500}})
    finally:
        for run in runs:
            run.handle.cancel()
    yield _sse("[DONE]")


async def _body(http: HTTPRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


async def _generate(server: Server, http: HTTPRequest, chat: bool):
    if not server.scheduler.running:
        raise ApiError(503, "the server is shutting down or not started; retry later", "unavailable")
    body = await _body(http)
    call = (parse_chat(body, server.tokenizer, server.defaults, server.chat) if chat
            else parse_completion(body, server.tokenizer, server.defaults))
    runs = _submit(server, call, http)
    kind = "chat.completion" if chat else "text_completion"
    if call.stream:
        return StreamingResponse(_stream(server, call, runs, kind + (".chunk" if chat else "")),
                                 media_type="text/event-stream")
    return await _answer(server, call, runs, kind)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="ouro-serve")

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e.status, str(e), e.kind)

    @app.exception_handler(ValueError)
    async def bad_request(_, e: ValueError):
        return _error(400, one_line(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {one_line(e)}", "server_error")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await _generate(server, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await _generate(server, http, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "ouro_jax",
                                            "max_model_len": server.defaults["context"]}]}

    @app.get("/health")
    async def health():
        scheduler = server.scheduler
        layers = scheduler.setup.cfg.num_hidden_layers
        stats = scheduler.stats
        return {"status": "ok" if scheduler.running else "stopped", **scheduler.load(),
                "counters": {**dataclasses.asdict(stats), "finished": dict(stats.finished)},
                "layer_applications_per_token": stats.layer_applications_per_token(layers)}

    return app
