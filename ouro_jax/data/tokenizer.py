"""Tokenizers: the released HF `tokenizer.json` (via `tokenizers`) and a file-free byte-level one.

Both share the special ids of SPEC 1: 0 = `<|endoftext|>` (also padding), 1 = `<|im_start|>`,
2 = `<|im_end|>` (the byte tokenizer fixes them; for an HF file they are looked up by name).
`encode` returns int32 numpy arrays; special-token strings inside text are treated as plain text
unless `allow_special=True`, so raw corpora cannot inject control tokens.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ouro_jax.paths import Path, as_path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2 of the released tokenizer (SPEC 1)


class Tokenizer(Protocol):
    """What the data code needs from a tokenizer."""

    vocab_size: int
    eos_id: int | None  # <|endoftext|>: document separator and padding
    im_start_id: int | None
    im_end_id: int | None

    def encode(self, text: str, *, allow_special: bool = False) -> np.ndarray: ...  # int32 [n]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def encode_with_offsets(self, text: str, *, allow_special: bool = False) -> tuple[np.ndarray, np.ndarray]:
        ...  # ids, the character offset where each token starts

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...

    def fingerprint(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 after the three special ids; vocab_size 259; needs no files."""

    vocab_size = 256 + len(SPECIAL_TOKENS)
    eos_id = 0
    pad_id = 0
    im_start_id = 1
    im_end_id = 2
    _OFFSET = len(SPECIAL_TOKENS)
    _SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")

    def encode(self, text: str, *, allow_special: bool = False) -> np.ndarray:
        if not allow_special:
            return self._encode_plain(text)
        parts = []
        for piece in self._SPECIAL_RE.split(text):
            if piece in SPECIAL_TOKENS:
                parts.append(np.array([SPECIAL_TOKENS.index(piece)], np.int32))
            elif piece:
                parts.append(self._encode_plain(piece))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def _encode_plain(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self._OFFSET

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encode_plain(t) for t in texts]

    def encode_with_offsets(self, text: str, *, allow_special: bool = False) -> tuple[np.ndarray, np.ndarray]:
        starts = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        if not allow_special:
            return self._encode_plain(text), np.asarray(starts, np.int64)
        ids, kept, at = [], [], 0
        for piece in self._SPECIAL_RE.split(text):
            if piece in SPECIAL_TOKENS:
                ids.append(np.array([SPECIAL_TOKENS.index(piece)], np.int32))
                kept.append(np.array([at], np.int64))
            elif piece:
                ids.append(self._encode_plain(piece))
                kept.append(np.asarray([at + i for i, ch in enumerate(piece) for _ in ch.encode("utf-8")], np.int64))
            at += len(piece)
        return (np.concatenate(ids), np.concatenate(kept)) if ids else (np.zeros(0, np.int32), np.zeros(0, np.int64))

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        out, run = [], bytearray()
        for i in np.asarray(ids, np.int64).reshape(-1).tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            if i >= self._OFFSET:
                run.append(i - self._OFFSET)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special:
                out.append(SPECIAL_TOKENS[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def fingerprint(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


class HFTokenizer:
    """An HF `tokenizer.json` (e.g. the SmolLM2 tokenizer shipped with every Ouro model directory)."""

    def __init__(self, path: str | os.PathLike):
        import tokenizers  # local import: only HF users pay for it

        self.path = _resolve_tokenizer_file(path)
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
            self._plain = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{self.path} is not a valid HF tokenizer.json: {e}") from e
        self._plain.encode_special_tokens = True  # special strings in text stay text
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._tok.token_to_id(ENDOFTEXT)
        self.pad_id = self.eos_id
        self.im_start_id = self._tok.token_to_id(IM_START)
        self.im_end_id = self._tok.token_to_id(IM_END)

    def encode(self, text: str, *, allow_special: bool = False) -> np.ndarray:
        tok = self._tok if allow_special else self._plain
        return np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._plain.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def encode_with_offsets(self, text: str, *, allow_special: bool = False) -> tuple[np.ndarray, np.ndarray]:
        enc = (self._tok if allow_special else self._plain).encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int32), np.asarray([s for s, _ in enc.offsets], np.int64)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return self._tok.decode(ids.tolist(), skip_special_tokens=skip_special)

    def fingerprint(self) -> dict:
        return {"kind": "hf", "path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size}


def _resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    p = as_path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    return p


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """`"byte"` -> ByteTokenizer; a `tokenizer.json` file or a model directory holding one -> HFTokenizer."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
