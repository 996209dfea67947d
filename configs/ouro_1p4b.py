"""Ouro-1.4B pre-training, the stage-1 recipe of the released models (SPEC 6).

    --config configs/ouro_1p4b.py            stage 1a: T=8, beta 0.1, 4M-token batches, warmup + constant 3e-4
    --config configs/ouro_1p4b.py:stage1b    stage 1b: T=4, beta 0.05, 8M-token batches, constant 3e-4

Set `--config.data.sources=DIR` (token shards from `python -m ouro_jax.data.prepare`); start stage 1b
from stage 1a with `--config.init_from=RUN_1A/params`. The paper ramps the stage-1a batch from 4M to
8M tokens; one run keeps one batch size (its data iterator state depends on it).
"""

from ouro_jax import config as model_presets
from ouro_jax.train.config import pretraining_config


def get_config(stage: str = "stage1a"):
    return pretraining_config(model_presets.ouro_1p4b(), stage or "stage1a")
