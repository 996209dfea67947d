"""AOT compilation of the serving programs for a v6e-4 (libtpu describes the topology; no TPU needed)."""

import pytest

from ouro_jax import config as presets
from ouro_jax.serve.aot import compile_serve_programs


@pytest.mark.aot
def test_serve_programs_compile_for_v6e_and_the_cache_dominates_memory():
    cfg = presets.tiny().with_execution(dtype="bfloat16", param_dtype="bfloat16")
    mesh = {"data": 1, "fsdp": 1, "tensor": 4}
    small, large = (compile_serve_programs(cfg, "v6e:2x2", mesh, slots=8, cache_length=length, prefill_chunk_size=64)
                    for length in (256, 1024))
    assert [r.program for r in small] == ["decode_step", "prefill_chunk(64)", "commit_prefill"]
    assert all(r.fits and r.hbm_bytes == 32 * 2**30 and r.bytes_per_chip > 0 for r in small + large)
    cache_per_chip = 2 * 4 * cfg.num_hidden_layers * 8 * (1024 - 256) * cfg.num_key_value_heads // 4 * cfg.head_dim * 2
    assert large[0].bytes_per_chip - small[0].bytes_per_chip >= cache_per_chip   # the cache (in and out) per chip
    assert "fits" in str(large[0])
