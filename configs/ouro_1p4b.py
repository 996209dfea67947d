"""Ouro-1.4B pre-training, the released recipe (SPEC 6), one config per stage of one continuous run.

    --config configs/ouro_1p4b.py            stage 1a: T=8, beta 0.1, 4K context, 4M -> 8M-token batches,
                                             warmup + 3e-4
    --config configs/ouro_1p4b.py:stage1b    stage 1b: T=4, beta 0.05, 8M-token batches, constant 3e-4
    --config configs/ouro_1p4b.py:stage2     CT annealing: 16K context, RoPE theta 40K, cosine 3e-4 -> 3e-5
    --config configs/ouro_1p4b.py:stage3     long context: 64K, theta 1M, constant 3e-5
    --config configs/ouro_1p4b.py:stage4     mid-training: 32K, theta 1M, cosine 3e-5 -> 1e-5
    --config configs/ouro_1p4b.py:sft        chat SFT: 32K, theta 1M, T=4, beta 0.05, cosine 2e-5 -> 2e-6

Set `--config.data.sources=DIR` (token shards from `ouro-prepare`); start each stage after 1a from the
previous one's workdir, `--config.init_from=PREVIOUS_RUN`: the stages form one warmup-stable-decay
schedule with the optimizer state carried across them (`train.carry_optimizer=True`: params, AdamW moments
and update count of the previous run's newest checkpoint; T, context and RoPE theta change, the parameters
do not). Each stage's `optim.schedule_offset` is the optimizer steps of the stages before it (from their
token budgets and batches), so the rate at stage-k step s is the recipe's at offset + s: the warmup only at
the start of 1a, constant 3e-4 through 1a and 1b, the decays of stages 2 and 4, no re-warmup. To restart a
stage from params alone (a fresh optimizer), pass `--config.train.carry_optimizer=False
--config.optim.schedule_offset=0 --config.optim.warmup_steps=200`. Stage 1a ramps its batch from 4M to 8M
tokens (`data.batch_ramp="71525:2048"`, after 300B tokens: SPEC 6 gives no ramp point): the micro-batch
stays and the accumulation count doubles, so the data iterator and resume are unaffected.

SFT (`:sft`): `--config.data.sources=DIR` of chats from `ouro-prepare --chat` (the assistant-only target
mask rides in the shards, so only what an assistant writes is learned; "auto" packing keeps each chat in
one row) and `--config.init_from=STAGE4_RUN/params`. SPEC.md gives no SFT recipe, so these are choices:
the Stage I objective at the trained depth (T=4, beta 0.05, as every stage after 1a) keeps the exit
gate trained; stage 4's 32K context and RoPE theta 1M, so the long context is kept; 4M-token batches
(128 rows); AdamW with the pre-training settings and a fresh state (200 warmup steps), peak 2e-5 (the
order of the stage 3/4 rates, a common full-parameter SFT rate) decaying by a cosine to 2e-6; two
epochs. The data repeats (reshuffled each epoch) until `train.steps`, which here counts 2 epochs of a
nominal 4B-token chat set (1907 steps): for yours set `--config.train.steps=2*TOKENS/4194304` (TOKENS
as `ouro-prepare` prints it; packing pads rows, so that is a little over 2 epochs) and
`--config.optim.decay_steps` to that minus 200.
"""

from ouro_jax import config as model_presets
from ouro_jax.train.config import pretraining_config


def get_config(stage: str = "stage1a"):
    return pretraining_config(model_presets.ouro_1p4b(), stage or "stage1a")
