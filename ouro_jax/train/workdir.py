"""The training workdir: one run at a time (a lock), the run's config checked on resume, and moving an
incompatible old run aside.

The lock is `fcntl.flock` on WORKDIR/.lock: the kernel drops it when its process dies, so a killed
run never blocks the next one. Filesystems without flock (some network mounts) and object stores
(`gs://`) run unlocked: there, keeping to one run per workdir is up to the user.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Collection

from ouro_jax import paths
from ouro_jax.errors import CheckpointError, OuroError
from ouro_jax.train.checkpointer import ORBAX_COMMIT_FILE

LOCK_FILE = ".lock"
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "tb", "config.json", "params")
RUN_CONFIG = "config.json"
# What a resumed run must share with its checkpoints: the model, what one step sees, the data, the objective.
RESUME_FIELDS = ("model", "data.batch_size", "data.batch_ramp", "data.seq_len", "data.sources", "data.weights",
                 "data.seed", "loss.objective", "train.grad_accum")


class ResumeConfigError(CheckpointError):
    """A resumed run's config differs from the one its checkpoints were trained with."""


def _field(tree: dict, name: str):
    for key in name.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _differences(old: dict, new: dict) -> list[str]:
    found = []
    for name in RESUME_FIELDS:
        a, b = _field(old, name), _field(new, name)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [f"{name}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            found.append(name)
    return found


def check_resume_config(config: dict, allowed: Collection[str], workdir: paths.PathLike) -> None:
    """Refuses to resume the run in `workdir` with `config` (the run's settings as a dict) when it differs
    from the stored one in RESUME_FIELDS, naming the differences, unless `allowed` (train.allow_changes)
    lists each."""
    path = paths.as_path(workdir) / RUN_CONFIG
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeConfigError(f"{path}: not readable JSON ({e})") from None
    new = json.loads(json.dumps(config))
    changed = [k for k in _differences(old, new) if k not in allowed and k.split(".")[0] not in allowed]
    if changed:
        shown = ", ".join(f"{k} {_field(old, k)!r} -> {_field(new, k)!r}" for k in changed)
        raise ResumeConfigError(
            f"resuming {workdir} with a changed config: {shown}; pass --config.train.allow_changes="
            f"{','.join(changed)} to accept, or --config.train.restart_incompatible=True to start over "
            "(the old run is moved aside)")


class WorkdirBusyError(OuroError):
    """Another live process trains in the same workdir."""


class WorkdirLock:
    """Exclusive, non-blocking lock of a workdir for the life of a run (`with WorkdirLock(dir):`)."""

    def __init__(self, workdir: paths.PathLike):
        self.path = os.fspath(paths.as_path(workdir) / LOCK_FILE)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if not paths.is_local(self.path):
            print(f"[train] {os.path.dirname(self.path)} is on an object store: no workdir lock, so start only "
                  "one run per workdir", flush=True)
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return self  # no flock here: unlocked
            raise WorkdirBusyError(f"{os.path.dirname(self.path)} is in use by another training run (pid {holder}); "
                                   "wait for it, stop it, or choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def move_run_aside(workdir: paths.PathLike) -> str | None:
    """Moves the previous run's checkpoints, metrics, config and params into WORKDIR/replaced-TIME/
    (nothing is deleted; on object stores a copy, then a delete); returns that directory, or None when
    there was nothing to move."""
    workdir = paths.as_path(workdir)
    present = [name for name in RUN_ENTRIES if paths.exists(workdir / name)]
    if not present:
        return None
    target = os.fspath(workdir / time.strftime("replaced-%Y%m%d-%H%M%S"))
    n = 1
    while paths.exists(target):
        target, n = f"{target.rsplit('.', 1)[0]}.{n}", n + 1
    paths.as_path(target).mkdir(parents=True)
    for name in present:
        paths.move_tree(workdir / name, paths.as_path(target) / name, ORBAX_COMMIT_FILE)
    return target
