"""Ahead-of-time compilation of the train step for TPU topologies (libtpu, no TPU needed)."""

import pytest

from ouro_jax import config as presets
from ouro_jax.train import aot
from ouro_jax.train.config import base_config, model_fields


def _config(**mesh):
    c = base_config()
    c.model = model_fields(presets.tiny())
    c.execution.update(dtype="bfloat16", remat_policy="full")
    c.mesh.update(mesh)
    c.data.seq_len = 64
    c.train.ce_chunk_size = 32
    return c


def test_fsdp_train_step_compiles_for_v5p_and_gathers_the_weights_per_layer_or_once():
    per_layer = aot.compile_train_step(_config(data=1, fsdp=-1, tensor=1), "v5p:2x2x1", batch_per_chip=2)
    assert per_layer.chips == 4 and per_layer.global_batch == 8
    assert 0 < per_layer.bytes_per_chip < per_layer.hbm_bytes and per_layer.fits
    assert per_layer.collectives["all-gather"] > 0      # FSDP gathers the sharded weights
    assert "fits" in str(per_layer)
    assert per_layer.collectives_in_loops["all-gather"] > 0   # gathered inside the step and layer loops
    config = _config(data=1, fsdp=-1, tensor=1)
    config.train.gather_weights_once = True
    once = aot.compile_train_step(config, "v5p:2x2x1", batch_per_chip=2)
    assert once.collectives_in_loops["all-gather"] == 0 and once.collectives["all-gather"] > 0
    assert "in loops" in str(once)


@pytest.mark.slow  # make test-all; the default suite's TPU compile is the v5p FSDP one above
def test_data_parallel_train_step_compiles_for_v6e():
    report = aot.compile_train_step(_config(data=-1, fsdp=1, tensor=1), "v6e:2x2", batch_per_chip=1)
    assert report.chips == 4 and report.hbm_bytes == 32 * 2**30
    assert report.collectives["all-reduce"] > 0 and report.collectives["all-gather"] == 0


def test_two_v5p_slices_compile_with_the_gradient_all_reduce_across_dcn():
    config = _config(data=1, fsdp=-1, tensor=1)
    config.mesh.slices = 2
    report = aot.compile_train_step(config, "v5p:2x2x1", batch_per_chip=1)
    assert report.slices == 2 and report.chips == 8 and report.global_batch == 8 and report.fits
    assert report.dcn_collectives.get("all-reduce", 0) > 0 and report.dcn_bytes > 0  # the gradients, once
    assert "all-gather" not in report.dcn_collectives  # weights are whole across slices: nothing gathered
    assert report.collectives["all-gather"] > 0        # FSDP within each slice (ICI)
    assert str(report).startswith("2 x v5p:2x2x1: 8 chips") and "across slices (DCN): all-reduce x" in str(report)


def test_device_groups_and_collectives_across_slices_from_hlo_text():
    assert aot.device_groups("replica_groups={{0,1},{2,3}}, dimensions={0}") == [[0, 1], [2, 3]]
    assert aot.device_groups("replica_groups=[2,4]<=[8], to_apply=%add") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert aot.device_groups("replica_groups=[4,2]<=[2,4]T(1,0), x") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert aot.device_groups("replica_groups={}, to_apply=%add", devices=4) == [[0, 1, 2, 3]]
    assert aot.device_groups("source_target_pairs={{0,4},{4,0}}") == [[0, 4], [4, 0]]
    hlo = ("ENTRY %main (p: f32[8]) -> f32[8] {\n"
           "  %ag = bf16[4,64]{1,0} all-gather(%x), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}\n"
           "  %ar = f32[32]{0} all-reduce(%y), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add\n"
           '  %s = (bf16[2,128]{1,0}, u32[], token[]) send(%z, %t), is_host_transfer=true, frontend_attributes='
           '{_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}\n}\n')
    ops = aot.collectives(hlo, slice_size=4, devices=8)
    assert [(c.op, c.bytes, c.dcn) for c in ops] == [("all-gather", 512, False), ("all-reduce", 128, True),
                                                     ("all-reduce", 512, True)]


def test_dcn_all_reduce_is_found_in_a_cpu_program_over_two_slices():
    from ouro_jax import sharding as shd
    from ouro_jax.train.step import build_train_program

    config = _config(data=1, fsdp=2, tensor=2)
    config.mesh.slices = 2
    config.execution.dtype = "float32"
    config.data.update(seq_len=32, batch_size=8)
    program = build_train_program(config, shd.make_mesh(dict(config.mesh)), {"xla_backend_optimization_level": 0})
    hlo = program.step.lower(program.abstract_state, program.abstract_batch).compile().as_text()
    ops = aot.collectives(hlo, slice_size=4, devices=8)
    assert any(c.op == "all-reduce" and c.dcn for c in ops)  # the gradients, summed over the slices
    assert any(c.op == "all-gather" and not c.dcn for c in ops)  # FSDP within a slice


def test_unknown_generation_is_named():
    with pytest.raises(ValueError, match="unknown TPU generation 'v9x'"):
        aot.topology_devices("v9x:2x2")


@pytest.mark.slow   # trains twice on 8 devices (make test-all); its compiled form is checked above
def test_gather_weights_once_trains_identically_on_8_devices():
    import jax
    import numpy as np

    from ouro_jax import sharding as shd
    from ouro_jax.train.step import build_train_program

    batch_rng = np.random.default_rng(0)
    ids = batch_rng.integers(3, 128, (8, 33), dtype=np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((8, 32), np.int32),
             "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1)), "loss_mask": np.ones((8, 32), np.float32)}
    results = []
    for once in (False, True):
        config = _config(data=1, fsdp=-1, tensor=1)
        config.execution.dtype = "float32"
        config.data.update(seq_len=32, batch_size=8)
        config.train.gather_weights_once = once
        mesh = shd.make_mesh(dict(config.mesh))
        program = build_train_program(config, mesh)
        state = program.init(jax.random.key(0))
        for _ in range(2):
            state, metrics = program.step(state, shd.global_batch(batch, mesh))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][1], results[1][1])


@pytest.mark.aot
def test_pallas_kernels_lower_for_v5p_inside_the_scans_with_remat_and_fsdp():
    c = base_config()
    c.model = model_fields(presets.tiny(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64))
    c.execution.update(dtype="bfloat16", remat_policy="save_proj", attention_impl="pallas", cross_entropy_impl="pallas")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.seq_len = 128
    report = aot.compile_train_step(c, "v5p:2x2x1", batch_per_chip=1)
    assert report.fits and report.collectives["all-gather"] > 0


def test_out_of_memory_is_one_line():
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "Used 123.4G of 95.74G hbm.")
    assert aot._needs(message) == "123.4G of 95.74G"
