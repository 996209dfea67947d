"""Ahead-of-time compilation of the train step for TPU topologies (libtpu, no TPU needed)."""

import pytest

from ouro_jax import aot
from ouro_jax.train_config import base_config, model_fields
from ouro_jax import config as presets


def _config(**mesh):
    c = base_config()
    c.model = model_fields(presets.tiny(dtype="bfloat16", remat_policy="full"))
    c.mesh.update(mesh)
    c.data.seq_len = 64
    c.train.ce_chunk_size = 32
    return c


def test_fsdp_train_step_compiles_for_v5p_and_reports_memory_and_collectives():
    report = aot.compile_train_step(_config(data=1, fsdp=-1, tensor=1), "v5p:2x2x1", batch_per_chip=2)
    assert report.chips == 4 and report.global_batch == 8
    assert 0 < report.bytes_per_chip < report.hbm_bytes and report.fits
    assert report.collectives["all-gather"] > 0      # FSDP gathers the sharded weights
    assert "fits" in str(report)


def test_data_parallel_train_step_compiles_for_v6e():
    report = aot.compile_train_step(_config(data=-1, fsdp=1, tensor=1), "v6e:2x2", batch_per_chip=1)
    assert report.chips == 4 and report.hbm_bytes == 32 * 2**30
    assert report.collectives["all-reduce"] > 0 and report.collectives["all-gather"] == 0


def test_unknown_generation_is_named():
    with pytest.raises(ValueError, match="unknown TPU generation 'v9x'"):
        aot.topology_devices("v9x:2x2")
