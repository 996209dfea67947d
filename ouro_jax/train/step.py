"""The sharded train step: the objective's loss, gradient accumulation, AdamW update, non-finite skips.

`build_train_program(config, mesh)` returns everything jitted once for a config and a mesh: `init`
(rng -> TrainState placed on the mesh), `step` ((state, batch) -> (state, metrics), the state
donated) and `evaluate` ((params, batch) -> per-step sums and predictions), plus the abstract,
sharded state and batch, so ahead-of-time compilation can call `program.step.lower(
program.abstract_state, program.abstract_batch)` without any device memory.

Batches are dicts of [B, S] arrays: input_ids, targets, segment_ids, positions (int32) and
loss_mask (float32). `config.loss.objective` picks the loss and what it trains: "stage1" every
parameter, "last_step" all but the exit gate, "stage2" only the exit gate. The optimizer state
covers the trainable subtree alone and the frozen parameters pass through untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ouro_jax import sharding as shd
from ouro_jax import validate
from ouro_jax.config import OuroConfig
from ouro_jax.errors import ConfigError
from ouro_jax.exit import exit_entropy, exit_pdf
from ouro_jax.losses import objective_token_loss
from ouro_jax.model import Ouro, abstract_params, init_params
from ouro_jax.train.config import check_training
from ouro_jax.train.optim import beta_schedule, lr_schedule, make_optimizer
from ouro_jax.train.settings import RunSettings

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
# Which top-level param groups an objective trains.
OBJECTIVE_TRAINS = {"stage1": lambda name: True, "last_step": lambda name: name != "exit_gate",
                    "stage2": lambda name: name == "exit_gate"}


@flax.struct.dataclass
class TrainState:
    step: jax.Array              # int32 [], batches consumed (skipped updates count too)
    params: Any                  # float32 master weights, the full model
    opt_state: Any               # optimizer state of the trainable subtree only
    nonfinite_total: jax.Array   # int32 [], updates skipped for a non-finite loss or gradient
    nonfinite_streak: jax.Array  # int32 [], consecutive skipped updates up to this step


class TrainProgram(NamedTuple):
    model_cfg: OuroConfig
    objective: str               # one of losses.OBJECTIVES
    mesh: Mesh
    optimizer: optax.GradientTransformation
    init: Callable[[jax.Array], TrainState]
    step: Any                    # jitted (state, batch) -> (state, metrics)
    evaluate: Any                # jitted (params, batch) -> {"step_ce_sum" [T], "tokens", "predictions" [T,B,S]}
    state_shardings: TrainState
    abstract_state: TrainState   # ShapeDtypeStructs with shardings
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    batch_sharding: NamedSharding


def split_trainable(params: dict[str, Any], objective: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen) top-level groups of `params` for a training objective."""
    trains = OBJECTIVE_TRAINS[validate.objective(objective)]
    return {k: v for k, v in params.items() if trains(k)}, {k: v for k, v in params.items() if not trains(k)}


def batch_loss_sums(model_cfg: OuroConfig, params: dict[str, Any], batch: dict[str, jax.Array], *,
                    objective: str, beta, gate_k: float, gate_gamma: float,
                    ce_chunk_size: int) -> tuple[jax.Array, dict]:
    """Token-summed objective of one (micro)batch and its per-step statistics (sums over valid tokens)."""
    out = Ouro(model_cfg).apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"], targets=batch["targets"],
                                return_hidden=False, ce_chunk_size=ce_chunk_size)
    mask = batch["loss_mask"].astype(jnp.float32)
    token_loss = objective_token_loss(objective, out.step_ce, out.gate_logits, beta=beta, gate_k=gate_k,
                                      gate_gamma=gate_gamma)
    stats = {
        "step_ce_sum": jnp.sum(out.step_ce * mask, axis=(1, 2)),
        "exit_p_sum": jnp.sum(exit_pdf(out.gate_logits) * mask, axis=(1, 2)),
        "entropy_sum": jnp.sum(exit_entropy(out.gate_logits) * mask),
        "tokens": jnp.sum(mask),
    }
    return jnp.sum(token_loss * mask), jax.tree.map(jax.lax.stop_gradient, stats)


