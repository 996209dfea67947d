"""The training ConfigDict, the command line's view of `ouro_jax.train.settings` (where every knob's default
and meaning live); `configs/*.py` start from `base_config`. `RunSettings.of(config)` narrows it once.

    config.seed             parameter initialization
    config.init_from        model to start from (ouro_jax.model_source: params, HF dir, hub id, run or step); "" = none
    config.model            the checkpoint fields of OuroConfig (shapes, vocabulary, T, RoPE, exit threshold)
    config.execution        how it runs (Execution: dtype = compute, param_dtype = master weights, remat, unroll)
    config.mesh             sizes of the ('data', 'fsdp', 'tensor') mesh; one may be -1 (the rest); slices > 1
                            adds a 'dcn' data-parallel axis across TPU slices (the three sizes are then per slice)
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
    """Stage II trains only the exit gate of a trained model: it needs `init_from`. Carrying an optimizer
    state needs one to carry, and a schedule offset continues only a carried state."""
    if run.loss.objective == "stage2" and not run.init_from:
        raise ConfigError("loss.objective='stage2' trains only the exit gate of a trained model: set init_from "
                          "to the Stage I checkpoint")
    if run.train.carry_optimizer and not run.init_from:
        raise ConfigError("train.carry_optimizer=True carries the optimizer state of init_from: set init_from to "
                          "the previous stage's workdir")
    if run.optim.schedule_offset and not run.train.carry_optimizer:
        raise ConfigError(f"optim.schedule_offset={run.optim.schedule_offset} continues a carried optimizer state: "
                          "set train.carry_optimizer=True, or for a fresh optimizer optim.schedule_offset=0 "
                          f"(and a restart warmup, e.g. optim.warmup_steps={RESTART_WARMUP_STEPS})")


def base_config() -> ml_collections.ConfigDict:
    """Every knob with its default (documented in ouro_jax.train.settings)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""
    c.distributed = False
    c.model = model_fields(OuroConfig())
    c.execution = execution_fields(Execution())
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, slices=1))
    for name, kind in SECTIONS.items():
        c[name] = ml_collections.ConfigDict(defaults(kind))
    return c


