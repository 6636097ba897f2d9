"""Stop strings over streamed text: emit what is final, never leak a stop string."""

from __future__ import annotations


class StopStringScanner:
    """Turns a growing decoded text into safe-to-emit pieces, cutting at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.emitted = 0
        self.stopped = False
        self.stop_hit: str | None = None  # the stop string that ended the text

    def feed(self, text: str, final: bool = False) -> str:
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            hit, self.stop_hit = min(hits)
            self.stopped = True
            out, self.emitted = text[self.emitted : hit], hit
            return out
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                safe = len(text.rstrip("\ufffd"))
            for stop in self.stops:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        out = text[self.emitted : max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return out
