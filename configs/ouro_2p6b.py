"""Ouro-2.6B: 48 layers, upcycled from the 24-layer model after stage 1a, then stage 1b (SPEC 6).

    python -m ouro_jax.upcycle RUN_1A/params UPCYCLED          # layers [1..24, 1..24]
    python -m ouro_jax.train --config configs/ouro_2p6b.py --workdir RUN \\
        --config.init_from=UPCYCLED --config.data.sources=DIR

`--config configs/ouro_2p6b.py:stage1a` trains the 48 layers from scratch with the stage-1a recipe.
"""

from ouro_jax import config as model_presets
from ouro_jax.train.config import pretraining_config


def get_config(stage: str = "stage1b"):
    return pretraining_config(model_presets.ouro_2p6b(), stage or "stage1b")