def _microbatches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """[B, S] -> [num, B/num, S] with microbatch i = rows i, i+num, ...: each keeps its rows spread
    over the same devices as the full batch."""
    def split(x):
        rows = x.shape[0]
        return x.reshape(rows // num, num, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def updates_applied(opt_state) -> jax.Array:
    """The schedule's step count inside the optimizer state (skipped updates do not advance it)."""
    counts = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"]
    return counts[0]


def _fresh_state(optimizer: optax.GradientTransformation, objective: str, params: dict[str, Any]) -> TrainState:
    """Step 0: `params` with a new optimizer state for their trainable subtree and zeroed counters."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, optimizer.init(split_trainable(params, objective)[0]), zero, zero)


def all_finite(tree) -> jax.Array:
    """Whether every element of `tree` is finite (traceable; the train step checks its updated parameters,
    which can overflow with finite gradients, and the checkpointer refuses to save non-finite ones)."""
    return jax.tree.reduce(lambda ok, x: ok & jnp.isfinite(x).all(), tree, jnp.bool_(True))


def _where_tree(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


class _LossSettings(NamedTuple):
    objective: str
    gate_k: float
    gate_gamma: float
    ce_chunk_size: int


def _weight_gatherer(gather_once: bool, model_cfg: OuroConfig, param_shardings) -> Callable[[Any], Any]:
    """params -> params with the looped weights gathered whole (train.gather_weights_once), else as is.

    FSDP gathers each weight where it is used: inside the recurrent loop, T times per pass. Gathering
    every weight the loop uses once per train step instead (in the compute dtype; the gate stays
    float32) makes T x fewer all-gathers, at the cost of holding those weights and their gradients
    whole on every chip. The embedding is used once anyway.
    """
    if not gather_once:
        return lambda params: params
    in_loop = [k for k in param_shardings if k != "embed_tokens"]
    gathered = {k: shd.without_axis(param_shardings[k], "fsdp") for k in in_loop}

    def cast(name, tree):
        return tree if name == "exit_gate" else jax.tree.map(lambda x: x.astype(model_cfg.compute_dtype), tree)

    return lambda params: {**params, **{k: jax.lax.with_sharding_constraint(cast(k, params[k]), gathered[k])
                                        for k in in_loop}}


def _loss_and_grads(grad_fn, trainable, batch, accum: int):
    """((loss, stats), grads) of a batch, summed over `accum` microbatches in a scan."""
    if accum == 1:
        return grad_fn(trainable, batch)

    def accumulate(carry, microbatch):
        return jax.tree.map(jnp.add, carry, grad_fn(trainable, microbatch)), None

    microbatches = _microbatches(batch, accum)
    first = jax.tree.map(lambda x: x[0], microbatches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, trainable, first))
    return jax.lax.scan(accumulate, zeros, microbatches)[0]


def _make_train_step(run: RunSettings, mesh: Mesh, optimizer, losses: _LossSettings, gather):
    """(state, batch) -> (state, metrics): one optimizer update, skipped when the loss, the gradient or the
    updated parameters are non-finite."""
    model_cfg, accum = run.model, run.train.grad_accum
    learning_rate = lr_schedule(run.optim, run.train.steps)
    beta_at = beta_schedule(run.loss)

    def train_step(state: TrainState, batch):
        with shd.activation_rules(mesh):
            trainable, frozen = split_trainable(state.params, losses.objective)
            beta = beta_at(state.step)
            total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

            def loss_fn(trainable, microbatch):
                loss_sum, stats = batch_loss_sums(model_cfg, gather({**frozen, **trainable}), microbatch,
                                                  beta=beta, **losses._asdict())
                return loss_sum / total_tokens, stats

            (loss, stats), grads = _loss_and_grads(jax.value_and_grad(loss_fn, has_aux=True), trainable, batch, accum)
            grad_norm = optax.tree.norm(grads)
            updates, new_opt_state = optimizer.update(grads, state.opt_state, trainable)
            updated = optax.apply_updates(trainable, updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(updated)
            new_trainable = _where_tree(finite, updated, trainable)
            new_opt_state = _where_tree(finite, new_opt_state, state.opt_state)
            skipped = (~finite).astype(jnp.int32)
            new_state = TrainState(step=state.step + 1, params={**frozen, **new_trainable}, opt_state=new_opt_state,
                                   nonfinite_total=state.nonfinite_total + skipped,
                                   nonfinite_streak=(state.nonfinite_streak + 1) * skipped)
            tokens = jnp.maximum(stats["tokens"], 1.0)
            metrics = {
                "loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate(updates_applied(state.opt_state)),
                "beta": jnp.asarray(beta, jnp.float32), "step_ce": stats["step_ce_sum"] / tokens,
                "exit_p": stats["exit_p_sum"] / tokens, "entropy": stats["entropy_sum"] / tokens,
                "loss_tokens": stats["tokens"], "batch_tokens": jnp.float32(batch["input_ids"].size),
                "skipped": skipped,
                "nonfinite_total": new_state.nonfinite_total, "nonfinite_streak": new_state.nonfinite_streak,
            }
            return new_state, metrics

    return train_step


def _make_eval_step(model_cfg: OuroConfig, mesh: Mesh, ce_chunk_size: int):
    """(params, batch) -> per-step CE sums, token count and per-step argmax predictions [T, B, S]."""

    def eval_step(params, batch):
        with shd.activation_rules(mesh):
            model = Ouro(model_cfg)
            out = model.apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"], targets=batch["targets"], ce_chunk_size=ce_chunk_size)
            mask = batch["loss_mask"].astype(jnp.float32)
            predict = lambda h: model.apply({"params": params}, h, method=Ouro.predict)
            return {"step_ce_sum": jnp.sum(out.step_ce * mask, axis=(1, 2)), "tokens": jnp.sum(mask),
                    "predictions": jax.lax.map(predict, out.hidden_states)}

    return eval_step


def build_train_program(config, mesh: Mesh, compiler_options: dict[str, Any] | None = None) -> TrainProgram:
    """Jitted init / train step / eval step of `config` (a training ConfigDict or its RunSettings) on
    `mesh`, with the state's shardings.

    `compiler_options` go to XLA (e.g. {"xla_backend_optimization_level": 0} compiles faster on CPU).
    """
    run = RunSettings.of(config)
    model_cfg, objective = run.model, check_training(run)
    accum, batch_size, seq_len = run.train.grad_accum, run.data.batch_size, run.data.seq_len
    if batch_size % accum:
        raise ConfigError(f"data.batch_size ({batch_size}) must be divisible by train.grad_accum ({accum})")
    shd.check_batch_divisible(batch_size // accum, mesh)
    optimizer = make_optimizer(run.optim, run.train.steps)
    losses = _LossSettings(objective, run.loss.gate_k, run.loss.gate_gamma, run.train.ce_chunk_size)

    abstract_boxed = jax.eval_shape(lambda params: _fresh_state(optimizer, objective, params),
                                    abstract_params(model_cfg))
    state_shardings = shd.tree_shardings(abstract_boxed, mesh)
    abstract_state = shd.with_shardings(shd.unbox_abstract(abstract_boxed), state_shardings)
    batch_sharding = NamedSharding(mesh, shd.batch_spec(mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                              sharding=batch_sharding) for k in BATCH_KEYS}
    gather = _weight_gatherer(run.train.gather_weights_once, model_cfg, state_shardings.params)
    train_step = _make_train_step(run, mesh, optimizer, losses, gather)
    eval_step = _make_eval_step(model_cfg, mesh, losses.ce_chunk_size)
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    return TrainProgram(
        model_cfg=model_cfg, objective=objective, mesh=mesh, optimizer=optimizer,
        init=jax.jit(lambda rng: _fresh_state(optimizer, objective, init_params(model_cfg, rng)),
                     out_shardings=state_shardings, compiler_options=compiler_options),
        step=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                     compiler_options=compiler_options),
        evaluate=jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings),
                         out_shardings=replicated, compiler_options=compiler_options),
        state_shardings=state_shardings, abstract_state=abstract_state, abstract_batch=abstract_batch,
        batch_sharding=batch_sharding)


def as_model_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The five batch arrays in their canonical dtypes (missing or extra keys raise)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; a training batch needs {list(BATCH_KEYS)}")
    return {k: np.asarray(batch[k], np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}


def place_params(program: TrainProgram, params: dict[str, Any]) -> TrainState:
    """A step-0 state holding `params` (e.g. a pretrained LM for Stage II), placed on the mesh."""
    params = jax.device_put(nn.unbox(params), program.state_shardings.params)
    return jax.jit(functools.partial(_fresh_state, program.optimizer, program.objective),
                   out_shardings=program.state_shardings)(params)
