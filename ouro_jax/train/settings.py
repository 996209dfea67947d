"""Typed run settings: the training ConfigDict narrowed once, by `RunSettings.of(config)`, at the entry
points (`train`, `build_train_program`); everything below them takes these frozen dataclasses.

The dataclasses are the one home of every knob's default and meaning; `train.config.base_config` is
built from them, so `--config.data.seq_len=128` style overrides reach the same fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from ouro_jax import validate
from ouro_jax.config import Execution, OuroConfig
from ouro_jax.errors import ConfigError

DECAY_SHAPES = ("none", "linear", "cosine")
BETA_SCHEDULES = ("constant", "step", "linear")
MAX_LR = 1.0  # AdamW steps are ~lr per parameter: anything larger destroys the weights in one update


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`config.data`: the training stream and the held-out evaluations."""

    sources: str = "mano:max_len=10"  # ';'-separated: "mano:k=v,...", "multihop_qa:...", or a prepared dir
    weights: str = ""                 # comma-separated mixture weights ('' = uniform)
    num_workers: int = 0              # grain worker processes
    seq_len: int = 64
    batch_size: int = 32              # global, in sequences (the first steps' batch with batch_ramp)
    batch_ramp: str = ""              # "STEP:BATCH,...": BATCH sequences per step from step STEP on (a multiple
                                      # of batch_size: the accumulation count grows, the micro-batch stays)
    seed: int = 0                     # order and sampling of the training stream
    eval_examples: int = 256          # held-out examples per evaluation (tasks)
    eval_batch_size: int = 64
    eval_sources: str = ""            # ';'-separated held-out text (prepared dirs, .jsonl, .txt): per-step CE
    eval_tokens: int = 65536          # scored tokens per text eval source
    eval_tokenizer: str = ""          # tokenizer of .jsonl / .txt eval sources ('' = byte)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "eval_batch_size", "eval_tokens"):
            validate.positive(f"data.{name}", getattr(self, name))
        for name in ("num_workers", "eval_examples"):
            validate.integer(f"data.{name}", getattr(self, name), 0)
        _mixture(self.weights)  # refused here, not at the first batch
        validate.batch_ramp(self.batch_ramp, self.batch_size)

    def batch_at(self, step: int) -> int:
        """The global batch (sequences) of the update after `step` updates (`batch_ramp`)."""
        batch = self.batch_size
        for start, size in validate.batch_ramp(self.batch_ramp, self.batch_size):
            batch = size if step >= start else batch
        return batch

    @property
    def batch_multiples(self) -> list[int]:
        """Each batch of the ramp as a multiple of batch_size (1 first)."""
        return [1] + [size // self.batch_size for _, size in validate.batch_ramp(self.batch_ramp, self.batch_size)]

    @property
    def source_specs(self) -> list[str]:
        specs = _split(self.sources, ";")
        if not specs:
            raise ConfigError("data.sources is empty; give e.g. 'mano:max_len=10' or a prepared directory")
        return specs

    @property
    def eval_paths(self) -> list[str]:
        return _split(self.eval_sources, ";")

    @property
    def mixture_weights(self) -> list[float] | None:
        return _mixture(self.weights)


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """`config.optim`: AdamW with global-norm clipping on a warmup-stable-decay learning rate (optim.py)."""

    peak_lr: float = 3e-4
    init_lr: float = 0.0
    end_lr: float = 3e-5
    warmup_steps: int = 100
    decay: str = "cosine"             # one of DECAY_SHAPES: the final phase's shape
    decay_steps: int = 0              # length of the final decay phase
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0     # None: no clipping
    schedule_offset: int = 0          # a stage of a continuous recipe: the schedule steps before it; the rate
                                      # at optimizer count c is this stage's schedule at c - schedule_offset

    def __post_init__(self):
        for name in ("peak_lr", "init_lr", "end_lr"):
            validate.number(f"optim.{name}", getattr(self, name), 0.0, MAX_LR)
        for name in ("b1", "b2"):
            if not 0.0 <= validate.number(f"optim.{name}", getattr(self, name), 0.0, 1.0) < 1.0:
                raise ConfigError(f"optim.{name} must be below 1, got {getattr(self, name)!r}")
        validate.number("optim.eps", self.eps, 0.0, 1.0, low_open=True)
        validate.number("optim.weight_decay", self.weight_decay, 0.0, 1e3)
        if self.clip_norm is not None:
            validate.number("optim.clip_norm", self.clip_norm, 0.0, low_open=True)
        validate.choice("optim.decay", self.decay, DECAY_SHAPES)
        validate.integer("optim.warmup_steps", self.warmup_steps, 0)
        validate.integer("optim.decay_steps", self.decay_steps, 0)
        validate.integer("optim.schedule_offset", self.schedule_offset, 0)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """`config.loss`: the objective ("stage1" | "last_step" | "stage2", losses.OBJECTIVES), the exit
    entropy weight beta and its schedule (stage1), gate_k and gate_gamma (stage2)."""

    objective: str = "stage1"
    beta: float = 0.1
    beta_final: float = 0.05
    beta_schedule: str = "constant"   # one of BETA_SCHEDULES
    beta_switch_step: int = 0
    gate_k: float = 50.0
    gate_gamma: float = 0.005

    def __post_init__(self):
        validate.objective(self.objective)
        validate.loss_beta(self.beta)
        validate.loss_beta(self.beta_final, "loss.beta_final")
        validate.choice("loss.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.beta_schedule != "constant":
            validate.integer(f"loss.beta_switch_step (a {self.beta_schedule!r} schedule)", self.beta_switch_step, 1)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """`config.train`: steps, accumulation, checkpoints, logging, evaluation, faults, instrumentation."""

    steps: int = 1000
    grad_accum: int = 1
    ce_chunk_size: int = 1024
    gather_weights_once: bool = False  # FSDP: gather the layer stack once per step, not once per loop
    log_every: int = 10               # stdout lines and metric fetches; JSONL and TensorBoard get every step
    stop_check_every: int = 10        # several processes: agree on a SIGTERM/SIGINT every this many steps
    progress_bar: bool = True
    eval_every: int = 0               # 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    restart_incompatible: bool = False  # checkpoints that do not fit / restore: move the old run aside, start over
    carry_optimizer: bool = False     # with init_from=PREVIOUS_WORKDIR: its optimizer state too (moments, count)
    allow_changes: str = ""           # resume despite these config changes, e.g. "data.batch_size,model.total_ut_steps"
    max_consecutive_nonfinite: int = 5
    export_params: bool = True        # params-only export to WORKDIR/params at the end
    compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # XLA options
    compilation_cache_dir: str = ""   # persistent compiled programs ('' = WORKDIR/compilation_cache, 'none' = off)
    compilation_cache_min_secs: float = 1.0  # cache programs that took at least this long to compile
    wandb_project: str = ""           # also log to Weights & Biases (optional extra: pip install 'ouro_jax[wandb]')
    profile_steps: str = ""           # 'A:B': a jax.profiler trace of steps A..B in WORKDIR/profile

    def __post_init__(self):
        for name in ("steps", "grad_accum", "ce_chunk_size", "log_every", "stop_check_every", "checkpoint_every"):
            validate.positive(f"train.{name}", getattr(self, name))

    @property
    def allowed_changes(self) -> set[str]:
        return set(_split(self.allow_changes, ","))


SECTIONS = {"data": DataSettings, "optim": OptimSettings, "loss": LossSettings, "train": TrainSettings}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """A whole run: the model (checkpoint fields + execution), the mesh sizes, and the sections above."""

    model: OuroConfig
    mesh: Mapping[str, int]
    data: DataSettings
    optim: OptimSettings
    loss: LossSettings
    train: TrainSettings
    seed: int = 0                     # parameter initialization
    init_from: str = ""               # model to start from (ouro_jax.model_source); "" = none
    distributed: bool = False         # jax.distributed.initialize() first (multi-host TPU / GPU clusters)

    @classmethod
    def of(cls, config) -> RunSettings:
        """`config` (a training ConfigDict, or already a RunSettings) as typed settings; an unknown or
        mistyped field raises ConfigError naming it."""
        if isinstance(config, RunSettings):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        known = {"model", "execution", "mesh", *SECTIONS, "seed", "init_from", "distributed"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {unknown}")
        model = OuroConfig.from_dict(dict(values["model"]), Execution.from_dict(dict(values["execution"])))
        sections = {name: _section(name, kind, values[name]) for name, kind in SECTIONS.items()}
        mesh = {k: validate.integer(f"mesh.{k}", v) for k, v in values["mesh"].items()}
        return cls(model=model, mesh=mesh, seed=validate.integer("seed", values.get("seed", 0)),
                   init_from=str(values.get("init_from", "")), distributed=bool(values.get("distributed", False)),
                   **sections)

    def to_dict(self) -> dict[str, Any]:
        """The ConfigDict form (what `config.json` of a workdir holds)."""
        out = {"seed": self.seed, "init_from": self.init_from, "distributed": self.distributed,
               "model": self.model.to_dict(), "execution": dataclasses.asdict(self.model.execution),
               "mesh": dict(self.mesh)}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["train"]["compiler_options"] = dict(self.train.compiler_options)
        return out

    def replace(self, **changes) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def at_batch_multiple(self, multiple: int) -> RunSettings:
        """This run with `multiple` x data.batch_size sequences per step and as many more micro-batches
        (the micro-batch stays): the program of a `data.batch_ramp` batch."""
        data = dataclasses.replace(self.data, batch_size=self.data.batch_size * multiple, batch_ramp="")
        train = dataclasses.replace(self.train, grad_accum=self.train.grad_accum * multiple)
        return self.replace(data=data, train=train)


def defaults(kind) -> dict[str, Any]:
    """The default values of a settings dataclass, as a plain dict (for the ConfigDict)."""
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(kind)}


def _split(text: str, sep: str) -> list[str]:
    return [part.strip() for part in str(text).split(sep) if part.strip()]


def _mixture(text: str) -> list[float] | None:
    try:
        weights = [float(w) for w in _split(text, ",")]
    except ValueError:
        raise ConfigError(f"data.weights must be comma-separated numbers, got {text!r}") from None
    return [validate.number("data.weights", w, 0.0) for w in weights] or None


def _section(name: str, kind, values) -> Any:
    values = dict(values)
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown {name} field(s): {', '.join(f'{name}.{k}' for k in unknown)}")
    return kind(**{key: _typed(f"{name}.{key}", hints[key], value) for key, value in values.items()})


def _typed(name: str, hint, value):
    """`value` as the field's type: ints stay ints (3.0 is refused), floats accept ints, None only where allowed."""
    if typing.get_origin(hint) is Mapping:
        return dict(value)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(k for k in typing.get_args(hint) if k is not type(None))
    if hint is float:
        return validate.number(name, value) if not isinstance(value, bool) else _wrong(name, "a number", value)
    if hint is int:
        return validate.integer(name, value) if isinstance(value, int) else _wrong(name, "an integer", value)
    return value if isinstance(value, hint) else _wrong(name, f"a {hint.__name__}", value)


def _wrong(name: str, what: str, value):
    raise ConfigError(f"{name} must be {what}, got {value!r}")
