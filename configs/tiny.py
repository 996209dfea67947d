"""Tiny model on Mano for tests and smoke runs: seconds on one CPU core.

`configs/tiny.py:sft` is the SFT stage at this size, to try chat SFT on a CPU: byte-tokenizer chats
(`ouro-prepare chats.jsonl --chat --output DIR`, vocabulary 259) through the assistant-only target mask,
Stage I objective, 128-token rows; set `--config.data.sources=DIR` (and `--config.init_from=RUN/params` of a
tiny run on byte text, or nothing to start from random weights).
"""

from ouro_jax import config as model_presets
from ouro_jax.train.config import base_config, model_fields


def get_config(stage: str = ""):
    if stage not in ("", "sft"):
        raise ValueError(f"unknown stage {stage!r} of configs/tiny.py; choose 'sft' or none")
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
    if stage == "sft":
        c.model = model_fields(model_presets.tiny(vocab_size=264, hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=2, num_key_value_heads=2, total_ut_steps=4,
                                                  max_position_embeddings=128))
        c.data.update(sources="", seq_len=128, batch_size=4, eval_examples=0)
        c.optim.update(peak_lr=3e-3, warmup_steps=2, decay="cosine", decay_steps=10, end_lr=3e-4)
        c.loss.update(objective="stage1", beta=0.05)
        c.train.update(ce_chunk_size=64)
    return c
