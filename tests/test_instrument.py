"""Run instrumentation: the persistent compilation cache under the workdir (a rerun loads the train step
instead of compiling it) and a jax.profiler trace of the steps `train.profile_steps` names."""

import os

import jax
import pytest
from helpers import FAST_COMPILE, tiny_train_config

from ouro_jax.errors import ConfigError
from ouro_jax.train import loop
from ouro_jax.train.instrument import compilation_cache_dir, parse_profile_steps


def _config(steps, **train):
    config = tiny_train_config()
    config.data.eval_examples = 0
    config.optim.update(warmup_steps=1, decay="none", decay_steps=0)
    config.train.update(steps=steps, checkpoint_every=2, export_params=False, compiler_options=FAST_COMPILE,
                        compilation_cache_dir="", compilation_cache_min_secs=0.0, **train)  # the workdir's
    return config


def _cache_entries(workdir):
    root = workdir / "compilation_cache"
    return {name for name in os.listdir(root) if not name.startswith(".")} if root.exists() else set()


def test_rerun_loads_compiled_programs_from_the_cache_and_profiles_its_steps(tmp_path):
    workdir, outside = tmp_path / "run", jax.config.jax_compilation_cache_dir
    loop.train(_config(2), str(workdir))
    written = _cache_entries(workdir)
    assert written, "the first run wrote no compiled program"
    assert jax.config.jax_compilation_cache_dir == outside  # restored after the run

    loads = []
    jax.monitoring.register_event_listener(lambda event, **kw: loads.append(event))
    loop.train(_config(4, profile_steps="3:4"), str(workdir))
    assert "/jax/compilation_cache/cache_hits" in loads  # the resumed run's train step came from the cache
    traces = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "profile") for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces), traces


def test_settings_are_checked(tmp_path):
    assert compilation_cache_dir("", "gs://b/run") == "gs://b/run/compilation_cache"
    assert compilation_cache_dir("none", tmp_path) is None
    assert compilation_cache_dir("gs://b/cache", tmp_path) == "gs://b/cache"
    assert parse_profile_steps("") is None
    assert parse_profile_steps("5:7") == (5, 7) and parse_profile_steps("3") == (3, 3)
    for bad in ("0:3", "4:2", "a:b", "1:2:3"):
        with pytest.raises(ConfigError, match="train.profile_steps"):
            parse_profile_steps(bad)
