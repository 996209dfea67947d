"""Meshes, logical rules, state shardings, and a (2,2,2) mesh of 8 CPU devices matching 1 device; two
slices (a 'dcn' axis) of 4 devices matching 1 device."""

import subprocess

import jax
import numpy as np
import pytest
from helpers import FAST_COMPILE, PYTHON, REPO, random_batch, reference_run, subprocess_env, tiny_train_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ouro_jax import sharding as shd
from ouro_jax.errors import ConfigError
from ouro_jax.model import Ouro, init_params
from ouro_jax.train.config import model_config
from ouro_jax.train.step import build_train_program


def test_make_mesh_sizes_and_errors():
    assert dict(shd.make_mesh(dict(data=-1, fsdp=2, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(shd.ShardingError, match="needs 12 devices, 8 available"):
        shd.make_mesh((3, 2, 2))
    with pytest.raises(shd.ShardingError, match="not divisible"):
        shd.make_mesh((-1, 3, 1))
    with pytest.raises(shd.ShardingError, match="at most one -1"):
        shd.make_mesh((-1, -1, 1))


def test_logical_specs_replicate_undivisible_dimensions():
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.logical_spec(("embed", "mlp"), (64, 176), mesh) == P("fsdp", "tensor")
    assert shd.logical_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
    assert shd.logical_spec(("layers", "norm"), (3, 64), mesh) == P(None, None)
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert shd.logical_spec(("vocab", "embed"), (128, 64), mesh) == P("tensor", "fsdp")


def test_state_shardings_follow_parameters_into_the_optimizer_state():
    cfg = tiny_train_config()
    program = build_train_program(cfg, shd.make_mesh((2, 2, 2)), FAST_COMPILE)
    sh = program.state_shardings
    assert sh.params["embed_tokens"].spec == P("tensor", "fsdp")
    assert sh.params["decoder"]["layers"]["mlp"]["up_proj"].spec == P(None, "fsdp", "tensor")
    adam = sh.opt_state[1][0]  # chain(clip, adamw): adamw = (scale_by_adam, weight decay, lr)
    assert adam.mu["decoder"]["layers"]["self_attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
    assert adam.nu["lm_head"].spec == P("fsdp", "tensor")
    assert adam.count.spec == P() and sh.step.spec == P()
    assert program.abstract_batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    with pytest.raises(shd.ShardingError, match="not divisible by data x fsdp = 4"):
        cfg.data.batch_size = 6
        build_train_program(cfg, shd.make_mesh((2, 2, 2)), FAST_COMPILE)


def test_eight_devices_match_one_device():
    reference = reference_run()
    cfg, mesh = tiny_train_config(), shd.make_mesh((2, 2, 2))
    program = build_train_program(cfg, mesh, FAST_COMPILE)
    state = program.init(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), reference["initial_params"])
    losses = []
    for i in range(5):
        state, metrics = program.step(state, shd.global_batch(random_batch(cfg, seed=i), mesh))
        losses.append(float(metrics["loss"]))
    assert len(state.params["lm_head"].sharding.device_set) == 8
    assert state.params["lm_head"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(losses, [float(m["loss"]) for m in reference["history"]], rtol=1e-5)
    assert losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 jax.device_get(state.params), reference["params"])


def test_activation_constraints_shard_the_batch_under_the_mesh():
    cfg, mesh = model_config(tiny_train_config()), shd.make_mesh((2, 2, 2))
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(init_params(cfg, jax.random.key(0)), replicated)
    ids = jax.device_put(np.zeros((8, 16), np.int32), replicated)

    def hidden_states(params, ids, constrained):
        if not constrained:
            return Ouro(cfg).apply({"params": params}, ids).hidden_states
        with shd.activation_rules(mesh):
            return Ouro(cfg).apply({"params": params}, ids).hidden_states

    run = jax.jit(hidden_states, static_argnums=2)
    assert run(params, ids, False).sharding.spec == P()  # replicated inputs alone: nothing is split
    out = run(params, ids, True)  # [T, B, S, d]: the logical batch axis lands on data x fsdp
    assert out.sharding.spec == P(None, ("data", "fsdp")) and len(out.sharding.device_set) == 8


def test_slices_add_a_dcn_axis_of_consecutive_device_blocks():
    mesh = shd.make_mesh(dict(data=-1, fsdp=2, tensor=1, slices=2))
    assert dict(mesh.shape) == {"dcn": 2, "data": 2, "fsdp": 2, "tensor": 1}
    assert [d.id for d in mesh.devices[1].flat] == [4, 5, 6, 7]  # slice 1: the second block of 4
    assert shd.batch_spec(mesh) == P(("dcn", "data", "fsdp"), None) and shd.batch_shards(mesh) == 8
    assert shd.logical_spec(("activation_batch", "embed"), (8, 64), mesh) == P(("dcn", "data", "fsdp"), None)
    one_slice = shd.make_mesh(dict(data=-1, fsdp=2, tensor=1, slices=1))
    assert one_slice.axis_names == ("data", "fsdp", "tensor")
    assert dict(shd.mesh_rules(one_slice))["activation_batch"] == ("data", "fsdp")
    with pytest.raises(shd.ShardingError, match="mesh.slices=3 does not divide the 8 devices"):
        shd.make_mesh(dict(data=-1, fsdp=1, tensor=1, slices=3))
    with pytest.raises(ConfigError, match="mesh.slices must be an integer >= 1, got 0"):
        shd.make_mesh(dict(data=-1, fsdp=1, tensor=1, slices=0))
    with pytest.raises(shd.ShardingError, match="needs 8 devices, 4 available"):  # the sizes count per slice
        shd.make_mesh(dict(data=2, fsdp=2, tensor=2, slices=2))
    with pytest.raises(shd.ShardingError, match="not divisible by dcn x data x fsdp = 8"):
        shd.check_batch_divisible(12, mesh)


def test_two_slices_train_like_one_device_with_weights_whole_across_slices():
    reference = reference_run()
    cfg = tiny_train_config()
    cfg.mesh.update(data=1, fsdp=2, tensor=2, slices=2)
    mesh = shd.make_mesh(dict(cfg.mesh))
    program = build_train_program(cfg, mesh, FAST_COMPILE)
    assert program.abstract_batch["input_ids"].sharding.spec == P(("dcn", "data", "fsdp"), None)
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, program.state_shardings))
    assert not any("dcn" in str(spec) for spec in specs)  # weights and optimizer state: never split over dcn
    state = program.init(jax.random.key(0))
    losses = []
    for i in range(5):
        state, metrics = program.step(state, shd.global_batch(random_batch(cfg, seed=i), mesh))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, [float(m["loss"]) for m in reference["history"]], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 jax.device_get(state.params), reference["params"])


@pytest.mark.subprocess
@pytest.mark.slow  # ~10 s: a CLI process (make_mesh's errors are checked above in-process)
def test_bad_slices_end_the_train_command_in_one_line(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ouro_jax.cli.train", "--config", "configs/tiny.py", "--workdir",
                           str(tmp_path / "w"), "--config.mesh.slices=3"], cwd=REPO, env=subprocess_env(4),
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ouro-train")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert lines == ["ouro-train: error: mesh.slices=3 does not divide the 4 devices"], proc.stderr
