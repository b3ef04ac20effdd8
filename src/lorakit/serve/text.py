"""From generated token ids to text: incremental deltas for streaming, and stop strings.

Decoding token by token is not safe on its own: a byte-level token can end in the middle of a
UTF-8 character (decoded as U+FFFD until the next token completes it), and the text may end in
the first half of a stop string. Both are held back until the next tokens settle them, so what
has been sent is never retracted and never contains any part of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Feed token ids with `push`; each call returns (new text, whether a stop string was hit)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode = decode
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""  # everything sent so far
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        full = self.decode(self.ids)
        start = len(self.text)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._send(full[: min(hits)]), True
        end = len(full)
        if full.endswith("\ufffd"):  # an unfinished UTF-8 character
            end = len(full.rstrip("\ufffd"))
        for j in range(max(start, end - max((len(s) for s in self.stop), default=0)), end):
            if any(s.startswith(full[j:end]) for s in self.stop):  # may become a stop string
                end = j
                break
        return self._send(full[:end]), False

    def finish(self) -> str:
        """Whatever is still held back, once generation has ended without a stop string."""
        if self.stopped or not self.ids:
            return ""
        return self._send(self.decode(self.ids))

    def _send(self, upto: str) -> str:
        delta = upto[len(self.text) :]  # decoders here are prefix-stable once UTF-8 is complete
        self.text += delta
        return delta
