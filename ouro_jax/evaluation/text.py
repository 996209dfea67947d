"""Per-step cross-entropy and perplexity on text: prepared token shards, JSONL or plain-text files.

Documents are packed into rows ("concat": a document crossing a row boundary continues in the next
row as a new segment) and every next token inside a segment is scored at every recurrent step in
one pass. `TokenScores` keeps the per-token step CE and gate logits, so the Q-exit sweep needs no
second pass.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ouro_jax.data import InMemoryDocuments, TokenShards, make_batch_iterator
from ouro_jax.data.prepare import PrepareError, read_documents
from ouro_jax.data.tokenizer import load_tokenizer
from ouro_jax.errors import OuroError
from ouro_jax.evaluation.forward import StepForward
from ouro_jax.paths import as_path

# ~2,400 words of English prose written for ouro_jax (so in no model's training data): a held-out text of a
# few thousand tokens for the notebooks and quick perplexity checks
HELD_OUT_TEXT = os.path.join(os.path.dirname(__file__), "data", "held_out.txt")


class EvalInputError(OuroError, ValueError):
    """A bad evaluation input (missing or malformed file, vocabulary mismatch)."""


@dataclasses.dataclass
class TokenScores:
    """Scores of every evaluated token: step_ce [T, n] and gate logits {name: [T, n]}."""

    step_ce: np.ndarray
    gate_logits: dict[str, np.ndarray]

    @property
    def num_tokens(self) -> int:
        return int(self.step_ce.shape[1])

    def mean_ce(self) -> np.ndarray:
        return self.step_ce.mean(axis=1)

    def summary(self) -> dict[str, Any]:
        ce = self.mean_ce()
        return {"tokens": self.num_tokens, "step_ce": ce.tolist(), "step_perplexity": np.exp(ce).tolist()}


def text_source(path: str | os.PathLike, vocab_size: int, *, tokenizer: str | None = None, model_dir: str | None = None,
                text_field: str = "text"):
    """A pipeline source for `path`: a prepared shard directory, or a .jsonl / .txt file tokenized with
    `tokenizer` (default: the model directory's tokenizer.json, else the byte tokenizer)."""
    p = as_path(path)
    if not p.exists():
        raise EvalInputError(f"{p}: no such file or directory")
    if p.is_dir():
        try:
            source = TokenShards(p)
        except (FileNotFoundError, ValueError) as e:
            raise EvalInputError(str(e)) from None
    else:
        if tokenizer is None:
            has_own = model_dir is not None and (as_path(model_dir) / "tokenizer.json").is_file()
            tokenizer = model_dir if has_own else "byte"
        try:
            tok = load_tokenizer(tokenizer)
            docs = [np.append(tok.encode(t), tok.eos_id) if tok.eos_id is not None else tok.encode(t)
                    for t in read_documents(p, text_field)]
        except PrepareError as e:  # unknown file type, invalid JSON or UTF-8, a missing text field
            raise EvalInputError(str(e)) from None
        except (FileNotFoundError, OSError) as e:
            raise EvalInputError(f"tokenizer {tokenizer}: {e}") from None
        if not docs:
            raise EvalInputError(f"{p}: no documents")
        source = InMemoryDocuments(docs, vocab_size=tok.vocab_size)
    if source.vocab_size > vocab_size:
        raise EvalInputError(f"{p}: token ids up to {source.vocab_size - 1} do not fit the model's vocabulary of "
                             f"{vocab_size} (pass the model's tokenizer)")
    return source


def text_batches(source, *, seq_len: int, batch_size: int, max_tokens: int | None = None) -> Iterator[dict]:
    """Packed batches of `source` in file order, one pass, up to about `max_tokens` scored tokens."""
    it = make_batch_iterator(source, seq_len=seq_len, batch_size=batch_size, shuffle=False, num_epochs=1,
                             packing="concat", process_index=0, process_count=1, prefetch=0)
    scored = 0
    for batch in it:
        yield batch
        scored += int(batch["loss_mask"].sum())
        if max_tokens is not None and scored >= max_tokens:
            return


def score_text(forward: StepForward, params, source, *, seq_len: int, batch_size: int,
               max_tokens: int | None = None, progress: bool = True) -> TokenScores:
    """Per-token step CE and gate logits of `source` (all steps in one pass per batch)."""
    ce, gates = [], {}
    bar = tqdm(total=max_tokens, unit="tok", desc="text", disable=not progress)
    for batch in text_batches(source, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens):
        out = forward(params, batch)
        valid = batch["loss_mask"] > 0
        ce.append(out["step_ce"][:, valid])
        for name, g in out["gate_logits"].items():
            gates.setdefault(name, []).append(g[:, valid])
        bar.update(int(valid.sum()))
    bar.close()
    if not ce:
        raise EvalInputError("the text source yielded no tokens to score")
    return TokenScores(np.concatenate(ce, axis=1), {k: np.concatenate(v, axis=1) for k, v in gates.items()})
