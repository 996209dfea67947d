"""Tiny model on Mano for tests and smoke runs: seconds on one CPU core."""

from ouro_jax import config as model_presets
from ouro_jax.train.config import base_config, model_fields


def get_config():
    c = base_config()
    c.model = model_fields(model_presets.tiny(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_attention_heads=2, num_key_value_heads=2))
    c.data.sources = "mano:max_len=4"
    c.data.seq_len = 16
    c.data.batch_size = 8
    c.data.eval_examples = 32
    c.data.eval_batch_size = 32
    c.optim.update(peak_lr=3e-3, warmup_steps=2, decay="linear", decay_steps=0, end_lr=3e-4)
    c.train.update(steps=20, log_every=5, checkpoint_every=10, keep_checkpoints=3, ce_chunk_size=16,
                   progress_bar=False)
    return c
