"""The roofline estimate: the loop correction (fitted from unrolled T, N in {1, 2} compiles) reproduces the
cost of a directly compiled loop-free program at other T and N, and the estimate is labelled and sane."""

import numpy as np
import pytest
from test_aot import _config

from ouro_jax.train import aot, roofline


@pytest.mark.aot
@pytest.mark.slow  # six AOT compiles (~1.5 min here)
def test_fitted_cost_matches_an_unrolled_compile_and_the_estimate_is_labelled():
    config = _config(data=1, fsdp=-1, tensor=1)
    config.model.update(total_ut_steps=3, num_hidden_layers=3)
    fitted = roofline.fitted_cost(config, "v5p:2x2x1", batch_per_chip=1)
    direct = roofline.program_cost(aot.compile_program(roofline.unrolled_variant(config, 3, 3), "v5p:2x2x1", 1)[0])
    # FLOPs fit within 3%; bytes and collectives within 10% (XLA fuses a larger program differently)
    np.testing.assert_allclose(fitted.flops, direct.flops, rtol=0.03)
    np.testing.assert_allclose(fitted.as_array()[1:], direct.as_array()[1:], rtol=0.1)
    rolled = roofline.program_cost(aot.compile_program(config, "v5p:2x2x1", 1)[0])
    assert rolled.flops < 0.8 * fitted.flops  # the scans' bodies counted once: what the fit corrects
    assert fitted.collective_bytes > 0  # FSDP gathers

    estimate = roofline.Roofline("v5p:2x2x1", 4, 64, fitted, 1e9, roofline.CHIP_PEAKS["v5p"])
    assert str(estimate).startswith("ESTIMATE") and "MFU <=" in str(estimate)
    assert estimate.step_seconds == max(estimate.times.values()) and 0 < estimate.mfu


def test_collective_bytes_reads_result_shapes():
    hlo = ("ENTRY %main (p: f32[8]) -> f32[8] {\n  %ag = bf16[4,64]{1,0} all-gather(%x), dimensions={0}\n"
           "  %ars = (f32[8]{0}, f32[32]{0}) all-reduce-start(%y)\n  %d = f32[32]{0} all-reduce-done(%ars)\n"
           '  %s = (bf16[2,128]{1,0}, u32[], token[]) send(%z, %t), frontend_attributes={_xla_host_transfer_handler_'
           'name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}\n}\n')
    assert roofline.collective_bytes(hlo) == (4 * 64 * 2 + 32 * 4, 2 * 128 * 2)


def test_dcn_bytes_are_timed_at_the_dcn_bandwidth():
    cost = roofline.Cost(flops=1e12, bytes=1e9, collective_bytes=1e8, dcn_bytes=1e9)
    estimate = roofline.Roofline("2 x v5p:2x2x1", 8, 4096, cost, 1e12, roofline.CHIP_PEAKS["v5p"])
    assert estimate.times["dcn"] == 1e9 / (50e9 / 8)  # 50 Gbps per v5p chip
    assert estimate.step_seconds == estimate.times["dcn"] and "dcn-bound" in str(estimate)
    assert "953.7 MiB across slices" in str(estimate)
    with pytest.raises(ValueError, match="no published DCN bandwidth"):
        _ = roofline.Roofline("2 x v4:2x2x1", 8, 4096, cost, 1e12, roofline.CHIP_PEAKS["v4"]).times


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.parametrize("model", ["ouro_1p4b", "ouro_2p6b"])
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_stage1b_roofline(model, topology):
    import importlib.util
    import os

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", f"{model}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    estimate = roofline.roofline(module.get_config("stage1b"), topology, batch_per_chip=1)
    print(estimate)
    assert 0.05 < estimate.mfu < 1.0
