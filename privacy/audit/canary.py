"""Canaries: random secrets planted in users' data, and their exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019).

Two kinds, both ordinary (cue, reply) examples that go through the device's normal data path:

* **secret canaries**, for exposure: the cue ``"Code?"``, the reply ``"Code 381529"`` with
  ``digits`` random digits (a space of ``10^digits``
  secrets). Planted ``repeats`` times in chosen users' data.
* **random-word canaries**, for the one-run audit: cue and reply made of random words (vocabulary
  words of the model's tokenizer), each one unique, each planted once with probability 1/2.

Exposure. The log-perplexity of a secret is the summed loss of its reply tokens (the template
before the digits is the same for every secret, so it only shifts every score alike). With
``C`` candidate secrets drawn uniformly from the space (the planted ones excluded)::

    p = (1 + #{candidates with log-perplexity <= the canary's}) / (C + 1)
    exposure = -log2(p)

``p`` is the rank of the canary among the candidates and itself; if the canary were just
another random secret (never trained on), ``P[p <= x] <= x``: ``p`` is an exact permutation
p-value, and an exposure above ``log2(tests / 0.05)`` is above chance at 95% (Bonferroni over
the tests). Its ceiling is ``log2(C + 1)``; beyond it, the skew-normal fit of the candidates'
log-perplexities (the paper's extrapolation) estimates the exposure up to ``log2(10^digits)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["SECRET_CUE", "secret_reply", "random_secrets", "word_pool", "word_canaries", "exposure"]

SECRET_CUE = "Code?"
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def secret_reply(secret: str) -> str:
    return f"Code {secret}"


def random_secrets(rng: np.random.Generator, count: int, *, digits: int, exclude: Sequence[str] = ()) -> list[str]:
    """``count`` distinct uniform secrets of ``digits`` digits, none in ``exclude``."""
    space = 10**digits
    if count + len(exclude) > space:
        raise ValueError(f"cannot draw {count} distinct secrets of {digits} digits (space {space}, {len(exclude)} excluded)")
    seen = set(exclude)
    out: list[str] = []
    while len(out) < count:
        s = f"{int(rng.integers(space)):0{digits}d}"
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def word_pool(tokenizer, *, minimum: int = 500) -> list[str]:
    """Words that are one token each for this tokenizer (lower-case, 4-10 letters, after a space).

    A small vocabulary (the tests' tiny tokenizer) with fewer than ``minimum`` such words falls
    back to every alphabetic token of two letters or more, then to syllable pseudo-words.
    """
    texts = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()]
    words = sorted({t.strip() for t in texts if re.fullmatch(r" [a-z]{4,10}", t)})
    if len(words) >= minimum:
        return words
    words = sorted({t.strip() for t in texts if re.fullmatch(r" ?[A-Za-z]{2,}", t)})
    if len(words) >= 50:
        return words
    return sorted({a + b for a in _SYLLABLES for b in _SYLLABLES})


def word_canaries(rng: np.random.Generator, pool: Sequence[str], count: int, *, cue_words: int = 3,
                  reply_words: int = 6) -> list[tuple[str, str]]:
    """``count`` distinct (cue, reply) pairs of random words from ``pool``."""
    out, seen = [], set()
    while len(out) < count:
        idx = rng.integers(len(pool), size=cue_words + reply_words)
        words = [pool[i] for i in idx]
        pair = (" ".join(words[:cue_words]).capitalize() + "?", " ".join(words[cue_words:]).capitalize() + ".")
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def exposure(canary_logppl: float, candidate_logppl: Sequence[float], *, space: int) -> dict:
    """Exposure of one canary from candidates' log-perplexities (see the module docstring)."""
    cand = np.asarray(candidate_logppl, dtype=float)
    if cand.size < 2:
        raise ValueError(f"need at least 2 candidates. You passed: {cand.size}")
    below = int((cand <= canary_logppl).sum())
    p = (1 + below) / (cand.size + 1)
    ceiling = math.log2(space)
    try:
        a, loc, scale = stats.skewnorm.fit(cand)
        cdf = float(stats.skewnorm.cdf(canary_logppl, a, loc, scale))
        extrapolated = min(ceiling, -math.log2(cdf)) if cdf > 0 else ceiling
    except Exception:  # a degenerate fit (identical candidates)
        extrapolated = math.nan
    return {
        "log_perplexity": float(canary_logppl),
        "rank": below + 1,
        "candidates": int(cand.size),
        "p_value": p,
        "exposure": -math.log2(p),
        "exposure_ceiling": math.log2(cand.size + 1),
        "exposure_extrapolated": extrapolated,
        "exposure_max": ceiling,
    }
