"""Test setup: CPU with 8 fake devices (chex sets them before any jax backend starts), and the golden reference."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import chex  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

chex.set_n_cpu_devices(8)

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden" / "ouro_tiny"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN_DIR.is_dir():
        raise FileNotFoundError(f"golden reference not found at {GOLDEN_DIR}")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden(golden_dir):
    return dict(np.load(golden_dir / "expected.npz"))


@pytest.fixture(scope="session")
def golden_model(golden_dir):
    from ouro_jax.hf import load_hf

    return load_hf(golden_dir)
