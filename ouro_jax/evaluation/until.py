"""Generation that stops at text (`until` strings) while generating, for lm-eval's generate_until.

Rows run in rounds of `check_every` tokens; after each round a row whose text holds an `until` string
(after `think_end_token`, when set: thinking may contain them freely), a stop id, or its full budget is
finished, and the others go on, their text so far read back as the prompt of the next round (a
prefill, as if the user had sent it). So at most `check_every` tokens are wasted past a stop string.
Every round draws its sampling seed from a counter, so repeated requests (pass@k) get distinct samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ouro_jax.config import OuroConfig
from ouro_jax.evaluation.batching import DataParallel
from ouro_jax.inference import generate


def answer_text(text: str, until: Sequence[str], think_end_token: str | None) -> str:
    """The answer of a generation: after the last `think_end_token` (when set and present), cut at the
    first `until` string (as lm-eval's `postprocess_generated_text`)."""
    if think_end_token and think_end_token in text:
        text = text.split(think_end_token)[-1].lstrip()
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _stopped(text: str, until: Sequence[str], think_end_token: str | None) -> bool:
    if think_end_token:
        if think_end_token not in text:
            return False
        text = text.split(think_end_token, 1)[1]
    return any(stop and stop in text for stop in until)


class UntilGenerator:
    """Batched generation with stop strings over the devices of `parallel`."""

    def __init__(self, cfg: OuroConfig, parallel: DataParallel, seed: int, check_every: int, policy: str,
                 think_end_token: str | None):
        if check_every < 0:
            raise ValueError(f"stop_check_tokens must be >= 0, got {check_every}")
        self.cfg, self.parallel, self.seed, self.check_every = cfg, parallel, seed, check_every
        self.policy, self.think_end_token = policy, think_end_token
        self.calls = 0

    def _round(self, rows: list[list[int]], batch: int, tokens: int, options: dict[str, Any]) -> list[list[int]]:
        """`tokens` new ids for every row, `batch` rows per call split over the devices."""
        per_call = max(1, batch // len(self.parallel.devices))
        chunks = [rows[i:i + per_call] for i in range(0, len(rows), per_call)]
        seeds = [(self.seed + self.calls + i) % 2**32 for i in range(len(chunks))]
        self.calls += len(chunks)

        def work(params, chunk_and_seed):
            chunk, seed = chunk_and_seed
            return generate(self.cfg, params, chunk, max_new_tokens=tokens, policy=self.policy, seed=seed,
                            **options).rows()

        return [row for out in self.parallel.map(work, list(zip(chunks, seeds))) for row in out]

    def run(self, prompts: Sequence[list[int]], tokenizer, *, until: Sequence[str], max_new_tokens: int, batch: int,
            depth: int, exit_threshold: float | None, stop_ids: Sequence[int], sampling: dict[str, float],
            progress=None) -> list[str]:
        """The answer text of each prompt (`answer_text` of its generation)."""
        options = dict(depth=depth, exit_threshold=exit_threshold, stop_token_ids=list(stop_ids), **sampling)
        generated: list[list[int]] = [[] for _ in prompts]
        live, done = list(range(len(prompts))), 0
        while live:
            tokens = min(self.check_every or max_new_tokens, max_new_tokens - done)
            rows = self._round([list(prompts[i]) + generated[i] for i in live], batch, tokens, options)
            still = []
            for i, row in zip(live, rows):
                generated[i].extend(row)
                text = tokenizer.decode([t for t in generated[i] if t not in stop_ids])
                ended = len(row) < tokens or (row and row[-1] in stop_ids)
                if not (ended or _stopped(text, until, self.think_end_token) or done + tokens >= max_new_tokens):
                    still.append(i)
                elif progress is not None:
                    progress.update(1)
            live, done = still, done + tokens
        return [answer_text(tokenizer.decode([t for t in g if t not in stop_ids]), until, self.think_end_token)
                for g in generated]
