"""The training ConfigDict: every knob of a run, with defaults; `configs/*.py` start from `base_config`.

    config.stage            1 (Stage I, every parameter) or 2 (Stage II, the exit gate only)
    config.seed             parameter initialization
    config.init_from        params checkpoint (ouro_jax or HF directory) to start from; '' = random init
    config.model            the checkpoint fields of OuroConfig (shapes, vocabulary, T, RoPE, exit threshold)
    config.execution        how it runs (Execution: dtype = compute, param_dtype = master weights, remat, unroll)
    config.mesh             sizes of the ('data', 'fsdp', 'tensor') mesh; one may be -1 (the rest)
    config.data             sources (ouro_jax.data specs), seq_len, global batch_size, seed, evaluation size,
                            eval_sources (held-out text scored every train.eval_every steps)
    config.optim            AdamW, clipping and the warmup-stable-decay learning rate (optim.py)
    config.loss             beta and its schedule (Stage I), gate_k and gate_gamma (Stage II)
    config.train            steps, grad_accum, checkpointing, logging, evaluation, non-finite policy

Override on the command line: `--config.train.steps=100 --config.execution.dtype=bfloat16`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ouro_jax.config import Execution, OuroConfig


def model_fields(cfg: OuroConfig) -> ml_collections.ConfigDict:
    """`config.model`: the checkpoint fields of `cfg`."""
    return ml_collections.ConfigDict(cfg.to_dict())


def execution_fields(execution: Execution) -> ml_collections.ConfigDict:
    """`config.execution`: the execution settings."""
    return ml_collections.ConfigDict(dataclasses.asdict(execution))


def model_config(config) -> OuroConfig:
    """The OuroConfig of a training config (unknown or mistyped fields raise ConfigError)."""
    return OuroConfig.from_dict(dict(config.model), Execution.from_dict(dict(config.execution)))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = 1
    c.seed = 0
    c.init_from = ""
    c.distributed = False  # jax.distributed.initialize() first (multi-host TPU / GPU clusters)
    c.model = model_fields(OuroConfig())
    c.execution = execution_fields(Execution())
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.data = ml_collections.ConfigDict(dict(
        sources="mano:max_len=10",  # ';'-separated: "mano:k=v,...", "multihop_qa:...", or a prepared dir
        weights="",               # comma-separated mixture weights ('' = uniform)
        num_workers=0,            # grain worker processes
        seq_len=64,
        batch_size=32,            # global, in sequences
        seed=0,                   # order and sampling of the training stream
        eval_examples=256,        # held-out examples per evaluation (tasks)
        eval_batch_size=64,
        eval_sources="",          # ';'-separated held-out text (prepared dirs, .jsonl, .txt): per-step CE / perplexity
        eval_tokens=65536,        # scored tokens per text eval source
        eval_tokenizer="",        # tokenizer of .jsonl / .txt eval sources ('' = byte)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        peak_lr=3e-4, init_lr=0.0, end_lr=3e-5, warmup_steps=100, decay="cosine", decay_steps=0,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
    ))
    c.loss = ml_collections.ConfigDict(dict(
        beta=0.1, beta_final=0.05, beta_schedule="constant", beta_switch_step=0,
        gate_k=50.0, gate_gamma=0.005,
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        grad_accum=1,
        ce_chunk_size=1024,
        gather_weights_once=False,  # FSDP: gather the layer stack once per step, not once per loop
        log_every=10,             # stdout lines and metric fetches; JSONL and TensorBoard get every step
        stop_check_every=10,      # several processes: agree on a SIGTERM/SIGINT every this many steps
        progress_bar=True,
        eval_every=0,             # 0: only at the end
        checkpoint_every=500,
        keep_checkpoints=3,
        async_checkpointing=True,
        max_consecutive_nonfinite=5,
        export_params=True,       # params-only export to WORKDIR/params at the end
        compiler_options=ml_collections.ConfigDict(),  # XLA options, e.g. xla_backend_optimization_level
    ))
    return c


# Stage-1 recipe of the released models (SPEC 6): name -> (T, beta, batch in sequences of 4096, tokens).
PRETRAINING_STAGES = {
    "stage1a": (8, 0.1, 1024, 3e12),   # 4M-token batches (the paper ramps to 8M), warmup + constant 3e-4
    "stage1b": (4, 0.05, 2048, 3e12),  # 8M-token batches, constant 3e-4
}
PRETRAINING_SEQ_LEN = 4096


def pretraining_config(model: OuroConfig, stage: str) -> ml_collections.ConfigDict:
    """The released stage-1 recipe for `model`: AdamW (0.9, 0.95), wd 0.1, clip 1.0, lr 3e-4, RoPE
    theta 10K, bf16 compute over float32 master weights, full remat, FSDP over every device."""
    if stage not in PRETRAINING_STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(PRETRAINING_STAGES)}")
    steps_t, beta, batch, tokens = PRETRAINING_STAGES[stage]
    c = base_config()
    c.model = model_fields(model.replace(total_ut_steps=steps_t, rope_theta=10_000.0))
    c.execution.update(dtype="bfloat16", param_dtype="float32", remat_policy="full")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.update(sources="", seq_len=PRETRAINING_SEQ_LEN, batch_size=batch, eval_examples=0)
    c.optim.update(peak_lr=3e-4, init_lr=0.0, warmup_steps=2000 if stage == "stage1a" else 0, decay="none",
                   decay_steps=0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    c.loss.update(beta=beta, beta_schedule="constant")
    c.train.update(steps=int(tokens // (batch * PRETRAINING_SEQ_LEN)), ce_chunk_size=512, log_every=10,
                   checkpoint_every=1000, keep_checkpoints=3, progress_bar=False)
    return c
