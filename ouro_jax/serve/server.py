"""A running server: the model, its slots and scheduler, and uvicorn serving the app."""

from __future__ import annotations

import threading

import jax
import uvicorn
from jax.sharding import Mesh

from ouro_jax import sharding as shd
from ouro_jax import validate
from ouro_jax.config import OuroConfig
from ouro_jax.inference.cache import check_policy
from ouro_jax.inference.settings import resolve_exit_threshold
from ouro_jax.inference.slots import slot_setup
from ouro_jax.model import abstract_params
from ouro_jax.paths import PathLike
from ouro_jax.serve.app import Server, create_app
from ouro_jax.serve.protocol import chat_format
from ouro_jax.serve.scheduler import Scheduler


def cache_length(max_len: int, prefill_chunk: int) -> int:
    """Cache positions per slot for sequences of `max_len` tokens: + the reserved position, whole chunks."""
    return -(-(max_len + 1) // prefill_chunk) * prefill_chunk


def checked_shape(cfg: OuroConfig, slots, max_len, prefill_chunk, depth) -> tuple[int, int, int, int]:
    """(slots, max_len, prefill_chunk, depth) of a server, each checked (depth None: the model's T)."""
    depth = validate.num_steps(cfg.total_ut_steps if depth is None else depth, "depth")
    slots, prefill_chunk = validate.positive("slots", slots), validate.positive("prefill_chunk", prefill_chunk)
    max_len = validate.positions("max_len", validate.integer("max_len", max_len, 2), cfg.max_position_embeddings)
    return slots, max_len, prefill_chunk, depth


def build_server(cfg: OuroConfig, params, tokenizer, *, model_name: str, slots: int = 8, max_len: int = 2048,
                 prefill_chunk: int = 64, policy: str = "full", depth: int | None = None,
                 exit_threshold: float | None = None, timeout: float = 600.0, max_queue: int = 64,
                 compact: bool = True, mesh: Mesh | None = None, tokenizer_dir: PathLike | None = None) -> Server:
    """A server (not yet started) for `slots` sequences of up to `max_len` tokens each (prompt and
    generated); a request's depth may be at most `depth` (default T), its KV policy is `policy`.
    On a `mesh` the weights are sharded by the model's logical axes and the cache's slots over
    ('data', 'fsdp'), its KV heads over 'tensor'. Chats are rendered by `tokenizer_dir`'s chat template
    (ChatML without one) and also stop at its generation config's eos ids."""
    check_policy(policy)
    slots, max_len, prefill_chunk, depth = checked_shape(cfg, slots, max_len, prefill_chunk, depth)
    max_queue = validate.positive("max_queue", max_queue)
    timeout = validate.number("timeout", timeout, 0.0, low_open=True, what=" seconds")
    setup = slot_setup(cfg, policy, depth, slots, cache_length(max_len, prefill_chunk), compact, mesh)
    if mesh is not None:
        params = jax.device_put(params, shd.tree_shardings(abstract_params(cfg), mesh))
    scheduler = Scheduler(params, setup, prefill_chunk=prefill_chunk, max_queue=max_queue)
    defaults = dict(policy=policy, exit_threshold=resolve_exit_threshold(cfg, exit_threshold), timeout=timeout,
                    context=max_len)
    return Server(scheduler, tokenizer, model_name, defaults, chat_format(tokenizer, tokenizer_dir))


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,tensor=4' (unnamed axes are 1) or '2,1,4' ('data', 'fsdp', 'tensor') -> axis sizes."""
    try:
        if "=" not in text:
            return dict(zip(shd.MESH_AXES, (int(v) for v in text.split(",")), strict=True))
        sizes = {name.strip(): int(size) for name, size in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"mesh must look like 'data=2,tensor=4' or '2,1,4', got {text!r}") from None
    unknown = set(sizes) - set(shd.MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {shd.MESH_AXES}")
    return {axis: sizes.get(axis, 1) for axis in shd.MESH_AXES}


class Running:
    """A started server on host:port (uvicorn in a thread); `close()` stops both."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        self.server = server
        server.scheduler.start()
        config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning", lifespan="off")
        self.http = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.http.run, name="ouro-serve-http", daemon=True)
        self.thread.start()
        while not self.http.started:
            if not self.thread.is_alive():
                raise OSError(f"the HTTP server did not start on {host}:{port}")
            self.thread.join(timeout=0.05)
        self.port = self.http.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{self.port}"

    def close(self) -> None:
        self.http.should_exit = True
        self.thread.join(timeout=30)
        self.server.scheduler.stop()
