"""Stop sequences: cut before the first stop string, also when it spans tokens."""

from __future__ import annotations

import random

import pytest
from thunderkv.serve.stops import StopMatcher


def _run(pieces, stops):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.feed(p))
        if m.hit:
            break
    return "".join(out) + ("" if m.hit else m.flush()), m.hit


@pytest.mark.parametrize("pieces,stops,want", [
    (["ab", "c\n", "d"], ["\n"], ("abc", True)),
    (["a", "bd", "dd", "x"], ["ddd"], ("ab", True)),          # spans three tokens
    (["he", "ll", "o"], ["llo", "el"], ("h", True)),          # the earliest in the text wins
    (["dd", "x"], ["ddd"], ("ddx", False)),                   # a held prefix that did not match
    (["abc"], None, ("abc", False)),
    (["abc"], ["z"], ("abc", False)),
    (["", "st", "op"], ["stop"], ("", True)),
])
def test_cases(pieces, stops, want):
    assert _run(pieces, stops) == want


def test_random_splits_match_a_whole_string_search():
    """After each piece, the text so far is searched whole: the first piece that completes a
    stop string ends the completion at the earliest stop string in the text so far."""
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4)))
                 for _ in range(rng.randrange(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        want, seen = (text, False), ""
        for p in pieces:
            seen += p
            at = min((i for s in stops if (i := seen.find(s)) >= 0), default=-1)
            if at >= 0:
                want = (seen[:at], True)
                break
        assert _run(pieces, stops) == want, (pieces, stops)
