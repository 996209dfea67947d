"""Inference: KV-cache policies, prefill/decode with early exit or exact selection, self-speculative
decoding, sampling. `generate` is the library entry point."""

from ouro_jax.inference.cache import POLICIES, KVCache, cache_bytes
from ouro_jax.inference.engine import (
                                       EXIT_MODES,
                                       GenerationResult,
                                       check_speculative,
                                       default_cache_length,
                                       generate,
                                       prompt_bucket,
                                       resolve_exit_threshold,
)
from ouro_jax.inference.sampling import SamplingParams, filter_logits, sample_tokens, speculative_accept, token_probs

__all__ = ["EXIT_MODES", "POLICIES", "GenerationResult", "KVCache", "SamplingParams", "cache_bytes",
           "check_speculative", "default_cache_length", "filter_logits", "generate", "prompt_bucket",
           "resolve_exit_threshold", "sample_tokens", "speculative_accept", "token_probs"]
