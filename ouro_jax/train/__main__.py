"""`python -m ouro_jax.train`: the training CLI (see ouro_jax.train.cli)."""

from ouro_jax.train.cli import run

run()
