"""In-context exemplars: the user's own turns picked on the device and shown before a prompt."""

import pytest

from fedpersona.client.data import ASSISTANT_HEADER, IM_END, USER_HEADER, format_prompt
from fedpersona.client.exemplars import MAX_EXEMPLAR_WORDS, exemplar_text, pick_exemplars

PAIRS = [
    ("Where is the duke?", "The duke is gone to Vienna, my lord."),
    ("What says the king?", "The king doth wake tonight and takes his rouse."),
    ("How fares the queen?", "Madam, the queen is sick and like to die."),
    ("Speak of Vienna.", "Vienna hath no news that I can tell thee, but the duke is gone."),
    ("Tell me more.", " ".join(["word"] * (MAX_EXEMPLAR_WORDS + 5)) + " Vienna Vienna duke"),
]


def test_the_turns_that_share_most_words_with_the_prompt_come_first():
    got = pick_exemplars(PAIRS, "What news from Vienna of the duke?", 2, seed=0)
    # Both share "vienna" and "duke" (PAIRS[3] also "news"); the long reply is never picked.
    assert got == [PAIRS[3], PAIRS[0]]
    assert PAIRS[4] not in pick_exemplars(PAIRS, "Vienna duke word", 5, seed=0)


def test_ties_are_broken_by_a_seeded_shuffle():
    ties = [(f"cue {i}", f"reply number {i}") for i in range(12)]
    a = pick_exemplars(ties, "nothing shared", 3, seed=4)
    assert a == pick_exemplars(ties, "nothing shared", 3, seed=4), "the same seed picks the same turns"
    assert len({tuple(pick_exemplars(ties, "nothing shared", 3, seed=s)) for s in range(6)}) > 1, "seeds differ"
    assert len(set(a)) == 3 and set(a) <= set(ties)


def test_zero_none_and_bad_counts():
    assert pick_exemplars(PAIRS, "Vienna", 0) == []
    assert pick_exemplars([], "Vienna", 3) == []
    assert len(pick_exemplars(PAIRS[:2], "Vienna", 10)) == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="number of exemplars"):
            pick_exemplars(PAIRS, "Vienna", bad)
    # Only long replies: they are used rather than nothing.
    assert pick_exemplars(PAIRS[4:], "Vienna", 1) == [PAIRS[4]]


def test_exemplars_are_earlier_chatml_turns_before_the_prompt():
    text = exemplar_text(PAIRS[:2]) + format_prompt("What news?")
    first = f"{USER_HEADER}{PAIRS[0][0]}{ASSISTANT_HEADER}{PAIRS[0][1]}{IM_END}\n"
    assert text.startswith(first)
    assert text.endswith(format_prompt("What news?"))
    assert text.count(USER_HEADER) == 3 and text.count(IM_END) == 5
    assert exemplar_text([]) == ""
