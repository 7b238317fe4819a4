"""Incremental detokenization with text-level stop strings (one `TextStream` per generated sequence).

Tokens arrive one at a time; `push(id)` returns the text that is now safe to show:

* an incomplete UTF-8 character (decoded as U+FFFD while its bytes are split over tokens) is held back;
* a tail that could be the start of a stop string is held back until it is disambiguated;
* when a stop string appears, the text is cut just before it and the stream is `stopped`.

Only a window of recent tokens is re-decoded each step (vLLM / HF TextStreamer idea): text before
the window's start is fixed, so a step costs O(window), not O(length).
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    """Text of one sequence, built token by token, cut at the first stop string."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (), skip_ids: Sequence[int] = (),
                 window: int = 64):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.skip = set(skip_ids)
        self.window = window
        self.ids: list[int] = []
        self.fixed = ""  # text of ids[: self.start], final
        self.start = 0  # first id of the re-decoded window
        self.ctx = 0  # a few ids before `start`, decoded along for context (leading spaces)
        self.ctx_text = ""  # decode(ids[ctx: start])
        self.text = ""  # all text so far (cut at a stop string once stopped)
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token id; return the newly displayable text ("" if none)."""
        if self.stopped or token in self.skip:
            return ""
        self.ids.append(token)
        tail = self.tok.decode(self.ids[self.ctx:])[len(self.ctx_text):]
        old_len = len(self.text)
        self.text = self.fixed + tail
        if self.stop and self._cut_at_stop(max(0, old_len - max(map(len, self.stop)))):
            return self._emit(len(self.text))
        self._advance_window(tail)
        return self._emit(self._safe_len())

    def flush(self) -> str:
        """The held-back rest (at the end of generation)."""
        return self._emit(len(self.text))

    # ------------------------------------------------------------------------------- internals
    def _cut_at_stop(self, search_from: int) -> bool:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text, self.stopped = self.text[: min(hits)], True
        return True

    def _advance_window(self, tail: str) -> None:
        # move the window start forward once the tail decodes cleanly (no split UTF-8 at its end)
        if len(self.ids) - self.start > self.window and not tail.endswith("\ufffd"):
            self.fixed, self.start = self.text, len(self.ids)
            self.ctx = max(0, self.start - 4)
            self.ctx_text = self.tok.decode(self.ids[self.ctx: self.start])

    def _safe_len(self) -> int:
        n = len(self.text)
        while n > self.emitted and self.text[n - 1] == "\ufffd":  # a split multi-byte character
            n -= 1
        hold = 0
        for s in self.stop:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, n), hold, -1):
                if self.text[n - k: n] == s[:k]:
                    hold = k
                    break
        return max(self.emitted, n - hold)

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted: upto]
        self.emitted = max(self.emitted, upto)
        return out
