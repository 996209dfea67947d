"""Helpers of the evaluation tests: a char-level HF tokenizer that fits the golden model's 128 ids."""

from __future__ import annotations

import json
import pathlib
import shutil

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xC0, 0xC0 + 28)]  # ids 3..126
VOCAB_SIZE = len(SPECIALS) + len(CHARS) + 1  # with <unk>: 128, the golden model's vocabulary


def write_char_tokenizer(directory: str | pathlib.Path) -> pathlib.Path:
    """Writes tokenizer.json (+ tokenizer_config.json) of a char-level tokenizer into `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + ["<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "model_max_length": 512}))
    return directory / "tokenizer.json"


def golden_with_tokenizer(golden_dir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """A copy of the golden HF directory with the char-level tokenizer added."""
    shutil.copytree(golden_dir, target)
    write_char_tokenizer(target)
    return target
