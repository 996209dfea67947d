"""Chats as SFT documents: token ids rendered by the tokenizer's own chat template, and the assistant mask.

`ChatEncoder(tokenizer, tokenizer_dir)(messages)` renders the whole conversation with `render_chat` (the
template generation uses, ChatML without one; `enable_thinking` passed through) and tokenizes it as
generation does (`encode(text, allow_special=True)`). The mask is 1 on the tokens an assistant writes.
For each assistant message it starts where the rendering of the chat before it with the generation
prompt stops agreeing with the full rendering (the assistant header, and any prompt prefill the full
rendering shares, are not learned; the chat before the message must render as a prefix of the whole
chat), and ends after the first end-of-turn token from there (a stop id of `stop_token_ids(...,
chat=True)`, e.g. `<|im_end|>`). Tokens are assigned by the character where they start. System, user
and tool messages and the template's text between turns are 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from ouro_jax.data.chat_template import load_chat_template, render_chat, stop_token_ids
from ouro_jax.data.chatml import check_messages
from ouro_jax.data.tokenizer import Tokenizer
from ouro_jax.paths import PathLike


class ChatEncoder:
    """messages -> (token ids int32 [n], assistant mask int32 [n]); the template is read once."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_dir: PathLike | None = None, *,
                 enable_thinking: bool | None = None):
        self.tokenizer, self.tokenizer_dir, self.enable_thinking = tokenizer, tokenizer_dir, enable_thinking
        self.template, self.specials = load_chat_template(tokenizer_dir)
        self.where = tokenizer_dir if self.template is not None else "ChatML"
        if self.template is None:  # ChatML has no thinking switch: render_chat refuses one here, once
            render_chat([{"role": "user", "content": ""}], tokenizer_dir, enable_thinking=enable_thinking)
        stops = stop_token_ids(tokenizer, tokenizer_dir, chat=True)
        self.end_markers = [tokenizer.decode([i]) for i in stops]
        if not self.end_markers:
            raise ValueError("the tokenizer has no end-of-turn token (<|im_end|> or <|endoftext|>) to learn")

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        return render_chat(messages, self.tokenizer_dir, template=self.template, specials=self.specials,
                           add_generation_prompt=add_generation_prompt, enable_thinking=self.enable_thinking)

    def assistant_spans(self, messages: Sequence[Mapping[str, str]], text: str) -> list[tuple[int, int]]:
        """[start, end) character spans of `text` (the full rendering) that the assistant messages write."""
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("message 0: an assistant message needs a prompt before it")
            before = self.render(messages[:i], add_generation_prompt=False)
            if not text.startswith(before):
                raise ValueError(f"message {i}: the chat template ({self.where}) renders the conversation before it "
                                 "differently inside the whole chat; the assistant mask needs it to be a prefix")
            prompt = self.render(messages[:i], add_generation_prompt=True)
            start = max(len(before), len(os.path.commonprefix([prompt, text])))
            ends = [at + len(m) for m in self.end_markers if (at := text.find(m, start)) >= 0]
            if not ends:
                raise ValueError(f"message {i}: the chat template ({self.where}) ends the assistant turn with none "
                                 f"of the end-of-turn tokens {self.end_markers}")
            spans.append((start, min(ends)))
        return spans

    def __call__(self, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        check_messages(messages)
        text = self.render(messages, add_generation_prompt=False)
        ids, starts = self.tokenizer.encode_with_offsets(text, allow_special=True)
        mask = np.zeros(len(ids), np.int32)
        for start, end in self.assistant_spans(messages, text):
            mask[(starts >= start) & (starts < end)] = 1
        return ids.astype(np.int32), mask
