"""ChatML, the chat format of the released Ouro chat models: `<|im_start|>role\\ncontent<|im_end|>\\n`.

`render_chatml` gives the text the released `chat_template` renders; `encode_chat` gives its token
ids (specials as SPEC 1 ids, message text never parsed for specials) and a mask that is 1 on the
tokens an assistant writes (its content and the closing `<|im_end|>`): the loss mask of chat SFT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ouro_jax.data.tokenizer import IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raises ValueError unless `messages` is a non-empty list of {"role", "content"} with known roles."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a mapping with exactly 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")


def render_chatml(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The chat as text, each message `<|im_start|>{role}\\n{content}<|im_end|>\\n`."""
    check_messages(messages)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], *,
                add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [n] of `render_chatml(...)` and the assistant mask int32 [n]."""
    check_messages(messages)
    if tokenizer.im_start_id is None or tokenizer.im_end_id is None:
        raise ValueError(f"tokenizer has no {IM_START} / {IM_END} tokens: it cannot encode ChatML")
    ids, mask = [], []

    def add(tokens, is_assistant):
        ids.append(np.asarray(tokens, np.int32))
        mask.append(np.full(len(tokens), int(is_assistant), np.int32))

    for m in messages:
        header = f"{m['role']}\n"
        # Header and content form one text run between specials, tokenized as the full string is.
        body, starts = tokenizer.encode_with_offsets(header + m["content"])
        assistant = m["role"] == "assistant"
        add([tokenizer.im_start_id], False)
        ids.append(body)
        mask.append(((starts >= len(header)) & assistant).astype(np.int32))
        add([tokenizer.im_end_id], assistant)
        add(tokenizer.encode("\n"), False)
    if add_generation_prompt:
        add([tokenizer.im_start_id], False)
        add(tokenizer.encode("assistant\n"), False)
    return np.concatenate(ids), np.concatenate(mask)
