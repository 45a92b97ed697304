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


def _random_case(rng: random.Random, alphabet: str, max_text: int, max_stop: int,
                 max_stops: int, max_pieces: int) -> tuple[list[str], list[str]]:
    """A random text cut into 1..``max_pieces`` pieces, and 1..``max_stops`` - 1 stop strings
    of 1..``max_stop`` - 1 characters, all over ``alphabet``."""
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, max_text)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, max_stop)))
             for _ in range(rng.randrange(1, max_stops))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, max_pieces))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])], stops


def _whole_string_search(pieces, stops):
    seen = ""
    for p in pieces:
        seen += p
        at = min((i for s in stops if (i := seen.find(s)) >= 0), default=-1)
        if at >= 0:
            return seen[:at], True
    return seen, False


def test_random_splits_match_a_whole_string_search():
    """After each piece, the text so far is searched whole: the first piece that completes a
    stop string ends the completion at the earliest stop string in the text so far."""
    rng = random.Random(7)
    for _ in range(500):
        pieces, stops = _random_case(rng, "abc", 30, 4, 3, 6)
        assert _run(pieces, stops) == _whole_string_search(pieces, stops), (pieces, stops)


def test_periodic_stop_strings_across_random_splits():
    """Stop strings that overlap themselves ("abab", "aabaa"): a partial match that fails must
    fall back to the longest border, across piece boundaries too."""
    rng = random.Random(11)
    for _ in range(500):
        pieces, stops = _random_case(rng, "ab", 40, 9, 5, 12)
        assert _run(pieces, stops) == _whole_string_search(pieces, stops), (pieces, stops)


def test_a_long_stop_string_costs_little_per_token():
    """Per-token work does not grow with the stop string's length (it used to be quadratic in
    it: ~0.45 s per token for a 200k-character stop string)."""
    import time

    for stop, piece in (("x" * 20_000, "ab"), ("a" * 20_000, "a"), ("ab" * 10_000, "ab")):
        m = StopMatcher([stop, "zz"])
        t0 = time.perf_counter()
        out = "".join(m.feed(piece) for _ in range(300))
        assert time.perf_counter() - t0 < 1.0, stop[:4]
        assert not m.hit and out + m.flush() == piece * 300
