"""Run instrumentation: the persistent compilation cache and a `jax.profiler` trace of chosen steps.

`train.compilation_cache_dir`: where compiled programs are kept across restarts ('' = WORKDIR/compilation_cache,
"none" = off). A resumed run (a preempted slice, a rerun) then loads the train step instead of recompiling it.
Object stores work (jax reads and writes the cache through etils.epath).

`train.profile_steps="A:B"`: a profiler trace of steps A..B (1-based, inclusive) written to WORKDIR/profile/
(TensorBoard's profile plugin or xprof read it). The trace is written locally, then copied there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import jax
from jax._src import compilation_cache as cache

from ouro_jax import paths
from ouro_jax.errors import ConfigError

CACHE_SUBDIR = "compilation_cache"
PROFILE_SUBDIR = "profile"


def compilation_cache_dir(setting: str, workdir: paths.PathLike) -> str | None:
    """The cache directory of `train.compilation_cache_dir` ('' = under the workdir, 'none' = no cache)."""
    setting = str(setting).strip()
    if setting.lower() == "none":
        return None
    return os.fspath(paths.as_path(setting) if setting else paths.as_path(workdir) / CACHE_SUBDIR)


@contextlib.contextmanager
def compilation_cache(directory: str | None, min_compile_secs: float):
    """Within the block, jax's persistent cache is `directory` (None: off) for programs that took at least
    `min_compile_secs` to compile; the previous settings come back afterwards."""
    if min_compile_secs < 0:
        raise ConfigError(f"train.compilation_cache_min_secs must be >= 0, got {min_compile_secs}")
    settings = {"jax_compilation_cache_dir": directory, "jax_enable_compilation_cache": directory is not None,
                "jax_persistent_cache_min_compile_time_secs": float(min_compile_secs),
                "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    _apply(settings)
    try:
        yield
    finally:
        _apply(previous)


def _apply(settings: dict) -> None:
    cache.reset_cache()  # the cache reads its settings once, at the first compilation after a reset
    for name, value in settings.items():
        jax.config.update(name, value)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """`"A:B"` -> (A, B) with 1 <= A <= B; '' -> None. Anything else raises ConfigError."""
    text = str(text).strip()
    if not text:
        return None
    first, colon, last = text.partition(":")
    try:
        start, stop = int(first), int(last if colon else first)
    except ValueError:
        raise ConfigError(f"train.profile_steps must be 'A:B' (steps, 1-based), got {text!r}") from None
    if not 1 <= start <= stop:
        raise ConfigError(f"train.profile_steps must be 'A:B' with 1 <= A <= B, got {text!r}")
    return start, stop


class StepProfiler:
    """Traces the steps of `profile_steps` (process 0 only): `before(step)` ahead of running step `step`,
    `after(step, outputs)` once it is dispatched (waits for `outputs` at the last traced step)."""

    def __init__(self, profile_steps: str, workdir: paths.PathLike):
        self.window = parse_profile_steps(profile_steps)
        self.target = paths.as_path(workdir) / PROFILE_SUBDIR
        self._local: str | None = None

    def before(self, step: int) -> None:
        if self.window and step == self.window[0] and jax.process_index() == 0:
            self._local = tempfile.mkdtemp(prefix="ouro_jax_profile-")
            jax.profiler.start_trace(self._local)

    def after(self, step: int, outputs) -> None:
        if self._local is not None and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a running trace and copies it into WORKDIR/profile/ (also when the run ends early)."""
        if self._local is None:
            return
        jax.profiler.stop_trace()
        paths.copy_tree(self._local, self.target)
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = None
        print(f"[train] profiler trace of steps {self.window[0]}..{self.window[1]} in {self.target}", flush=True)
