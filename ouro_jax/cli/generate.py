"""Text generation: `ouro-generate --model DIR --prompt "..."` (or `python -m ouro_jax.cli.generate`).

The command line only: the engine and the library `generate` live in `ouro_jax.inference`. The
model is any spec of `ouro_jax.model_source` (an HF Ouro directory, a params checkpoint, a training
workdir or step, a hub id; local or gs://); text is tokenized with the model's `tokenizer.json` when
present, else with the byte-level tokenizer (or `--prompt-ids` gives the ids directly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from ouro_jax import validate
from ouro_jax.config import Execution
from ouro_jax.data.chat_template import encode_chat_prompt, stop_token_ids
from ouro_jax.errors import OneLineParser, cli_errors, fail, one_line
from ouro_jax.inference import EXIT_MODES, POLICIES, GenerationResult, default_cache_length, generate
from ouro_jax.model_source import ModelSource, model_tokenizer, resolve_model
from ouro_jax.params_io import load_model
from ouro_jax.paths import as_path

__all__ = ["build_parser", "main", "run"]

PROG = "ouro-generate"


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        fail(PROG, f"{what} must be integers separated by commas or spaces, got {text!r}")


class _TextStream:
    """Prints the decoded text of row 0 as tokens arrive (holding back half-decoded characters)."""

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tokenizer, self.stop_ids, self.enabled = tokenizer, set(stop_ids), False
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, index: int, tokens: np.ndarray, live: np.ndarray) -> None:
        if not (self.enabled and live[0]) or self.tokenizer is None:
            return
        if int(tokens[0]) not in self.stop_ids:
            self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="HF Ouro directory, params checkpoint, training workdir or step, or hub id")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt token ids, e.g. '1,5,9' (no tokenizer involved)")
    prompt.add_argument("--messages", help="a multi-turn chat: JSON file of [{role, content}, ...] (implies --chat)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (tokenizer_config.json; else ChatML)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="the chat template's thinking switch (Ouro-Thinking; default: the template's)")
    p.add_argument("--tokenizer",
                   help="tokenizer.json, a directory holding one, or 'byte' (default: the model's, else byte)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--policy", default="full", help=f"decode KV-cache policy: {', '.join(POLICIES)}")
    p.add_argument("--exit-threshold", type=float, help="Q-exit threshold q in [0, 1] (default: the config's; 1 = off)")
    p.add_argument("--exit-mode", default="early", choices=EXIT_MODES,
                   help="early: stop looping at the Q-exit step (saves compute); select: run every step and pick "
                        "the exit step's logits (the released generate, token for token)")
    p.add_argument("--depth", type=int, help="recurrent steps (default: the trained T; more extrapolates)")
    p.add_argument("--draft-tokens", type=int, default=0,
                   help="self-speculative decoding: tokens drafted per round (0 = off; lossless, --policy full)")
    p.add_argument("--draft-depth", type=int, default=1, help="recurrent steps of the draft (< --depth)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", help="stop token ids (default: generation_config.json's, <|endoftext|>, and "
                                      "<|im_end|> in chats)")
    p.add_argument("--dtype", choices=validate.COMPUTE_DTYPES, help="compute dtype (default: the checkpoint's config)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of token by token")
    return p


def main(argv: Sequence[str] | None = None) -> GenerationResult:
    args = build_parser().parse_args(argv)

    with cli_errors(PROG):
        validate.kv_policy(args.policy, "--policy")
    try:
        source = resolve_model(args.model)
        cfg, params = load_model(source, execution=Execution(dtype=args.dtype) if args.dtype else None)
    except (ValueError, OSError) as e:
        fail(PROG, f"cannot load --model {args.model}: {one_line(e)}")
    with cli_errors(PROG):  # a bad tokenizer, prompt or decoding setting
        return _generate(args, source, cfg, params)


def _messages(args) -> list[dict]:
    if args.messages is not None:
        try:
            return json.loads(as_path(args.messages).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            fail(PROG, f"--messages {args.messages}: not a readable JSON list of messages ({one_line(e)})")
    return ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]


def _prompt(args, source: ModelSource) -> tuple[list[int], object, list[int]]:
    """(prompt ids, tokenizer or None, stop ids) from the prompt flags."""
    chat = args.chat or args.messages is not None
    if args.prompt_ids is not None:
        if chat:
            fail(PROG, "--chat needs --prompt text or --messages, not --prompt-ids")
        tokenizer, ids = None, _parse_ids(args.prompt_ids, "--prompt-ids")
    else:
        tokenizer = model_tokenizer(source, args.tokenizer)
        if chat:
            ids = encode_chat_prompt(tokenizer, _messages(args), source.tokenizer_dir, add_generation_prompt=True,
                                     enable_thinking=args.enable_thinking)
        else:
            ids = tokenizer.encode(args.prompt).tolist()
    if args.stop_ids is not None:
        return ids, tokenizer, _parse_ids(args.stop_ids, "--stop-ids")
    return ids, tokenizer, stop_token_ids(tokenizer, source.tokenizer_dir, chat=chat)


def _generate(args, source, cfg, params) -> GenerationResult:
    ids, tokenizer, stop_ids = _prompt(args, source)
    validate.positive("--max-new-tokens", args.max_new_tokens)  # before the one-token run below compiles
    validate.positions("prompt + --max-new-tokens", len(ids) + args.max_new_tokens, cfg.max_position_embeddings)
    stream = _TextStream(tokenizer, stop_ids) if not args.no_stream else None
    options = dict(policy=args.policy, depth=args.depth, exit_threshold=args.exit_threshold, exit_mode=args.exit_mode,
                   draft_tokens=args.draft_tokens, draft_depth=args.draft_depth,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   stop_token_ids=stop_ids, stream=stream)
    # a one-token run compiles the program (same shapes) that the timed run then reuses
    options["cache_length"] = default_cache_length(len(ids), args.max_new_tokens, draft_tokens=args.draft_tokens)
    started = time.perf_counter()
    generate(cfg, params, [ids], max_new_tokens=1, **options)
    compile_s = time.perf_counter() - started
    if stream is not None:
        stream.enabled = True
    started = time.perf_counter()
    result = generate(cfg, params, [ids], max_new_tokens=args.max_new_tokens, **options)
    seconds = time.perf_counter() - started

    generated = result.rows()[0]
    if stream is None or tokenizer is None:
        text = (tokenizer.decode([t for t in generated if t not in stop_ids]) if tokenizer is not None
                else " ".join(map(str, generated)))
        print(text, end="")
    print()
    depth = args.depth or cfg.total_ut_steps
    print(f"[{len(generated)} tokens in {seconds:.3f} s: {len(generated) / seconds:.1f} tokens/s "
          f"(first call incl. compile {compile_s:.1f} s); mean depth {result.mean_depth:.2f} of {depth}; "
          f"decode layer applications {result.decode_layer_applications}; "
          f"KV cache {result.cache_bytes / 2**20:.2f} MiB ({args.policy})"
          + (f"; speculative: {result.accepted_tokens}/{result.drafted_tokens} drafts accepted "
             f"({result.acceptance_rate:.0%}) in {result.draft_rounds} rounds" if args.draft_tokens else "") + "]")
    return result


def run() -> None:
    """The `ouro-generate` console script."""
    main()


if __name__ == "__main__":
    run()
