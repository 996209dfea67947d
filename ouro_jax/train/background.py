"""Writers that can block (TensorBoard event files on a full disk or a hung filesystem) run on a thread
of their own, so the training thread never waits on them for longer than a timeout and stays free to act
on SIGTERM. A failure or a stall comes back to the training thread as one OSError naming the path."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

WRITER_TIMEOUT_ENV = "OURO_JAX_WRITER_TIMEOUT"  # seconds (default 120)


def writer_timeout() -> float:
    return float(os.environ.get(WRITER_TIMEOUT_ENV, "120"))


class BackgroundWriter:
    """Runs submitted calls in order on a daemon thread. `submit` raises the first error of an earlier call,
    or a TimeoutError once the thread has been stuck for `timeout` seconds; `close` waits at most `timeout`."""

    def __init__(self, path: str, what: str, timeout: float | None = None, capacity: int = 4096):
        self.path, self.what = path, what
        self.timeout = writer_timeout() if timeout is None else timeout
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"ouro-{what}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            if self._error is None:
                try:
                    fn(*args)
                except BaseException as e:  # noqa: BLE001 -- reported to the training thread
                    self._error = e

    def _raise_error(self) -> None:
        if self._error is not None:
            e = self._error
            raise OSError(f"{self.path}: {self.what} failed ({type(e).__name__}: {e})")

    def _stalled(self) -> TimeoutError:
        return TimeoutError(f"{self.path}: {self.what} made no progress for {self.timeout:g} s (a full disk or a "
                            "hung filesystem?)")

    def submit(self, fn: Callable, *args) -> None:
        self._raise_error()
        try:
            self._queue.put((fn, args), timeout=self.timeout)
        except queue.Full:
            raise self._stalled() from None

    def close(self, finish: Callable | None = None) -> None:
        """Runs `finish` (e.g. the writer's close) last and waits for it, at most `timeout` seconds."""
        if finish is not None:
            self.submit(finish)
        try:
            self._queue.put(None, timeout=self.timeout)
        except queue.Full:
            raise self._stalled() from None
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            raise self._stalled()
        self._raise_error()
