"""The lm-evaluation-harness backend `ouro_jax`: `lm_eval --model ouro_jax --model_args pretrained=DIR,...`.

Model args (each `key=value` in --model_args):
  pretrained         any model spec of ouro_jax.model_source (HF directory, params checkpoint, training
                     workdir or step, hub id; local or gs://)
  depth              recurrent steps (default: the trained T)
  exit_threshold     Q-exit q (default: the checkpoint's; 1.0 = last step)
  exit_at_step       0-based static exit; wins over exit_threshold (the released priority)
  policy             decode KV-cache policy of generate_until: full, last, first, average
  batch_size         rows per forward pass over all devices, or `auto` / `auto:N` (chosen by memory)
  max_batch_size     the largest batch `auto` may choose (lm-eval's --max_batch_size)
  dtype              compute dtype: float32 or bfloat16 (default: the checkpoint's)
  tokenizer          tokenizer.json or a directory holding one (default: the model's)
  max_length         context length (default max_position_embeddings)
  data_parallel      devices of this process to use (default: all; rows are split across them)
  seed               base seed of sampled generation (default 1234); every batch draws from its own seed
  stop_check_tokens  generation runs in rounds of this many tokens and stops a row as soon as an `until`
                     string appears (default 32; 0 = one round, strings cut afterwards)
  enable_thinking    the chat template's thinking switch (with --apply_chat_template)
  think_end_token    text ending the thinking part (e.g. `</think>`): answers are what follows it, and
                     `until` strings are looked for only there

Generation kwargs (`--gen_kwargs` or the task's): until, max_gen_toks, do_sample, temperature, top_p,
top_k. Scoring follows lm-eval's own `hf` backend token for token (the shared `TemplateLM` tokenization,
rolling windows for perplexity), so the two agree on an export of the same weights. lm_eval finds this
backend by name through the import hook the package installs (`lm_eval_hook.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401 -- lm_eval registers its own backends only while its registry is empty
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm.auto import tqdm

from ouro_jax import validate
from ouro_jax.data.chat_template import load_chat_template, render_chat
from ouro_jax.data.tokenizer import HFTokenizer
from ouro_jax.evaluation.batching import (
    DataParallel,
    auto_batch_size,
    generation_row_bytes,
    scoring_row_bytes,
    tree_bytes,
)
from ouro_jax.evaluation.runner import load_checkpoint
from ouro_jax.evaluation.until import UntilGenerator
from ouro_jax.exit import select_logits
from ouro_jax.inference import prompt_bucket
from ouro_jax.model import Ouro


def _optional(value, cast):
    return None if value is None or str(value).lower() in ("", "none") else cast(value)


def _flag(value) -> bool | None:
    return _optional(value, lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes"))


@functools.partial(jax.jit, static_argnames=("cfg", "depth", "exit_at_step", "exit_threshold"))
def token_scores(params, ids, targets, segments, *, cfg, depth, exit_at_step, exit_threshold):
    """log p(target) and whether it is the argmax, [B, S], under the selected exit mode (one compiled
    program per shape and setting, shared by every backend instance)."""
    model = Ouro(cfg)
    out = model.apply({"params": params}, ids, segment_ids=segments, num_steps=depth)
    step_logits = model.apply({"params": params}, out.hidden_states, method=Ouro.logits)
    logits = select_logits(step_logits, out.gate_logits, exit_at_step=exit_at_step, exit_threshold=exit_threshold)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@register_model("ouro_jax")
class OuroJaxLM(TemplateLM):
    """lm-eval `LM` over an Ouro checkpoint, with run-time depth and exit settings."""

    def __init__(self, pretrained: str, depth=None, exit_threshold=None, exit_at_step=None, policy: str = "full",
                 batch_size=8, max_batch_size=None, dtype=None, tokenizer=None, max_length=None, data_parallel=None,
                 seed=1234, stop_check_tokens=32, enable_thinking=None, think_end_token=None, **kwargs):
        super().__init__()
        kwargs.pop("device", None)  # jax places arrays itself
        if kwargs:
            raise ValueError(f"unknown ouro_jax model args: {sorted(kwargs)}")
        self.source, self.cfg, params = load_checkpoint(pretrained, dtype=_optional(dtype, str))
        self._set_exit(depth, exit_threshold, exit_at_step, policy)
        devices = jax.local_devices()[:_optional(data_parallel, int) or None]
        self.parallel = DataParallel(params, devices)
        self.tokenizer = HFTokenizer(tokenizer or self.source.tokenizer_dir or self.source.path)
        self._max_length = _optional(max_length, int) or self.cfg.max_position_embeddings
        self.auto_batch = str(batch_size).startswith("auto")
        self.max_batch_size = _optional(max_batch_size, int) or None
        self.batch_size = self._round_to_devices(8 if self.auto_batch else int(batch_size))
        self.last_batch_size = self.batch_size  # what the last scoring / generation pass used (auto: chosen)
        self.enable_thinking, self.think_end_token = _flag(enable_thinking), _optional(think_end_token, str)
        self.template, self.specials = load_chat_template(self.source.tokenizer_dir)  # read once, not per request
        self.generator = UntilGenerator(self.cfg, self.parallel, int(seed), int(stop_check_tokens), self.policy,
                                        self.think_end_token)

    def _set_exit(self, depth, exit_threshold, exit_at_step, policy) -> None:
        depth = _optional(depth, float)
        self.depth = self.cfg.total_ut_steps if depth is None else validate.num_steps(depth, "depth")
        exit_at_step = _optional(exit_at_step, float)
        self.exit_at_step = None if exit_at_step is None else validate.exit_step(exit_at_step, self.depth)
        threshold = _optional(exit_threshold, float)
        self.exit_threshold = self.cfg.early_exit_threshold if threshold is None else validate.exit_threshold(threshold)
        self.policy = validate.kv_policy(policy, "policy")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Model args win over lm_eval's own settings (its --batch_size default would clash with batch_size=)."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ---- what TemplateLM needs -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.cfg.pad_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{self.source.path}:{self.tokenizer.sha256[:12]}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return render_chat([{"role": "user", "content": "{content}"}], self.source.tokenizer_dir,
                           template=self.template, specials=self.specials)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's own chat template (ChatML when it has none); few-shot examples arrive as turns."""
        return render_chat(chat_history, self.source.tokenizer_dir, add_generation_prompt=add_generation_prompt,
                           continue_final_message=not add_generation_prompt, enable_thinking=self.enable_thinking,
                           template=self.template, specials=self.specials)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        # a rendered chat template holds special tokens as text: they must become their ids
        return self.tokenizer.encode(string, allow_special=True).tolist()

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _round_to_devices(self, batch: int) -> int:
        n = len(self.parallel.devices)
        return max(n, -(-batch // n) * n)

    def _auto(self, row_bytes: int) -> int:
        cap = max(1, (self.max_batch_size or 64 * len(self.parallel.devices)) // len(self.parallel.devices))
        return auto_batch_size(row_bytes, self.parallel.devices, tree_bytes(self.parallel.replicas[0]), cap=cap)

    # ---- scoring ---------------------------------------------------------------------------------

    def _score_batch(self, rows: list[tuple[list[int], list[int]]], batch: int | None = None
                     ) -> list[tuple[float, bool]]:
        """(sum log p, greedy) of each continuation after its context; rows are (input tokens, continuation)."""
        length = prompt_bucket(max(len(inp) for inp, _ in rows))
        ids = np.zeros((batch or self.batch_size, length), np.int32)
        targets, segments = np.zeros_like(ids), np.zeros_like(ids)
        for b, (inp, cont) in enumerate(rows):
            n = len(inp)
            ids[b, :n] = inp
            segments[b, :n] = 1
            targets[b, n - len(cont):n] = cont
        sharded = self.parallel.shard_rows(ids, targets, segments)
        picked, greedy = jax.device_get(token_scores(self.parallel.replicated, *sharded, cfg=self.cfg, depth=self.depth,
                                                     exit_at_step=self.exit_at_step,
                                                     exit_threshold=self.exit_threshold))
        out = []
        for b, (inp, cont) in enumerate(rows):
            span = slice(len(inp) - len(cont), len(inp))
            out.append((float(picked[b, span].sum()), bool(greedy[b, span].all())))
        return out

    def _score_all(self, rows: list[tuple[list[int], list[int]]], desc: str, disable: bool) -> list[tuple[float, bool]]:
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a bucket
        batch = self.batch_size
        if self.auto_batch and rows:
            longest = prompt_bucket(len(rows[order[0]][0]))
            batch = self._auto(scoring_row_bytes(self.cfg, longest, self.depth))
        self.last_batch_size = batch
        results: list = [None] * len(rows)
        for start in tqdm(range(0, len(order), batch), desc=desc, disable=disable):
            chunk = order[start:start + batch]
            for i, r in zip(chunk, self._score_batch([rows[i] for i in chunk], batch)):
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

    def _generation_groups(self, requests) -> dict[tuple, list[int]]:
        """Requests grouped by their normalized generation settings."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw = normalize_gen_kwargs(dict(req.args[1]), 256)
            until = kw.pop("until") or []
            settings = (tuple([until] if isinstance(until, str) else until), int(kw.pop("max_gen_toks")),
                        float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
                        float(kw.get("top_p", 1.0) or 1.0), int(kw.get("top_k", 0) or 0))
            if settings[2] == 0.0 and kw.get("do_sample"):  # do_sample without a temperature: as transformers
                settings = (*settings[:2], 1.0, *settings[3:])
            groups.setdefault(settings, []).append(i)
        return groups

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations stopped at the first `until` string (checked while generating), with early exit and
        sampling as configured."""
        results: list = [None] * len(requests)
        depth, q = self.depth, self.exit_threshold
        if self.exit_at_step is not None:  # a static exit at step k runs k + 1 steps
            depth, q = self.exit_at_step + 1, 1.0
        bar = tqdm(total=len(requests), desc="ouro_jax generate_until", disable=disable_tqdm)
        for (until, max_gen, temperature, top_p, top_k), members in self._generation_groups(requests).items():
            max_new = min(max_gen, self.max_length - 1)
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in members]
            batch = self.batch_size
            if self.auto_batch:
                longest = max(map(len, prompts)) + max_new
                batch = self._auto(generation_row_bytes(self.cfg, self.policy, depth, longest))
            self.last_batch_size = batch
            texts = self.generator.run(prompts, self.tokenizer, until=until, max_new_tokens=max_new, batch=batch,
                                       depth=depth, exit_threshold=q, stop_ids=[self.eot_token_id],
                                       sampling=dict(temperature=temperature, top_p=top_p, top_k=top_k),
                                       progress=bar)
            for i, text in zip(members, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.close()
        return results
