"""Command-line entry points, one module per command: `ouro-NAME` = `python -m ouro_jax.cli.NAME`.

Each module only parses arguments, calls the library and turns expected errors (`OuroError`, `OSError`, bad
values) into one line on stderr and a non-zero exit (`ouro_jax.errors.cli_errors`); `main` is callable in-process,
`run()` is the console script (the command line of `sys.argv`, exiting with `main`'s status).
"""

from __future__ import annotations

from collections.abc import Callable

from absl import flags

from ouro_jax.errors import fail


def flag_error_line(error: BaseException) -> str:
    """One line for an absl / config_flags parse error: a config file's own error (whose traceback
    config_flags folds into its message) is reduced to its last line, `ValueError: ...`."""
    message = str(error).replace("\\n", "\n").replace("\\'", "'")
    if "Traceback (most recent call last)" in message:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        flag = message.split(":", 1)[0]
        return f"{flag}: {lines[-1]}" if lines else message
    message = " ".join(message.split())
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
        message = message[1:-1]
    return f"bad command line ({type(error).__name__}): {message}"


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """absl flag parsing (`app.run(..., flags_parser=flags_parser(PROG))`) ending bad flags in one line."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 -- config_flags raises AttributeError/KeyError/TypeError/ValueError
            fail(prog, flag_error_line(e), code=2)
    return parse
