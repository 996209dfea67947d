"""Generated ids to text as they arrive: incremental decoding that holds back half-decoded characters
and any tail that may be the start of a stop string."""

from __future__ import annotations

from collections.abc import Sequence


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The text of `ids`; ids beyond the tokenizer's vocabulary (a model's padded rows) decode to nothing."""
    return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])


class TextStream:
    """Feed ids one at a time; `push` returns the text that is now final (`stopped` once a stop string
    appeared: the text ends before it). `finish` flushes what was held back."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_ids: Sequence[int] = ()):
        self.tokenizer, self.stop, self.skip = tokenizer, tuple(s for s in stop if s), set(skip_ids)
        self.ids: list[int] = []
        self.text = ""     # decoded so far (final characters only)
        self.sent = 0      # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped or token in self.skip:
            return ""
        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd"):          # a character split across tokens: wait for the rest
            return ""
        self.text = text
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped, self.text = True, self.text[:at]
        return self._release(final=self.stopped)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:       # keep back a tail that a stop string could still start with
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out
