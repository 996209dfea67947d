"""Command-line entry points, one module per command: `ouro-NAME` = `python -m ouro_jax.cli.NAME`.

Each module only parses arguments, calls the library and turns expected errors (`OuroError`, `OSError`, bad
values) into one line on stderr and a non-zero exit (`ouro_jax.errors.cli_errors`); `main` is callable in-process.
"""
