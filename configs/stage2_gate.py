"""Stage II (SPEC 4): the LM frozen, only the exit gate trained toward its "continue" labels.

    python -m ouro_jax.cli.train --config configs/stage2_gate.py --workdir RUN \\
        --config.init_from=PATH --config.data.sources=DIR_OR_TASK

PATH is an HF Ouro directory or a params checkpoint of ours; every model field comes from it (the frozen LM
runs as trained; an explicit --config.model.* still wins);
labels w_t = sigmoid(k (max(0, CE_{t-1} - CE_t) - gamma)) with k = loss.gate_k, gamma = loss.gate_gamma.
The optimizer holds state for the gate only; every LM parameter leaves bit-identical.
"""

from ouro_jax import config as model_presets
from ouro_jax.train.config import base_config, model_fields


def get_config():
    c = base_config()
    c.loss.objective = "stage2"
    c.model = model_fields(model_presets.ouro_1p4b())
    c.execution.update(dtype="bfloat16", param_dtype="float32", remat_policy="none")
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.update(sources="", seq_len=2048, batch_size=64, eval_examples=0)
    c.optim.update(peak_lr=1e-3, init_lr=0.0, warmup_steps=100, decay="cosine", decay_steps=500, end_lr=1e-4,
                   weight_decay=0.0, clip_norm=1.0)
    c.loss.update(gate_k=50.0, gate_gamma=0.005)
    c.train.update(steps=2000, ce_chunk_size=512, log_every=10, checkpoint_every=500, keep_checkpoints=2,
                   progress_bar=False)
    return c
