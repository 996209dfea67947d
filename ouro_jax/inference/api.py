"""The host API: `generate` checks its arguments, pads the prompts, runs the compiled program
(`loop.generate_program`: prefill, then the decode loop) and returns a `GenerationResult`.

One compiled program generates a whole batch: the prompt (left-padded to a power-of-two bucket) runs
through every recurrent step at once and fills the cache; then a `lax.while_loop` over generated
tokens feeds one token per row per iteration. Shapes depend only on (batch, prompt bucket, cache
length, depth, policy, exit mode, draft settings): other prompts in the bucket, `max_new_tokens`, the
sampling settings, q and the seed are traced values and reuse the compiled program.

Exit modes (Q-exit threshold q; q >= 1 always runs the full depth, and then both modes are identical):

- `early`:  compute-saving. Each token's recurrent steps run in a `lax.while_loop` that ends as soon as
            every live row has reached CDF >= q; an exited row's K/V fills its deeper slots (`full`).
- `select`: the released `generate(exit_threshold=q)`, token for token. Every step runs for every
            token and fills its own cache slot; q only picks, per token, the step whose logits are used.

Self-speculative decoding (`draft_tokens=k > 0`): the model at `draft_depth` steps drafts k tokens
one at a time, then all `depth` steps verify the k + 1 fed tokens in one chunked pass over the cache
(`Ouro.step` on a chunk of queries) and write their K/V. The longest agreeing prefix is kept, plus the
verifier's own next token, under the rejection rule of speculative sampling, so the output is that
of the `select` mode (greedy: identical tokens; sampling: the same distribution). Only the `full`
policy admits a parallel verification (see `check_speculative`).

Depth beyond the trained T extrapolates: the model runs `depth` steps everywhere (prefill too), as
the released code does with `total_ut_steps = depth`; the `full` cache then has `depth` slots and the
exit rule uses the `depth`-step exit distribution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ouro_jax import validate
from ouro_jax.config import OuroConfig
from ouro_jax.inference import stream as streaming
from ouro_jax.inference.cache import KVCache, cache_bytes, check_policy
from ouro_jax.inference.loop import generate_program
from ouro_jax.inference.sampling import SamplingParams
from ouro_jax.inference.settings import (
    EXIT_MODES,
    Inputs,
    Setup,
    cache_positions,
    check_speculative,
    default_cache_length,
    prompt_bucket,
    resolve_exit_threshold,
)
from ouro_jax.inference.stream import StreamCallback

_STOP_IDS_WIDTH = 8  # stop ids are padded to a multiple of this, so their count rarely recompiles


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: np.ndarray              # [B, G] generated ids, G = max_new_tokens; pad id after a row stops
    lengths: np.ndarray             # [B] tokens generated per row, a stop token included
    depths: np.ndarray              # [B, G] recurrent step whose output produced each token (0 = none)
    decode_steps: int               # recurrent-step iterations the decode loops ran (for the whole batch)
    decode_layer_applications: int  # decode_steps * N: layer-stack applications actually executed in decode
    cache_bytes: int
    prompt_bucket: int
    cache_length: int
    exit_mode: str = "early"
    draft_rounds: int = 0             # speculative rounds (one draft + one verification each)
    drafted_tokens: int = 0           # draft tokens proposed to live rows
    accepted_tokens: int = 0          # of those, accepted by each row's own verification
    drafted_per_row: np.ndarray | None = None   # [B] draft tokens proposed to each row while it was live
    accepted_per_row: np.ndarray | None = None  # [B] of those, accepted by the row's verification
    logits: np.ndarray | None = None  # [B, G, V] float32 logits that produced each token
    cache: KVCache | None = None      # the final cache, [slots, N, B, L, KVH, hd]

    @property
    def mean_depth(self) -> float:
        """Mean realized (early) or selected (select) depth over the generated tokens."""
        valid = self.depths > 0
        return float(self.depths[valid].mean()) if valid.any() else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the drafted tokens that were accepted (0 without speculation)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def row_acceptance_rates(self) -> np.ndarray:
        """[B] each row's fraction of its drafted tokens accepted (0 where none were drafted)."""
        if self.drafted_per_row is None:
            return np.zeros(len(self.tokens))
        return self.accepted_per_row / np.maximum(self.drafted_per_row, 1)

    def rows(self) -> list[list[int]]:
        """The generated ids of each row, without the padding after a stop."""
        return [self.tokens[b, :n].tolist() for b, n in enumerate(self.lengths)]





