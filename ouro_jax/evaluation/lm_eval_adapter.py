"""The lm-evaluation-harness backend `ouro_jax`: `lm_eval --model ouro_jax --model_args pretrained=DIR,...`.

Model args: pretrained (HF Ouro directory, ouro_jax params checkpoint or hub id), depth (recurrent
steps; default the trained T), exit_threshold (Q-exit q; default the checkpoint's, 1.0 = last step),
exit_at_step (0-based static exit; wins over exit_threshold, the released priority), policy (decode
KV-cache policy of generate_until: full, last, first, average), batch_size, dtype, tokenizer
(tokenizer.json; default the model directory's), max_length (default max_position_embeddings).

Scoring follows lm-eval's own `hf` backend token for token (the shared `TemplateLM` tokenization,
rolling windows for perplexity), so the two agree on an export of the same weights. lm_eval finds
this backend by name through the import hook the package installs (`lm_eval_hook.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401 -- lm_eval registers its own backends only while its registry is empty
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ouro_jax import validate
from ouro_jax.data.tokenizer import HFTokenizer
from ouro_jax.evaluation.runner import load_checkpoint
from ouro_jax.exit import select_logits
from ouro_jax.inference import generate, prompt_bucket
from ouro_jax.model import Ouro


def _optional(value, cast):
    return None if value is None or str(value).lower() in ("", "none") else cast(value)


@register_model("ouro_jax")
class OuroJaxLM(TemplateLM):
    """lm-eval `LM` over an Ouro checkpoint, with run-time depth and exit settings."""

    def __init__(self, pretrained: str, depth=None, exit_threshold=None, exit_at_step=None, policy: str = "full",
                 batch_size=8, dtype=None, tokenizer=None, max_length=None, **kwargs):
        super().__init__()
        kwargs.pop("device", None)  # jax places arrays itself; lm_eval passes device and max_batch_size
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise ValueError(f"unknown ouro_jax model args: {sorted(kwargs)}")
        path, self.cfg, self.params = load_checkpoint(pretrained, **({"dtype": str(dtype)} if dtype else {}))
        depth = _optional(depth, float)
        self.depth = self.cfg.total_ut_steps if depth is None else validate.num_steps(depth, "depth")
        exit_at_step = _optional(exit_at_step, float)
        self.exit_at_step = None if exit_at_step is None else validate.exit_step(exit_at_step, self.depth)
        threshold = _optional(exit_threshold, float)
        self.exit_threshold = self.cfg.early_exit_threshold if threshold is None else validate.exit_threshold(threshold)
        self.policy = validate.kv_policy(policy, "policy")
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.tokenizer = HFTokenizer(tokenizer or path)
        self._max_length = _optional(max_length, int) or self.cfg.max_position_embeddings
        self._scores = jax.jit(self._token_scores)

    # ---- what TemplateLM needs -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.cfg.pad_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).tolist()

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring ---------------------------------------------------------------------------------

    def _token_scores(self, params, ids, targets, segments):
        """log p(target) and whether it is the argmax, [B, S], under the selected exit mode."""
        model = Ouro(self.cfg)
        out = model.apply({"params": params}, ids, segment_ids=segments, num_steps=self.depth)
        step_logits = model.apply({"params": params}, out.hidden_states, method=Ouro.logits)
        logits = select_logits(step_logits, out.gate_logits, exit_at_step=self.exit_at_step,
                               exit_threshold=self.exit_threshold)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == targets

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p, greedy) of each continuation after its context; rows are (input tokens, continuation)."""
        length = prompt_bucket(max(len(inp) for inp, _ in rows))
        ids = np.zeros((self.batch_size, length), np.int32)
        targets = np.zeros_like(ids)
        segments = np.zeros_like(ids)
        for b, (inp, cont) in enumerate(rows):
            n = len(inp)
            ids[b, :n] = inp
            segments[b, :n] = 1
            targets[b, n - len(cont):n] = cont
        picked, greedy = jax.device_get(self._scores(self.params, ids, targets, segments))
        out = []
        for b, (inp, cont) in enumerate(rows):
            span = slice(len(inp) - len(cont), len(inp))
            out.append((float(picked[b, span].sum()), bool(greedy[b, span].all())))
        return out

    def _score_all(self, rows: list[tuple[list[int], list[int]]], desc: str, disable: bool) -> list[tuple[float, bool]]:
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a bucket
        results: list = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable):
            chunk = order[start:start + self.batch_size]
            for i, r in zip(chunk, self._score_batch([rows[i] for i in chunk])):
                results[i] = r
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context_enc, continuation_enc in requests:  # as the hf backend: keep the last max_length inputs
            inputs = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
            rows.append((inputs, continuation_enc[-len(inputs):]))
        results = self._score_all(rows, "ouro_jax loglikelihood", disable_tqdm)
        for (request, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for context, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append(((context + pred)[:-1], pred))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score_all(windows, "ouro_jax rolling", disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations cut at the first `until` string, with early exit as configured."""
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw = dict(req.args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            groups.setdefault((tuple(until), int(kw.get("max_gen_toks", 256))), []).append(i)
        depth, q = self.depth, self.exit_threshold
        if self.exit_at_step is not None:  # a static exit at step k runs k + 1 steps
            depth, q = self.exit_at_step + 1, 1.0
        bar = tqdm(total=len(requests), desc="ouro_jax generate_until", disable=disable_tqdm)
        for (until, max_gen), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                max_new = min(max_gen, self.max_length - 1)
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in chunk]
                out = generate(self.cfg, self.params, prompts, max_new_tokens=max_new, policy=self.policy,
                               depth=depth, exit_threshold=q, stop_token_ids=[self.eot_token_id])
                for i, tokens in zip(chunk, out.rows()):
                    text = self.tok_decode([t for t in tokens if t != self.eot_token_id])
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results
