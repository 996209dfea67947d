"""Chat prompts as the model's own tokenizer writes them, and when generation stops.

`render_chat` renders the Jinja `chat_template` of a tokenizer directory (`chat_template.jinja`, else
the `chat_template` of `tokenizer_config.json`) the way transformers does: multi-turn messages, the
assistant generation prompt, and template variables such as `enable_thinking` (the Ouro-Thinking
models). A directory without a template falls back to ChatML (`render_chatml`, the released format).
`stop_token_ids` gives the ids generation stops at: those of `generation_config.json`, plus
`<|endoftext|>` (base models end documents with it), plus `<|im_end|>` for chats.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ouro_jax.data.chatml import check_messages, render_chatml
from ouro_jax.data.tokenizer import Tokenizer
from ouro_jax.paths import PathLike, as_path

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


def _read_json(path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict ({"content": ...})."""
    return value.get("content") if isinstance(value, Mapping) else value


def load_chat_template(tokenizer_dir: PathLike | None) -> tuple[str | None, dict[str, str]]:
    """(template source or None, the special tokens the template may name) of a tokenizer directory."""
    if tokenizer_dir is None:
        return None, {}
    directory = as_path(tokenizer_dir)
    config = _read_json(directory / TOKENIZER_CONFIG)
    specials = {k: _token_text(v) for k, v in config.items() if k.endswith("_token") and _token_text(v) is not None}
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text(), specials
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template, specials


def _raise(message: str):
    raise ValueError(f"chat template: {message}")


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """The template compiled once (ouro-prepare renders it a few times per conversation)."""
    return _environment().from_string(template)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _cut_after_final_message(text: str, messages: Sequence[Mapping[str, str]]) -> str:
    content = messages[-1]["content"]
    for needle in (content, content.strip()):
        at = text.rfind(needle)
        if needle and at >= 0:
            return text[:at + len(needle)]
    raise ValueError("continue_final_message: the chat template does not render the final message verbatim")


def render_chat(messages: Sequence[Mapping[str, str]], tokenizer_dir: PathLike | None = None, *,
                add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                continue_final_message: bool = False, template: str | None = None,
                specials: Mapping[str, str] | None = None) -> str:
    """The chat as prompt text: `template` (a Jinja source, with the special tokens `specials` it may name),
    else the tokenizer directory's, else ChatML. `specials` given means the caller has already loaded the
    directory (`load_chat_template`): a None `template` is then ChatML, nothing is read again.

    enable_thinking (None: the template's default) is passed to the template; ChatML has no thinking
    switch, so there it must stay None. continue_final_message ends the text right after the last
    message's content (a prefilled assistant answer the model continues) instead of closing it.
    """
    if continue_final_message:
        text = render_chat(messages, tokenizer_dir, add_generation_prompt=False, enable_thinking=enable_thinking,
                           template=template, specials=specials)
        return _cut_after_final_message(text, messages)
    check_messages(messages)
    if specials is None:
        template, specials = (template, {}) if template is not None else load_chat_template(tokenizer_dir)
    if template is None:
        if enable_thinking is not None:
            raise ValueError(f"enable_thinking needs a chat template with a thinking switch; {tokenizer_dir} has "
                             "none (ChatML)")
        return render_chatml(messages, add_generation_prompt=add_generation_prompt)
    variables = {**specials, "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
    if enable_thinking is not None:
        variables["enable_thinking"] = enable_thinking
    try:
        return _compiled(template).render(**variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template of {tokenizer_dir}: {e}") from None


def encode_chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                       tokenizer_dir: PathLike | None = None, **kwargs) -> list[int]:
    """Token ids of `render_chat(messages, tokenizer_dir, **kwargs)` (the template's special tokens as ids)."""
    return tokenizer.encode(render_chat(messages, tokenizer_dir, **kwargs), allow_special=True).tolist()


def stop_token_ids(tokenizer: Tokenizer | None, tokenizer_dir: PathLike | None = None, *, chat: bool) -> list[int]:
    """Where generation stops: generation_config.json's eos ids, and the tokenizer's `<|endoftext|>` (and
    `<|im_end|>` for chats)."""
    ids: list[int] = []
    if tokenizer_dir is not None:
        eos = _read_json(as_path(tokenizer_dir) / GENERATION_CONFIG).get("eos_token_id")
        ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer is not None:
        named = [tokenizer.eos_id] + ([tokenizer.im_end_id] if chat else [])
        ids.extend(i for i in named if i is not None)
    return list(dict.fromkeys(int(i) for i in ids))
