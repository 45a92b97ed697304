"""Stop sequences for streamed completions (the OpenAI ``stop`` parameter).

Text arrives token by token and a stop string may span tokens, so :class:`StopMatcher` holds
back the longest tail that could still begin one. As in the OpenAI API, the completion ends
just before the stop string and the string itself is not returned. The first piece of text that
completes any stop string ends the completion, cut at the earliest stop string in the text so
far (several can complete within one piece).

Each stop string runs a Knuth-Morris-Pratt matcher over the text as it arrives, so a piece costs
time in proportion to its own length (amortized), however long the stop strings are: the
matcher's state, the length of the longest tail of the text so far that begins the stop
string, is carried from piece to piece. (The HTTP layer also bounds the number and length of
stop strings, see ``serve/api_types.py``.)
"""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """KMP failure function: ``f[i]`` is the length of the longest proper border of
    ``s[:i + 1]`` (a prefix of it that is also a suffix)."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class _Kmp:
    """One stop string: ``state`` is the length of the longest tail of the text fed so far that
    is a proper prefix of the string."""

    def __init__(self, s: str) -> None:
        self.s = s
        self.f = _failure(s)
        self.state = 0

    def first_end(self, text: str) -> int:
        """Feeds ``text``: the index in ``text`` just past the first complete occurrence of the
        string that ends in it (the state is then stale: the matcher is done), or -1."""
        s, f, k, n = self.s, self.f, self.state, len(self.s)
        for i, ch in enumerate(text):
            while k and ch != s[k]:
                k = f[k - 1]
            if ch == s[k]:
                k += 1
                if k == n:
                    return i + 1
        self.state = k
        return -1


class StopMatcher:
    """Feed generated text in order; :attr:`hit` turns True at the first stop string."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in stops or [] if s]
        self._kmp = [_Kmp(s) for s in self.stops]
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that can be returned now."""
        if not self.stops or self.hit:
            return "" if self.hit else text
        held = len(self._held)
        buf = self._held + text
        # A stop string ending in this piece starts within it or within the held tail (each
        # matcher's state is at most the held length), so its position in ``buf`` is >= 0; the
        # first occurrence of one string to end is also its first to start.
        starts = [held + end - len(m.s) for m in self._kmp if (end := m.first_end(text)) >= 0]
        if starts:
            self.hit, self._held = True, ""
            return buf[:min(starts)]
        keep = max(m.state for m in self._kmp)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the completion (no stop string followed)."""
        out, self._held = self._held, ""
        return out
