"""Stop strings over streamed text: text that could still be the start of a stop string is
held back until it cannot, and a found stop string is cut with everything after it."""
from __future__ import annotations

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        """Everything received so far."""
        self.emitted = 0
        self.stopped = False

    def add(self, delta: str) -> str:
        """Returns the text that is now safe to emit; sets `stopped` on a match."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stops:
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.stopped = True
                return self._emit_to(min(hits))
        return self._emit_to(len(self.text) - self.hold if self.stops else len(self.text))

    def flush(self) -> str:
        return "" if self.stopped else self._emit_to(len(self.text))

    def _emit_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:end], end
        return out
