"""A generation request as the scheduler runs it, and the one place its values are checked."""

from __future__ import annotations

import dataclasses

from ouro_jax import validate
from ouro_jax.errors import ConfigError
from ouro_jax.inference.slots import TOP_LOGPROBS, SlotSetup


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate after `prompt` (token ids); the values are checked by `check_request`."""

    prompt: tuple[int, ...]
    max_tokens: int = 16
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    exit_threshold: float = 1.0    # Q-exit q; 1 = full depth
    depth: int | None = None       # recurrent steps; None = the server's depth
    logprobs: int | None = None    # None = none; n = the sampled token's and n alternatives
    timeout_s: float | None = None


def check_request(request: Request, setup: SlotSetup) -> Request:
    """Raises ConfigError (a ValueError; one line, naming the field) unless the server can run `request`;
    returns it with the ids as ints (stop ids without repeats) and the depth resolved. Each value is
    checked by its validator in `ouro_jax.validate`."""
    cfg, room = setup.cfg, setup.cache_length - 1
    prompt = tuple(validate.prompt_ids("prompt", request.prompt, cfg.vocab_size))
    stop_ids = tuple(dict.fromkeys(validate.token_ids("stop_token_ids", request.stop_ids, cfg.vocab_size)))
    validate.integer("max_tokens", request.max_tokens, 1, room + 1)
    if len(request.prompt) + request.max_tokens > room:
        raise ConfigError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                          f"the server's context of {room} tokens")
    validate.sampling(request.temperature, request.top_k, request.top_p)
    validate.seed(request.seed)
    validate.exit_threshold(request.exit_threshold)
    depth = validate.num_steps(setup.depth if request.depth is None else request.depth, "depth", setup.depth)
    if request.logprobs is not None:
        validate.integer("logprobs", request.logprobs, 0, TOP_LOGPROBS + 1)
    if request.timeout_s is not None:
        validate.number("timeout", request.timeout_s, 0.0, 24 * 3600.0, low_open=True)
    return dataclasses.replace(request, prompt=prompt, stop_ids=stop_ids, depth=depth)

