"""Chat prompts from the tokenizer's own Jinja template (multi-turn, enable_thinking, generation prompt),
ChatML when there is none, and the stop ids of generation_config.json."""

import json
import os

import pytest
from helpers import THINKING_TEMPLATE, write_char_tokenizer

from ouro_jax.cli import generate as cli
from ouro_jax.data.chat_template import encode_chat_prompt, load_chat_template, render_chat, stop_token_ids
from ouro_jax.data.chatml import render_chatml
from ouro_jax.data.tokenizer import load_tokenizer
from ouro_jax.inference import generate as real_generate

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nadd</think>\n2"}, {"role": "user", "content": "2+2?"}]


@pytest.fixture
def template_dir(tmp_path):
    write_char_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    config["eos_token"] = {"content": "<|im_end|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "pad_token_id": 0}))
    return tmp_path


def test_template_renders_multi_turn_thinking_and_generation_prompt(template_dir):
    text = render_chat(CHAT, template_dir)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
                    "<think>\n")
    assert render_chat(CHAT, template_dir, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(CHAT, template_dir, add_generation_prompt=False).endswith("2+2?<|im_end|>\n")
    prefilled = CHAT + [{"role": "assistant", "content": "The answer is"}]
    assert render_chat(prefilled, template_dir, continue_final_message=True).endswith(
        "<|im_start|>assistant\nThe answer is")
    assert load_chat_template(template_dir)[1]["eos_token"] == "<|im_end|>"   # AddedToken dicts unwrapped
    (template_dir / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}|{{ eos_token }}")
    assert render_chat(CHAT, template_dir) == "2+2?|<|im_end|>"                 # the separate file wins
    with pytest.raises(ValueError, match="chat template"):
        render_chat(CHAT, template_dir, template="{{ raise_exception('no system role') }}")


def test_without_template_chatml_and_specials_become_ids(tmp_path):
    write_char_tokenizer(tmp_path)
    assert render_chat(CHAT, tmp_path) == render_chatml(CHAT, add_generation_prompt=True)
    with pytest.raises(ValueError, match="enable_thinking needs a chat template"):
        render_chat(CHAT, tmp_path, enable_thinking=True)
    tokenizer = load_tokenizer(tmp_path)
    ids = encode_chat_prompt(tokenizer, CHAT[:2], tmp_path)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2         # <|im_start|> x3, <|im_end|> x2
    assert tokenizer.decode(ids) == render_chatml(CHAT[:2], add_generation_prompt=True)


def test_stop_ids(template_dir, tmp_path):
    tokenizer = load_tokenizer(template_dir)
    assert stop_token_ids(tokenizer, template_dir, chat=True) == [2, 0]     # generation_config.json first
    bare = tmp_path / "bare"
    write_char_tokenizer(bare)
    assert stop_token_ids(load_tokenizer(bare), bare, chat=False) == [0]    # a base model ends at <|endoftext|>
    assert stop_token_ids(load_tokenizer(bare), bare, chat=True) == [0, 2]
    assert stop_token_ids(None, bare, chat=False) == []


def test_generate_cli_renders_the_template_multi_turn(template_dir, golden_dir, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "generate", lambda cfg, params, prompts, **kw: calls.append((prompts, kw)) or
                        real_generate(cfg, params, prompts, **kw))
    for name in ("config.json", "model.safetensors"):
        os.symlink(golden_dir / name, template_dir / name)
    (tmp_path / "chat.json").write_text(json.dumps(CHAT))
    result = cli.main(["--model", str(template_dir), "--messages", str(tmp_path / "chat.json"), "--no-enable-thinking",
                       "--max-new-tokens", "4", "--no-stream"])
    tokenizer = load_tokenizer(template_dir)
    want = tokenizer.encode(render_chat(CHAT, template_dir, enable_thinking=False), allow_special=True).tolist()
    assert calls[-1][0] == [want] and calls[-1][1]["stop_token_ids"] == [2, 0] and result.tokens.shape[1] == 4
    assert "tokens/s" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit):
        cli.main(["--model", str(template_dir), "--messages", str(tmp_path / "bad.json")])
    assert "--messages" in capsys.readouterr().err
