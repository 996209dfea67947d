"""The training ConfigDict, the command line's view of `ouro_jax.train.settings` (where every knob's default
and meaning live); `configs/*.py` start from `base_config`. `RunSettings.of(config)` narrows it once.

    config.seed             parameter initialization
    config.init_from        model to start from (ouro_jax.model_source: params, HF dir, hub id, run or step); "" = none
    config.model            the checkpoint fields of OuroConfig (shapes, vocabulary, T, RoPE, exit threshold)
    config.execution        how it runs (Execution: dtype = compute, param_dtype = master weights, remat, unroll)
    config.mesh             sizes of the ('data', 'fsdp', 'tensor') mesh; one may be -1 (the rest)
    config.data             sources (ouro_jax.data specs), seq_len, global batch_size, seed, evaluation size,
                            eval_sources (held-out text scored every train.eval_every steps)
    config.optim            AdamW, clipping and the warmup-stable-decay learning rate (optim.py)
    config.loss             objective: "stage1" (Stage I, every parameter), "last_step" (CE of the last step,
                            every parameter but the exit gate) or "stage2" (Stage II, the exit gate only);
                            beta and its schedule (stage1), gate_k and gate_gamma (stage2)
    config.train            steps, grad_accum, checkpointing, logging, evaluation, non-finite policy

Override on the command line: `--config.train.steps=100 --config.execution.dtype=bfloat16`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import ml_collections

from ouro_jax import validate
from ouro_jax.config import Execution, OuroConfig
from ouro_jax.errors import ConfigError
from ouro_jax.model import abstract_params
from ouro_jax.train.settings import SECTIONS, RunSettings, defaults


def model_fields(cfg: OuroConfig) -> ml_collections.ConfigDict:
    """`config.model`: the checkpoint fields of `cfg`."""
    return ml_collections.ConfigDict(cfg.to_dict())


def execution_fields(execution: Execution) -> ml_collections.ConfigDict:
    """`config.execution`: the execution settings."""
    return ml_collections.ConfigDict(dataclasses.asdict(execution))


def model_config(config) -> OuroConfig:
    """The OuroConfig of a training config (unknown or mistyped fields raise ConfigError)."""
    return RunSettings.of(config).model


def check_training(run: RunSettings) -> str:
    """Refuses settings that are in range alone but not together; returns the objective."""
    validate.positions("data.seq_len", run.data.seq_len, run.model.max_position_embeddings)
    return run.loss.objective


def training_memory_bytes(run: RunSettings, devices: int) -> float:
    """A lower bound of one device's memory in a training step: the train state (params, gradients and two
    float32 AdamW moments) fully sharded over `devices`, and one saved hidden state per layer application
    for this device's share of a micro-batch (what even full rematerialization keeps)."""
    cfg = run.model
    count = sum(leaf.size for leaf in jax.tree.leaves(abstract_params(cfg)))
    state = count * (2 * cfg.weight_dtype.itemsize + 8)
    tokens = run.data.batch_size // run.train.grad_accum * run.data.seq_len
    saved = tokens * cfg.hidden_size * cfg.num_hidden_layers * cfg.total_ut_steps * cfg.compute_dtype.itemsize
    return (state + saved) / devices


def check_fits(run: RunSettings) -> None:
    """Refuses, before any data is read or anything compiles, a run whose step cannot fit the devices."""
    validate.fits_memory(f"training batch {run.data.batch_size} x {run.data.seq_len}",
                         training_memory_bytes(run, jax.device_count()))


def check_starting_point(run: RunSettings) -> None:
    """Stage II trains only the exit gate of a trained model: it needs `init_from`."""
    if run.loss.objective == "stage2" and not run.init_from:
        raise ConfigError("loss.objective='stage2' trains only the exit gate of a trained model: set init_from "
                          "to the Stage I checkpoint")