def _validate_prompts(cfg: OuroConfig, prompts) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = np.asarray(prompts)
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2:
            raise ValueError(f"prompts must be a list of id lists or a [B, S] array, got shape {prompts.shape}")
        prompts = prompts.tolist()
    rows = [list(p) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    return [validate.prompt_ids(f"prompt {b}", row, cfg.vocab_size) for b, row in enumerate(rows)]


def _check_fits(cfg: OuroConfig, params, policy: str, depth: int, batch: int, cache_length: int, bucket: int) -> None:
    """Refuses a generation whose weights + KV cache + prefill activations exceed one device's memory."""
    weights = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    prefill = 4 * batch * bucket * (cfg.vocab_size + 4 * cfg.intermediate_size)  # float32 logits and MLP activations
    validate.fits_memory(f"generating {batch} x {cache_length} positions",
                         weights + cache_bytes(cfg, policy, depth, batch, cache_length) + prefill)


def _make_inputs(cfg: OuroConfig, rows: list[list[int]], bucket: int, max_new_tokens: int, seed: int,
                 sampling: SamplingParams, q: float, stop_token_ids: Sequence[int], stream_id: int) -> Inputs:
    ids = np.full((len(rows), bucket), cfg.pad_token_id, np.int32)
    for b, row in enumerate(rows):
        ids[b, bucket - len(row):] = row
    width = _STOP_IDS_WIDTH * max(1, -(-len(stop_token_ids) // _STOP_IDS_WIDTH))
    stops = np.full((width,), -1, np.int32)
    stops[:len(stop_token_ids)] = list(stop_token_ids)
    inputs = Inputs(jnp.asarray(ids), jnp.asarray([len(r) for r in rows], jnp.int32), jnp.int32(max_new_tokens),
                    jnp.uint32(seed), sampling, jnp.float32(q), jnp.asarray(stops), jnp.int32(stream_id))
    chex.assert_shape([inputs.prompt_ids, inputs.prompt_lengths], [(len(rows), bucket), (len(rows),)])
    chex.assert_type([inputs.prompt_ids, inputs.prompt_lengths, inputs.stop_ids], jnp.int32)
    chex.assert_rank([inputs.max_new_tokens, inputs.seed, inputs.exit_threshold, *sampling], 0)
    return inputs


def generate(cfg: OuroConfig, params: dict[str, Any], prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, policy: str = "full", depth: int | None = None,
             exit_threshold: float | None = None, exit_mode: str = "early", draft_tokens: int = 0,
             draft_depth: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_token_ids: Sequence[int] = (), cache_length: int | None = None,
             stream: StreamCallback | None = None, return_logits: bool = False, return_cache: bool = False,
             min_bucket: int = 8) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens after each prompt (a ragged batch, left-padded).

    policy: KV-cache policy at decode (`full`, `last`, `first`, `average`); depth: recurrent steps
    (default T; more than T extrapolates); exit_threshold: Q-exit q (default the config's, 1.0 = off);
    exit_mode: `early` (stop looping at the exit step, saves compute) or `select` (run every step,
    pick the exit step's logits: the released generate); draft_tokens k > 0: self-speculative
    decoding, drafting k tokens at `draft_depth` steps and verifying them at `depth` (lossless; `full`
    policy). temperature 0 is greedy; a row stops after any of `stop_token_ids`. cache_length
    defaults to the power-of-two bucket of prompt bucket + max_new_tokens - 1 (+ k); fix it to reuse one
    compiled program across calls with other lengths.
    """
    rows = _validate_prompts(cfg, prompts)
    check_policy(policy)
    depth = validate.num_steps(cfg.total_ut_steps if depth is None else depth, "depth")
    q = resolve_exit_threshold(cfg, exit_threshold)
    if exit_mode not in EXIT_MODES:
        raise ValueError(f"unknown exit_mode {exit_mode!r}; choose from {EXIT_MODES}")
    check_speculative(policy, exit_mode, q, depth, draft_tokens, draft_depth)
    max_new_tokens = validate.positive("max_new_tokens", max_new_tokens)
    seed = validate.seed(seed)
    validate.token_ids("stop_token_ids", stop_token_ids, cfg.vocab_size)
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    bucket = prompt_bucket(longest, min_bucket)
    needed = cache_positions(bucket, max_new_tokens, draft_tokens)
    if cache_length is None:
        cache_length = default_cache_length(longest, max_new_tokens, min_bucket, draft_tokens)
    elif needed > cache_length:
        chunk = f" + draft_tokens ({draft_tokens})" if draft_tokens else ""
        raise ValueError(f"prompt (bucketed to {bucket} tokens) + max_new_tokens ({max_new_tokens}){chunk} needs "
                         f"{needed} cache positions, beyond cache_length ({cache_length})")

    _check_fits(cfg, params, policy, depth, len(rows), int(cache_length), bucket)
    setup = Setup(cfg, policy, depth, int(cache_length), exit_mode if q < 1.0 else "early", int(draft_tokens),
                  int(draft_depth) if draft_tokens else 1, return_logits, return_cache, stream is not None)
    stream_id = streaming.register(stream)
    try:
        inputs = _make_inputs(cfg, rows, bucket, max_new_tokens, seed, SamplingParams.make(temperature, top_k, top_p),
                              q, stop_token_ids, stream_id)
        out = generate_program(params, inputs, setup=setup)
        cache = out.cache                     # stays on the device
        out = jax.device_get(out._replace(cache=None))
    finally:
        streaming.unregister(stream_id)

    chex.assert_shape([out.tokens, out.depths], (len(rows), cache_length - bucket + 1 + draft_tokens))
    tokens, depths = out.tokens[:, :max_new_tokens], out.depths[:, :max_new_tokens]
    return GenerationResult(
        tokens=tokens, lengths=(depths > 0).sum(axis=1), depths=depths, decode_steps=int(out.decode_steps),
        decode_layer_applications=int(out.decode_steps) * cfg.num_hidden_layers,
        cache_bytes=cache_bytes(cfg, policy, depth, len(rows), int(cache_length)), prompt_bucket=bucket,
        cache_length=int(cache_length), exit_mode=exit_mode, draft_rounds=int(out.rounds),
        drafted_tokens=int(out.drafted.sum()), accepted_tokens=int(out.accepted.sum()),
        drafted_per_row=out.drafted, accepted_per_row=out.accepted,
        logits=None if out.logits is None else out.logits[:, :max_new_tokens], cache=cache)
