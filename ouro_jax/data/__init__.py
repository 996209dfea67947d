"""Data for ouro_jax: tokenizers, token-shard preparation, grain pipelines, synthetic tasks.

Batches (every array [batch_size, seq_len], numpy):
  input_ids    int32    packed token ids, 0 (= <|endoftext|> / pad) in padding
  targets      int32    the next token within the same document; 0 wherever loss_mask is 0
  segment_ids  int32    1, 2, ... per packed document in the row, 0 = padding
  positions    int32    offset of each token inside its document (piece), from 0
  loss_mask    float32  1 where the target counts: every real next token for text,
                        the answer tokens only for synthetic tasks, what the assistant
                        writes for chats (shards of `ouro-prepare --chat`)

The iterator:

  make_batch_iterator(sources, *, seq_len, batch_size, weights=None, seed=0, shuffle=True,
                      num_epochs=None, num_workers=0, process_index=None, process_count=None,
                      packing="auto", read_threads=0, prefetch=2) -> grain.DatasetIterator

`sources`: one or a list of `TokenShards(dir)` (written by `ouro-prepare`),
`InMemoryDocuments(token arrays, target_weights)`, tasks (`Mano`, `MultiHopQA`, `make_task(name, **kw)`),
or specs for `make_source` ("mano:max_len=10",
a prepared directory, {"kind": "shards", "path": ...}). `batch_size` is per process; the process
shard defaults to `jax.process_index()/process_count()`. State: `it.get_state()` (JSON-able) /
`it.set_state(state)`, or orbax `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.

Tasks: `vocab_size`, `max_example_len`, `eval_set(n) -> EvalSet(prompts [n, P], answers [n, A])`,
`evaluate(prompts, predicted_answers) -> accuracy` (answers recomputed from the prompts),
`detokenize(tokens)`. Tokenizers: `ByteTokenizer()` (no files, vocab 259), `HFTokenizer(path)`,
`load_tokenizer("byte" | path)`; ChatML: `render_chatml(messages)`, `encode_chat(tok, messages)`; chats through
the tokenizer's own template with the assistant mask: `chat_data.ChatEncoder(tok, tokenizer_dir)(messages)`.
"""

from ouro_jax.data.chatml import encode_chat, render_chatml
from ouro_jax.data.mano import Mano
from ouro_jax.data.multihop import MultiHopQA
from ouro_jax.data.packing import training_batch
from ouro_jax.data.pipeline import InMemoryDocuments, make_batch_dataset, make_batch_iterator, make_source, make_task
from ouro_jax.data.shards import TokenShards
from ouro_jax.data.tasks import EvalSet, SyntheticTask
from ouro_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "EvalSet", "HFTokenizer", "InMemoryDocuments", "Mano", "MultiHopQA", "SyntheticTask",
    "TokenShards",
    "encode_chat", "load_tokenizer", "make_batch_dataset", "make_batch_iterator", "make_source", "make_task",
    "render_chatml", "training_batch",
]
