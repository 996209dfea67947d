"""Ouro-2.6B: 48 layers, upcycled from the 24-layer model after stage 1a, then stages 1b..4 (SPEC 6).

    ouro-upcycle RUN_1A/params UPCYCLED          # layers [1..24, 1..24]
    python -m ouro_jax.cli.train --config configs/ouro_2p6b.py --workdir RUN \\
        --config.init_from=UPCYCLED --config.data.sources=DIR

The default is stage 1b (T=4): the upcycled params with a fresh optimizer state (the 24-layer moments do
not fit 48 layers), so a 200-step warmup, and the continuous schedule starts here. `:stage2`, `:stage3`,
`:stage4` continue it from the previous stage's workdir with the optimizer state carried (see
configs/ouro_1p4b.py; their `optim.schedule_offset` counts from 1b); `:stage1a` trains the 48 layers from
scratch with the stage-1a recipe;
`:sft` is chat SFT from the stage-4 params (the settings and their reasons: configs/ouro_1p4b.py).
A run started from a checkpoint takes its shapes from it and T, RoPE theta and positions from this config.
"""

from ouro_jax import config as model_presets
from ouro_jax.train.config import pretraining_config


def get_config(stage: str = "stage1b"):
    return pretraining_config(model_presets.ouro_2p6b(), stage or "stage1b", first_stage="stage1b")
