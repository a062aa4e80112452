"""In-context exemplars: a few of the user's own (cue, reply) pairs shown to the model before a prompt.

The personal head moves the next-token losses by a few percent; what a sampled reply sounds like
moves far more when the model sees, as earlier turns of the conversation, how this user actually
answers. The device picks those turns from its own data, at generation time, on the device: they
are as personal as the replies themselves and never leave it (nothing here is sent; generation
sends nothing).

:func:`pick_exemplars` ranks the user's pairs by the content words they share with the prompt
(lower-cased words, the function words of :data:`fedpersona.client.profile.STOPWORDS` left out), prefers
short replies (a few turns must fit in front of the prompt), and breaks ties with a seeded
shuffle, so a given seed picks the same turns every time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedpersona.client.data import ASSISTANT_HEADER, IM_END, USER_HEADER
from fedpersona.client.profile import STOPWORDS, words

#: A reply longer than this (in words) is not used as an exemplar.
MAX_EXEMPLAR_WORDS = 40


def _content(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS and len(w) > 2}


def check_count(k: object) -> int:
    """``k`` if it is a valid number of exemplars (an integer >= 0), else a ValueError."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the number of exemplars must be an integer >= 0. You passed: {k!r}")
    return k


def pick_exemplars(pairs: Sequence[tuple[str, str]], prompt: str, k: int, *, seed: int = 0,
                   max_words: int = MAX_EXEMPLAR_WORDS) -> list[tuple[str, str]]:
    """Up to ``k`` of ``pairs`` to show before ``prompt``: most content words shared with it first."""
    if check_count(k) == 0 or not pairs:
        return []
    wanted = _content(prompt)
    short = [(c, r) for c, r in pairs if r.strip() and len(r.split()) <= max_words]
    pool = short or [(c, r) for c, r in pairs if r.strip()]
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    rank = {i: pos for pos, i in enumerate(order)}
    scored = sorted(range(len(pool)), key=lambda i: (-len(wanted & _content(pool[i][0] + " " + pool[i][1])), rank[i]))
    return [pool[i] for i in scored[:k]]


def exemplar_text(exemplars: Sequence[tuple[str, str]]) -> str:
    """The exemplars as earlier ChatML turns (user: the cue; assistant: the user's own reply)."""
    return "".join(f"{USER_HEADER}{cue}{ASSISTANT_HEADER}{reply}{IM_END}\n" for cue, reply in exemplars)
