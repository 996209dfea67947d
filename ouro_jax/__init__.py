"""ouro_jax: Ouro looped language models (LoopLM) in JAX/Flax."""

from ouro_jax.config import Execution, OuroConfig, preset
from ouro_jax.errors import CheckpointError, ConfigError, OuroError
from ouro_jax.exit import exit_cdf, exit_entropy, exit_log_pdf, exit_pdf, q_exit_step, select_logits
from ouro_jax.model import Ouro, OuroOutput, abstract_params, count_params, init_params

__all__ = [
    "CheckpointError", "ConfigError", "Execution", "Ouro", "OuroError", "OuroConfig", "OuroOutput",
    "abstract_params", "count_params", "exit_cdf",
    "exit_entropy", "exit_log_pdf", "exit_pdf", "init_params", "preset", "q_exit_step", "select_logits",
]