class PretrainingStage(NamedTuple):
    """One stage of the released recipe (SPEC 6)."""

    total_ut_steps: int
    beta: float
    seq_len: int
    batch_tokens: int        # tokens per optimizer step (after the ramp, if any)
    tokens: float            # tokens of the whole stage
    rope_theta: float
    peak_lr: float
    end_lr: float            # reached by a cosine decay over the stage; = peak_lr: constant
    warmup_steps: int        # when the stage starts a fresh optimizer state
    ramp_tokens: float = 0.0       # tokens trained at `ramp_batch_tokens` per step before `batch_tokens`
    ramp_batch_tokens: int = 0

    @property
    def steps(self) -> int:
        return (int(self.ramp_tokens // self.ramp_batch_tokens) if self.ramp_tokens else 0) + \
            int((self.tokens - self.ramp_tokens) // self.batch_tokens)


# A stage that starts from the previous one's params alone (`init_from`, train.carry_optimizer=False) starts
# with a fresh AdamW state: a short warmup lets its moment estimates settle (b2 = 0.95: a ~20-step horizon).
RESTART_WARMUP_STEPS = 200
_M = 2**20
# The released recipe (SPEC 6). Stage 1a ramps its batch from 4M to 8M tokens; SPEC 6 gives no ramp point,
# so it comes after the first 10% of the stage's tokens (300B), past the warmup's 8B.
PRETRAINING_STAGES = {
    "stage1a": PretrainingStage(8, 0.1, 4096, 8 * _M, 3e12, 1e4, 3e-4, 3e-4, 2000, 3e11, 4 * _M),
    "stage1b": PretrainingStage(4, 0.05, 4096, 8 * _M, 3e12, 1e4, 3e-4, 3e-4, RESTART_WARMUP_STEPS),
    "stage2": PretrainingStage(4, 0.05, 16384, 8 * _M, 1.4e12, 4e4, 3e-4, 3e-5, RESTART_WARMUP_STEPS),
    "stage3": PretrainingStage(4, 0.05, 65536, 8 * _M, 20e9, 1e6, 3e-5, 3e-5, RESTART_WARMUP_STEPS),
    "stage4": PretrainingStage(4, 0.05, 32768, 8 * _M, 300e9, 1e6, 3e-5, 1e-5, RESTART_WARMUP_STEPS),
    # Chat SFT after stage 4 (SPEC 6 gives no SFT recipe; the choices are explained in configs/ouro_1p4b.py):
    # stage 4's context and theta, 4M-token batches, 2 epochs of a nominal 4B-token chat set.
    "sft": PretrainingStage(4, 0.05, 32768, 4 * _M, 2 * 4e9, 1e6, 2e-5, 2e-6, RESTART_WARMUP_STEPS),
}
# The continuous recipe: one schedule over these stages, the optimizer state carried from each to the next.
RECIPE_ORDER = ("stage1a", "stage1b", "stage2", "stage3", "stage4")


def recipe_offset(stage: str, first_stage: str = "stage1a") -> int:
    """The optimizer steps of the recipe before `stage` when it starts at `first_stage` (0 for that one)."""
    chain = RECIPE_ORDER[RECIPE_ORDER.index(first_stage):RECIPE_ORDER.index(stage)]
    return sum(PRETRAINING_STAGES[name].steps for name in chain)


def _stage_optim(c: ml_collections.ConfigDict, s: PretrainingStage, carried: bool, offset: int) -> None:
    """The stage's piece of the warmup-stable-decay schedule: a warmup only where the optimizer is fresh,
    a cosine decay over the whole stage where the rate falls."""
    cosine, warmup = s.end_lr != s.peak_lr, 0 if carried else s.warmup_steps
    c.optim.update(peak_lr=s.peak_lr, init_lr=0.0, warmup_steps=warmup, decay="cosine" if cosine else "none",
                   decay_steps=s.steps - warmup if cosine else 0, end_lr=s.end_lr, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=0.1, clip_norm=1.0, schedule_offset=offset)
    c.train.carry_optimizer = carried


def pretraining_config(model: OuroConfig, stage: str, first_stage: str = "stage1a") -> ml_collections.ConfigDict:
    """The released recipe's `stage` for `model` (its T, beta, sequence length, batch, RoPE theta and
    learning rate, SPEC 6): AdamW (0.9, 0.95), wd 0.1, clip 1.0, bf16 compute over float32 master
    weights, full remat, FSDP over every device. The stages from `first_stage` on form one continuous
    run: each later stage starts from the previous one's workdir (`init_from`) with its optimizer state
    carried (`train.carry_optimizer`) and continues the one schedule (`optim.schedule_offset`): the
    warmup only at `first_stage`'s start, the decays of stages 2 and 4. Stage 1a ramps its batch (4M -> 8M
    tokens, `data.batch_ramp`). "sft" is chat SFT after stage 4 (a fresh optimizer, chat shards)."""
    if stage not in PRETRAINING_STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(PRETRAINING_STAGES)}")
    s = PRETRAINING_STAGES[stage]
    carried = stage in RECIPE_ORDER and RECIPE_ORDER.index(stage) > RECIPE_ORDER.index(first_stage)
    first_batch = (s.ramp_batch_tokens or s.batch_tokens) // s.seq_len
    c = base_config()
    c.model = model_fields(model.replace(total_ut_steps=s.total_ut_steps, rope_theta=s.rope_theta))
    c.execution.update(dtype="bfloat16", param_dtype="float32", remat_policy="full")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.update(sources="", seq_len=s.seq_len, batch_size=first_batch, eval_examples=0)
    if s.ramp_tokens:
        c.data.batch_ramp = f"{int(s.ramp_tokens // s.ramp_batch_tokens)}:{s.batch_tokens // s.seq_len}"
    _stage_optim(c, s, carried, recipe_offset(stage, first_stage) if carried else 0)
    c.loss.update(objective="stage1", beta=s.beta, beta_schedule="constant")
    c.train.update(steps=s.steps, ce_chunk_size=512, log_every=10, checkpoint_every=1000, keep_checkpoints=3,
                   progress_bar=False)
    return c
