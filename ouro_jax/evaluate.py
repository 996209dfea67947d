"""Evaluate looped models: `python -m ouro_jax.evaluate MODEL [--text ...] [--task ...]` (= `ouro-eval`).

The library lives in `ouro_jax.evaluation`; this module is the command line.
"""

from ouro_jax.evaluation.cli import build_parser, main, run

__all__ = ["build_parser", "main", "run"]

if __name__ == "__main__":
    run()
