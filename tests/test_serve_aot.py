"""AOT compilation of the serving programs for a v6e-4 (libtpu describes the topology; no TPU needed)."""

import pytest

from ouro_jax import config as presets
from ouro_jax.cli import serve as cli
from ouro_jax.serve.aot import compile_serve_programs, serve_memory


@pytest.mark.aot
@pytest.mark.slow   # six compiles; the CLI test below is the default suite's AOT representative
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
    refused = compile_serve_programs(cfg, "v6e:2x2", mesh, slots=8192, cache_length=8192, prefill_chunk_size=64)
    assert not refused[0].fits and "DOES NOT FIT: RESOURCE_EXHAUSTED" in str(refused[0])   # 128 GiB of cache


def test_serve_memory_is_weights_plus_the_caches():
    cfg = presets.tiny().with_execution(dtype="bfloat16", param_dtype="bfloat16")
    memory = serve_memory(cfg, slots=16, cache_length=256, policy="last")
    d, v, n, m = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
    layer = 4 * d * d + 3 * d * m + 4 * d   # q k v o (4 heads x 16 = d), gate up down, four norms
    assert memory.weights == 2 * (2 * v * d + n * layer + d + d + 1)   # embed, lm_head, layers, final norm, gate
    assert memory.cache == 2 * 1 * n * 16 * 256 * d * 2                # K and V, one shared slot (last)
    assert memory.scratch == 2 * 4 * n * 1 * 256 * d * 2               # one row, a slot per step
    assert memory.total == memory.weights + memory.cache + memory.scratch and "arithmetic" in str(memory)


@pytest.mark.aot
def test_ouro_serve_aot_prints_the_memory_per_chip(capsys):
    status = cli.main(["--aot", "v6e:2x2", "--model", "tiny", "--slots", "8", "--max-len", "127", "--prefill-chunk",
                       "32", "--policy", "last", "--mesh", "tensor=4"])
    out = capsys.readouterr().out.splitlines()
    assert status == 0 and out[0].startswith("tiny (bfloat16), one device: weights ") and "arithmetic" in out[0]
    assert [line.split(" on ")[0] for line in out[1:]] == ["decode_step", "prefill_chunk(32)", "commit_prefill"]
    assert all("v6e:2x2 {'data': 1, 'fsdp': 1, 'tensor': 4}: 8 slots x 128 (last)" in line and line.endswith("fits")
               for line in out[1:])


@pytest.mark.aot
@pytest.mark.slow   # a 45 s compile (make test-all); the CLI test above is the default suite's AOT representative
def test_the_decode_step_keeps_the_cache_in_place_on_tpu():
    """Ouro-1.4B's layer shape (16 KV heads of 128, 4 per chip), 8 layers, 64 slots: the decode step's
    temporaries stay a fraction of its cache (gathers / scatters over rows made XLA copy the whole cache into
    another layout: 2.5x the cache in temporaries, which kept Ouro-2.6B at 64 x 4K off a v6e-4)."""
    cfg = presets.ouro_1p4b(num_hidden_layers=8).with_execution(dtype="bfloat16", param_dtype="bfloat16")
    decode = compile_serve_programs(cfg, "v6e:2x2", {"data": 1, "fsdp": 1, "tensor": 4}, slots=64, cache_length=2048,
                                    policy="last", prefill_chunk_size=256, programs=("decode_step",))[0]
    cache_per_chip = serve_memory(cfg, slots=64, cache_length=2048, policy="last").cache // 4
    assert decode.fits and decode.temp_bytes < 0.3 * cache_per_chip, (decode.temp_bytes, cache_per_chip)
