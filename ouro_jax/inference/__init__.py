"""Inference: KV-cache policies, prefill/decode with early exit or exact selection, self-speculative
decoding, sampling. `generate` is the library entry point.

Modules: `api` (the host API `generate`), `loop` (the compiled program), `prefill`, `decode` (one
token's recurrent steps, one generated position), `speculative`, `slots` (prefill and the decode step
on a fixed set of cache rows, for serving), `sampling`, `cache`, `settings`, `stream`."""

from ouro_jax.inference.api import GenerationResult, generate
from ouro_jax.inference.cache import POLICIES, KVCache, cache_bytes
from ouro_jax.inference.sampling import SamplingParams, filter_logits, sample_tokens, speculative_accept, token_probs
from ouro_jax.inference.settings import (
    EXIT_MODES,
    check_speculative,
    default_cache_length,
    prompt_bucket,
    resolve_exit_threshold,
)

__all__ = ["EXIT_MODES", "POLICIES", "GenerationResult", "KVCache", "SamplingParams", "cache_bytes",
           "check_speculative", "default_cache_length", "filter_logits", "generate", "prompt_bucket",
           "resolve_exit_threshold", "sample_tokens", "speculative_accept", "token_probs"]
