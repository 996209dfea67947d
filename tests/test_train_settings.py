"""RunSettings: the training ConfigDict narrowed once into typed, validated settings."""

import glob
import importlib.util
import json
import os
import re

import ml_collections
import pytest
from helpers import REPO

from ouro_jax.errors import ConfigError
from ouro_jax.train.config import base_config
from ouro_jax.train.settings import OptimSettings, RunSettings


def _config_files():
    return sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_every_config_file_narrows_and_round_trips(path):
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    run = RunSettings.of(config)
    assert RunSettings.of(run) is run
    assert json.loads(json.dumps(run.to_dict())) == json.loads(config.to_json())  # what config.json stores
    assert run.model.execution.dtype == config.execution.dtype and run.optim.peak_lr == config.optim.peak_lr


@pytest.mark.parametrize("section,field,value,message", [
    ("data", "seq_len", 3.0, "data.seq_len must be an integer"),
    ("data", "batch_size", 0, "data.batch_size must be an integer >= 1"),
    ("data", "weights", "1,x", "data.weights must be comma-separated numbers"),
    ("optim", "peak_lr", "3e-4", "optim.peak_lr must be a finite number"),
    ("optim", "b2", 1.0, "optim.b2 must be below 1"),
    ("optim", "decay", "step", "unknown optim.decay 'step'"),
    ("loss", "beta", -0.1, "loss.beta must be a finite number in [0, inf)"),
    ("loss", "objective", "stage3", "unknown loss.objective 'stage3'"),
    ("train", "progress_bar", 1, "train.progress_bar must be a bool"),
    ("train", "grad_accum", 0, "train.grad_accum must be an integer >= 1"),
])
def test_a_bad_value_is_refused_in_one_line_naming_it(section, field, value, message):
    config = base_config().to_dict()
    config[section][field] = value
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        RunSettings.of(ml_collections.ConfigDict(config))
    assert "\n" not in str(error.value)


def test_unknown_fields_are_named():
    config = base_config().to_dict()
    config["optim"]["peak_learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match="unknown optim field.*optim.peak_learning_rate"):
        RunSettings.of(config)
    with pytest.raises(ConfigError, match=r"unknown config field\(s\): \['optimizer'\]"):
        RunSettings.of({**base_config().to_dict(), "optimizer": {}})


def test_settings_are_frozen_and_clip_norm_may_be_off():
    run = RunSettings.of(base_config())
    with pytest.raises(AttributeError):
        run.optim.peak_lr = 1.0
    assert OptimSettings(clip_norm=None).clip_norm is None
    assert run.replace(seed=3).seed == 3 and run.seed == 0
