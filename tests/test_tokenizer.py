"""Tokenizers (byte-level and HF tokenizer.json) and ChatML rendering."""

import json

import numpy as np
import pytest

from ouro_jax.data import ByteTokenizer, HFTokenizer, encode_chat, load_tokenizer, render_chatml

TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  \n\n",
    "unicode: naïve café, 日本語, emoji 🤖🚀, math ∑∫, rtl עברית",
    "control \x00\x01\t\r\n chars",
    "looks special but is text: <|im_start|> <|endoftext|>",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, naturally.\n\nAnything else?"},
    {"role": "user", "content": "No <|im_end|> thanks"},
]
# The ChatML template (jinja, as in an HF tokenizer_config.json) our renderer must agree with.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tokenizer_json(path):
    """A small byte-level BPE tokenizer.json with the SPEC 1 specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokens"] * 50 + TEXTS
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return HFTokenizer(write_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_byte_round_trip_and_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
        assert ids.size == 0 or ids.min() >= 3 and ids.max() < 259
        assert tok.decode(ids) == text
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=4000, dtype=np.uint8)  # every byte value, arbitrary order
    assert np.array_equal(tok.encode(bytes(raw).decode("latin-1")) - 3, np.frombuffer(
        bytes(raw).decode("latin-1").encode("utf-8"), np.uint8))


def test_byte_specials():
    tok = ByteTokenizer()
    text = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    ids = tok.encode(text, allow_special=True)
    assert ids[0] == 1 and ids[-2:].tolist() == [2, 0]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\nhi"
    assert 1 not in tok.encode(text).tolist()  # plain text by default: no control tokens from data
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_byte_offsets():
    tok = ByteTokenizer()
    ids, starts = tok.encode_with_offsets("aé日")
    assert len(ids) == 1 + 2 + 3 and starts.tolist() == [0, 1, 1, 2, 2, 2]


def test_hf_round_trip_and_specials(hf_tok, tmp_path):
    assert (hf_tok.eos_id, hf_tok.im_start_id, hf_tok.im_end_id) == (0, 1, 2)
    assert hf_tok.vocab_size == 420
    for text in TEXTS:
        ids = hf_tok.encode(text)
        assert ids.dtype == np.int32 and hf_tok.decode(ids) == text
    assert len(hf_tok.encode("hello world")) < len("hello world")  # merges learned, not bytes
    assert hf_tok.encode("<|im_end|>", allow_special=True).tolist() == [2]
    assert 2 not in hf_tok.encode("<|im_end|>").tolist()
    batch = hf_tok.encode_batch(TEXTS)
    assert all(np.array_equal(a, hf_tok.encode(t)) for a, t in zip(batch, TEXTS))
    # Loading by directory, and the fingerprint written into manifests.
    same = load_tokenizer(hf_tok.path.parent)
    assert same.fingerprint() == hf_tok.fingerprint() and len(hf_tok.sha256) == 64


def test_hf_agrees_with_transformers(hf_tok):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_tok.path))
    for text in TEXTS[1:4]:
        assert hf_tok.encode(text).tolist() == ref(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        HFTokenizer(bad)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_render_chatml_matches_template(hf_tok):
    from transformers import PreTrainedTokenizerFast

    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n4, naturally.\n\nAnything else?<|im_end|>\n"
                "<|im_start|>user\nNo <|im_end|> thanks<|im_end|>\n<|im_start|>assistant\n")
    assert render_chatml(CHAT, add_generation_prompt=True) == expected
    assert render_chatml(CHAT) == expected[: -len("<|im_start|>assistant\n")]
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_tok.path), chat_template=CHATML_JINJA)
    assert ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == expected


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_encode_chat_ids_and_assistant_mask(kind, hf_tok):
    tok = ByteTokenizer() if kind == "byte" else hf_tok
    chat = CHAT[:3]  # no special strings inside contents: ids must equal encoding the rendered text
    ids, mask = encode_chat(tok, chat, add_generation_prompt=False)
    assert ids.tolist() == tok.encode(render_chatml(chat), allow_special=True).tolist()
    assert ids[0] == 1 and (ids == 2).sum() == 3
    assert tok.decode(ids[mask == 1]) == "4, naturally.\n\nAnything else?<|im_end|>"
    # Special strings inside a message stay text: one <|im_end|> id per message only.
    ids, _ = encode_chat(tok, CHAT, add_generation_prompt=True)
    assert (ids == 2).sum() == 4 and tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_chat_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="at least one message"):
        render_chatml([])
    with pytest.raises(ValueError, match="unknown role"):
        render_chatml([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content must be a string"):
        encode_chat(tok, [{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="exactly 'role' and 'content'"):
        render_chatml([{"role": "user"}])
