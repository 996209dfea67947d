"""Ouro-1.4B pre-training, the released recipe (SPEC 6), one config per stage.

    --config configs/ouro_1p4b.py            stage 1a: T=8, beta 0.1, 4K context, 4M-token batches, warmup + 3e-4
    --config configs/ouro_1p4b.py:stage1b    stage 1b: T=4, beta 0.05, 8M-token batches, constant 3e-4
    --config configs/ouro_1p4b.py:stage2     CT annealing: 16K context, RoPE theta 40K, cosine 3e-4 -> 3e-5
    --config configs/ouro_1p4b.py:stage3     long context: 64K, theta 1M, constant 3e-5
    --config configs/ouro_1p4b.py:stage4     mid-training: 32K, theta 1M, cosine 3e-5 -> 1e-5

Set `--config.data.sources=DIR` (token shards from `ouro-prepare`); start each stage
after 1a from the previous one with `--config.init_from=PREVIOUS_RUN/params` (the params only: a fresh
optimizer state, hence a 200-step warmup). The paper ramps the stage-1a batch from 4M to 8M tokens;
one run keeps one batch size (its data iterator state depends on it).
"""

from ouro_jax import config as model_presets
from ouro_jax.train.config import pretraining_config


def get_config(stage: str = "stage1a"):
    return pretraining_config(model_presets.ouro_1p4b(), stage or "stage1a")
