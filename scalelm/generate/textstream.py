"""Token ids to text as they come: incremental decoding and stop strings, for one sequence.

Decoding token by token breaks characters whose UTF-8 bytes span several tokens (the
tokenizer then yields U+FFFD) and loses spacing that depends on the previous token. So each
step decodes a short window of recent ids and emits only the text that the new token added,
holding back while the window ends in an incomplete character (the approach of vLLM and HF's
``TextStreamer``). Text that could be the start of a stop string is held back too, so a stop
string is never printed.
"""

from __future__ import annotations

from typing import Optional, Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # prompt tokens kept as decoding context (spacing of the first new token)


class TextStream:
    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stops: Sequence[str] = ()):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:]) if len(prompt_ids) else []
        self.prefix = 0  # window start: decoding ids[prefix:] gives context + new text
        self.read = len(self.ids)  # ids[:read] are already turned into text
        self.text = ""  # all generated text so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stops = [s for s in stops if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        if self.tok is None:
            return
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def _find_stop(self, start: int) -> Optional[int]:
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        for n in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def add(self, token: int) -> str:
        """Feed one generated id; returns the text that is now safe to show ('' if none)."""
        if self.stopped:
            return ""
        checked = len(self.text)
        self.ids.append(token)
        self._advance(final=False)
        return self._emit(checked, final=False)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back (an incomplete character too)."""
        if self.stopped:
            return ""
        checked = len(self.text)
        self._advance(final=True)
        return self._emit(checked, final=True)

    def _emit(self, checked: int, final: bool) -> str:
        safe = len(self.text)
        if self.stops:
            hit = self._find_stop(max(0, checked - self.max_stop + 1))
            if hit is not None:
                self.text, self.stopped = self.text[:hit], True
                safe = hit
            elif not final:
                safe -= self._held_back()
        delta = self.text[self.emitted:max(safe, self.emitted)]
        self.emitted += len(delta)
        return delta
