"""The errors ouro_jax raises for bad input: each names the problem in one line, so a CLI can print it.

`cli_errors(prog)` / `fail(prog, message)` are the one way every command line ends on bad input:
one line `prog: error: ...` on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn


class OuroError(Exception):
    """Base class of the expected, user-facing errors (a CLI prints the message, not a traceback)."""


class ConfigError(OuroError, ValueError):
    """An unknown, inconsistent, mistyped or unsupported setting."""


class CheckpointError(OuroError, ValueError):
    """A missing, corrupt or mismatched checkpoint (ours or HF)."""


class ShardCorruptError(OuroError, ValueError):
    """A data shard that does not read back or does not match its manifest."""


# What a CLI reports in one line: our errors, bad values and failed file operations. Anything else is a bug.
EXPECTED_ERRORS = (OuroError, ValueError, OSError)


def one_line(error: BaseException) -> str:
    """`error` as one line: its message's lines joined, or its type name when it has no message."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return text or type(error).__name__


def fail(prog: str, message: str | BaseException, code: int = 1) -> NoReturn:
    """Prints `prog: error: message` as one line on stderr and exits with `code` (non-zero)."""
    text = one_line(message) if isinstance(message, BaseException) else " ".join(str(message).split("\n"))
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (`prog: error: ...`, status 2) instead of the usage block."""

    def error(self, message):
        fail(self.prog, message, code=2)


@contextlib.contextmanager
def cli_errors(prog: str, *, code: int = 1, debug: bool = False) -> Iterator[None]:
    """Turns an expected error (EXPECTED_ERRORS) raised inside into `fail(prog, error, code)`; with
    `debug` the traceback shows instead. Other exceptions (bugs) keep their traceback."""
    try:
        yield
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        fail(prog, e, code)
