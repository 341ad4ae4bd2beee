"""Streaming detokenization with stop sequences.

Text is shown as soon as it cannot turn out to be the start of a stop
sequence; the stop sequence itself is never shown. A chunk's text may
therefore lag its token ids by up to (longest stop - 1) characters, and the
final chunk carries whatever was held back.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeinferd.generation.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.decoder()
        self._stops = [s for s in stops if s]
        self._text = ""
        self._shown = 0

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return self._text[: self._shown]

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text that may be shown now, whether a stop was hit)."""
        self._text += self._decoder.decode(token_id)
        hit = self._first_stop()
        if hit is not None:
            return self._show(hit), True
        return self._show(len(self._text) - self._held_back()), False

    def finish(self) -> str:
        """The end of the generation: show what was held back."""
        self._text += self._decoder.flush()
        hit = self._first_stop()
        return self._show(hit if hit is not None else len(self._text))

    def _show(self, until: int) -> str:
        piece = self._text[self._shown : until]
        self._shown = max(self._shown, until)
        return piece

    def _first_stop(self) -> int | None:
        found = [i for s in self._stops if (i := self._text.find(s, self._shown)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop sequence."""
        tail = self._text[self._shown :]
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:size]):
                    longest = size
                    break
        return longest
