"""ouro_jax.validate: one validator per value, and the library functions that call it refuse what it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ouro_jax import validate
from ouro_jax.errors import ConfigError
from ouro_jax.exit import q_exit_step, select_logits


@pytest.mark.parametrize("value", [2.7, True, "3", float("nan"), None, 0, -1])
def test_num_steps_refuses_what_is_not_a_positive_integer(value):
    with pytest.raises(ConfigError, match="num_steps must be an integer >= 1"):
        validate.num_steps(value)


def test_num_steps_takes_integers_and_integral_floats():
    assert validate.num_steps(3) == 3 and validate.num_steps(np.int64(4)) == 4 and validate.num_steps(2.0) == 2


@pytest.mark.parametrize("q", [1.5, -0.1, float("nan"), float("inf"), "0.5", True])
def test_exit_threshold_refuses_outside_zero_one(q):
    with pytest.raises(ConfigError, match=r"exit_threshold must be a finite number in \[0, 1\]"):
        validate.exit_threshold(q)


def test_exit_threshold_accepts_the_closed_interval():
    assert [validate.exit_threshold(q) for q in (0, 0.5, 1, np.float32(0.25))] == [0.0, 0.5, 1.0, 0.25]


@pytest.mark.parametrize("q", [1.5, float("nan"), -1.0])
def test_q_exit_and_select_logits_refuse_a_bad_threshold(q):
    gates, logits = jnp.zeros((3, 2)), jnp.zeros((3, 2, 5))
    with pytest.raises(ConfigError, match="exit_threshold"):
        q_exit_step(gates, q)
    with pytest.raises(ConfigError, match="exit_threshold"):
        select_logits(logits, gates, exit_threshold=q)


def test_a_traced_threshold_is_left_to_the_caller():
    steps = jax.jit(q_exit_step)(jnp.zeros((3, 2)), jnp.float32(0.5))
    assert steps.shape == (2,)


@pytest.mark.parametrize("step", [3, -1, 1.5])
def test_select_logits_refuses_a_static_exit_outside_the_steps(step):
    with pytest.raises(ConfigError, match=r"exit_at_step must be an integer in \[0, 3\)"):
        select_logits(jnp.zeros((3, 2, 5)), jnp.zeros((3, 2)), exit_at_step=step)


def test_token_ids_positions_sampling_and_choices():
    with pytest.raises(ConfigError, match=r"outside the vocabulary \[0, 8\): \[8, -1\]"):
        validate.token_ids("prompt", [1, 8, -1], 8)
    with pytest.raises(ConfigError, match=r"seq_len \(600\) exceeds the model's max_position_embeddings \(512\)"):
        validate.positions("seq_len", 600, 512)
    assert validate.sampling(0, 0, 1) == (0.0, 0, 1.0)
    with pytest.raises(ConfigError, match="top_k must be an integer >= 0"):
        validate.sampling(1.0, 2.5, 1.0)
    with pytest.raises(ConfigError, match="unknown KV-cache policy 'middle'; choose from full, last"):
        validate.kv_policy("middle")
    with pytest.raises(ConfigError, match="unknown loss.objective 'x'"):
        validate.objective("x")


def test_prompt_ids_seed_and_a_bounded_depth():
    assert validate.prompt_ids("prompt", (3, np.int64(4)), 8) == [3, 4]
    with pytest.raises(ConfigError, match="prompt is empty: generation needs at least one prompt token"):
        validate.prompt_ids("prompt", [], 8)
    with pytest.raises(ConfigError, match=r"prompt has token ids outside the vocabulary \[0, 8\): \[True\]"):
        validate.prompt_ids("prompt", [True], 8)
    assert validate.seed(2**32 - 1) == 2**32 - 1
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 4294967296\), got -1"):
        validate.seed(-1)
    assert validate.num_steps(4, "depth", 4) == 4 and validate.num_steps(9, "depth") == 9
    with pytest.raises(ConfigError, match=r"depth must be an integer in \[1, 5\), got 5"):
        validate.num_steps(5, "depth", 4)


def test_fits_memory_names_what_it_needs():
    validate.fits_memory("a small thing", 1024, 2048)
    with pytest.raises(ConfigError, match=r"a big thing does not fit: needs 3.0 GiB of 2.0 GiB device memory"):
        validate.fits_memory("a big thing", 3 * 2**30, 2 * 2**30)
    assert validate.device_memory() > 0
