"""Inference: KV-cache policies, prefill/decode with early exit, sampling."""

from ouro_jax.inference.cache import POLICIES, KVCache, cache_bytes
from ouro_jax.inference.engine import (GenerationResult, default_cache_length, generate, prompt_bucket,
                                       resolve_exit_threshold, trace_count)
from ouro_jax.inference.sampling import SamplingParams, filter_logits, sample_tokens

__all__ = ["POLICIES", "GenerationResult", "KVCache", "SamplingParams", "cache_bytes", "default_cache_length",
           "filter_logits", "generate", "prompt_bucket", "resolve_exit_threshold", "sample_tokens", "trace_count"]