def base_config() -> ml_collections.ConfigDict:
    """Every knob with its default (documented in ouro_jax.train.settings)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""
    c.distributed = False
    c.model = model_fields(OuroConfig())
    c.execution = execution_fields(Execution())
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    for name, kind in SECTIONS.items():
        c[name] = ml_collections.ConfigDict(defaults(kind))
    return c


class PretrainingStage(NamedTuple):
    """One stage of the released recipe (SPEC 6)."""

    total_ut_steps: int
    beta: float
    seq_len: int
    batch_tokens: int        # tokens per optimizer step
    tokens: float            # tokens of the whole stage
    rope_theta: float
    peak_lr: float
    end_lr: float            # reached by a cosine decay over the stage; = peak_lr: constant
    warmup_steps: int


# A stage that starts from the previous one's params (`init_from`) starts with a fresh AdamW state:
# a short warmup lets its moment estimates settle before the full rate (b2 = 0.95: a ~20-step horizon).
RESTART_WARMUP_STEPS = 200
_M = 2**20
# The released recipe (SPEC 6). The paper ramps the stage-1a batch from 4M to 8M tokens; a run here keeps
# one batch size (its data iterator state is per batch), so stage 1a runs at 4M tokens throughout.
PRETRAINING_STAGES = {
    "stage1a": PretrainingStage(8, 0.1, 4096, 4 * _M, 3e12, 1e4, 3e-4, 3e-4, 2000),
    "stage1b": PretrainingStage(4, 0.05, 4096, 8 * _M, 3e12, 1e4, 3e-4, 3e-4, RESTART_WARMUP_STEPS),
    "stage2": PretrainingStage(4, 0.05, 16384, 8 * _M, 1.4e12, 4e4, 3e-4, 3e-5, RESTART_WARMUP_STEPS),
    "stage3": PretrainingStage(4, 0.05, 65536, 8 * _M, 20e9, 1e6, 3e-5, 3e-5, RESTART_WARMUP_STEPS),
    "stage4": PretrainingStage(4, 0.05, 32768, 8 * _M, 300e9, 1e6, 3e-5, 1e-5, RESTART_WARMUP_STEPS),
    # Chat SFT after stage 4 (SPEC 6 gives no SFT recipe; the choices are explained in configs/ouro_1p4b.py):
    # stage 4's context and theta, 4M-token batches, 2 epochs of a nominal 4B-token chat set.
    "sft": PretrainingStage(4, 0.05, 32768, 4 * _M, 2 * 4e9, 1e6, 2e-5, 2e-6, RESTART_WARMUP_STEPS),
}


def pretraining_config(model: OuroConfig, stage: str) -> ml_collections.ConfigDict:
    """The released recipe's `stage` for `model` (its T, beta, sequence length, batch, RoPE theta and
    learning rate, SPEC 6): AdamW (0.9, 0.95), wd 0.1, clip 1.0, bf16 compute over float32 master
    weights, full remat, FSDP over every device. Stages after 1a start from the previous stage's
    params (`init_from`) with a fresh optimizer state, hence a short warmup; stage 4 decays from
    stage 3's 3e-5. "sft" is chat SFT after stage 4 (chat shards with their target mask)."""
    if stage not in PRETRAINING_STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(PRETRAINING_STAGES)}")
    s = PRETRAINING_STAGES[stage]
    batch = s.batch_tokens // s.seq_len
    steps = int(s.tokens // s.batch_tokens)
    cosine = s.end_lr != s.peak_lr
    c = base_config()
    c.model = model_fields(model.replace(total_ut_steps=s.total_ut_steps, rope_theta=s.rope_theta))
    c.execution.update(dtype="bfloat16", param_dtype="float32", remat_policy="full")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.update(sources="", seq_len=s.seq_len, batch_size=batch, eval_examples=0)
    c.optim.update(peak_lr=s.peak_lr, init_lr=0.0, warmup_steps=s.warmup_steps, decay="cosine" if cosine else "none",
                   decay_steps=steps - s.warmup_steps if cosine else 0, end_lr=s.end_lr, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=0.1, clip_norm=1.0)
    c.loss.update(objective="stage1", beta=s.beta, beta_schedule="constant")
    c.train.update(steps=steps, ce_chunk_size=512, log_every=10, checkpoint_every=1000, keep_checkpoints=3,
                   progress_bar=False)
    return c
