"""Stop sequences for streamed completions (the OpenAI ``stop`` parameter).

Text arrives token by token and a stop string may span tokens, so :class:`StopMatcher` holds
back the longest tail that could still begin one. As in the OpenAI API, the completion ends
just before the stop string and the string itself is not returned. The first piece of text that
completes any stop string ends the completion, cut at the earliest stop string in the text so
far (several can complete within one piece).
"""

from __future__ import annotations


class StopMatcher:
    """Feed generated text in order; :attr:`hit` turns True at the first stop string."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in stops or [] if s]
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that can be returned now."""
        if not self.stops or self.hit:
            return "" if self.hit else text
        buf = self._held + text
        at = min((i for s in self.stops if (i := buf.find(s)) >= 0), default=-1)
        if at >= 0:
            self.hit, self._held = True, ""
            return buf[:at]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])),
                   default=0)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the completion (no stop string followed)."""
        out, self._held = self._held, ""
        return out
