"""A short profile of the user, computed on the device from the user's own replies; it never leaves it.

:func:`compute_profile` reads the user's (cue, reply) examples and describes, in one or two plain
sentences, how the user writes:

* **reply length**: the median number of words of a reply;
* **register**: how the user addresses people: the share of *thou / thee / thy / thine / thyself*
  among second-person words (against *you / your / yours / yourself / ye*);
* **names**: capitalised words (not at the start of a sentence) the user writes at least twice;
* **topics**: the words with the highest tf-idf, the term frequency over the user's replies
  against a *public* background of document frequencies: the texts passed as ``background``
  (e.g. public text the device ships), else the base model's tokenizer vocabulary (a byte-level BPE
  vocabulary orders its tokens by how early they were merged, that is, how frequent they are in
  the model's public training text: a word that is one early token is common; words made of
  several pieces are rare).

The profile is saved in the device's store (blob ``profile``) and used in generation as a short
natural-language prefix (a ChatML system turn, :func:`system_prefix`). It is text about the user,
as personal as the replies it summarises: the data-flow inventory scans every reply the device
sends for it (:mod:`fedpersona.client.flow_log`), and a message that carries it is a violation
(:func:`fedpersona.privacy.audit.inventory.verify_inventory`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PROFILE = "profile"
#: What the stored profile was computed from (a digest of the pairs and the tokenizer's source).
PROFILE_KEY = "profile-key"
THOU = frozenset({"thou", "thee", "thy", "thine", "thyself"})
YOU = frozenset({"you", "your", "yours", "yourself", "ye"})
#: Function words of modern and Early Modern English: never names or topics.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers herself
him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their theirs them themselves then
there these they this those through to too under until up very was we were what when where which while who whom why
will with would yet o oh ay nay thou thee thy thine thyself you your yours yourself ye art hath doth dost didst hast
shalt wilt shall may must let us upon tis twas ere thus hence whence thence therefore wherefore sir come go well good
make made say said tell see know like one two yes nor let's i'll i'm it's that's what's an't 'tis e'en o'er ne'er
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")


@dataclass(frozen=True)
class Profile:
    examples: int
    median_words: float
    thou_share: float | None  # share of thou-forms among second-person words; None if the user writes none
    names: tuple[str, ...]
    topics: tuple[str, ...]

    def text(self) -> str:
        """The profile as the prefix the model sees (empty for a user without examples)."""
        if self.examples == 0:
            return ""
        parts = [f"The user writes short replies of about {round(self.median_words)} words"
                 if self.median_words < 25 else f"The user writes long replies of about {round(self.median_words)} words"]
        if self.thou_share is not None:
            if self.thou_share >= 0.5:
                parts.append(f"addresses people as thou and thee ({self.thou_share:.0%} of the time)")
            else:
                parts.append(f"addresses people as you ({1 - self.thou_share:.0%} of the time)")
        sentence = ", ".join(parts) + "."
        if self.names:
            sentence += f" Often names {', '.join(self.names)}."
        if self.topics:
            sentence += f" Speaks of {', '.join(self.topics)}."
        return sentence


def words(text: str) -> list[str]:
    """Words, a possessive 's dropped (father's -> father)."""
    return [w[:-2] if w.lower().endswith("'s") and len(w) > 3 else w for w in _WORD.findall(text)]


def document_frequencies(texts: Iterable[str]) -> tuple[Counter, int]:
    """(document frequency per lower-cased word, number of documents) of a public background."""
    df: Counter = Counter()
    n = 0
    for t in texts:
        n += 1
        df.update({w.lower() for w in words(t)})
    return df, n


def tokenizer_idf(tokenizer, words: Sequence[str]) -> dict[str, float]:
    """An idf-like weight of each word from the tokenizer's vocabulary order (see the module docstring): one
    tokenizer call for all of them."""
    words = list(words)
    if not words:
        return {}
    vocab = max(1, len(tokenizer))
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return {w: math.log(2.0 + (ids[0] if len(ids) == 1 else vocab * len(ids))) for w, ids in zip(words, encoded)}


def compute_profile(
    pairs: Sequence[tuple[str, str]],
    *,
    background: tuple[Counter, int] | None = None,
    tokenizer=None,
    max_names: int = 3,
    max_topics: int = 4,
) -> Profile:
    """The profile of a user from the user's own ``(cue, reply)`` examples (only the replies are read)."""
    replies = [r for _, r in pairs if r.strip()]
    if not replies:
        return Profile(0, 0.0, None, (), ())
    words_per = [words(r) for r in replies]
    median_words = float(statistics.median(len(w) for w in words_per))
    lower = [w.lower() for ws in words_per for w in ws]
    thou = sum(1 for w in lower if w in THOU)
    you = sum(1 for w in lower if w in YOU)
    thou_share = thou / (thou + you) if thou + you else None

    names: Counter = Counter()
    for r in replies:
        for sentence in re.split(r"(?<=[.!?;:])\s+", r):
            ws = words(sentence)
            for w in ws[1:]:
                if w[0].isupper() and w.lower() not in STOPWORDS and not w.isupper() and len(w) > 2:
                    names[w] += 1
    top_names = tuple(w for w, c in names.most_common() if c >= 2)[:max_names]

    tf = Counter(w for w in lower if w not in STOPWORDS and len(w) > 2 and "'" not in w)
    name_set = {n.lower() for n in top_names}
    candidates = [w for w, c in tf.items() if c >= 2 and w not in name_set]
    if background is not None:
        df, n_docs = background
        weight = {w: math.log((1 + n_docs) / (1 + df.get(w, 0))) + 1.0 for w in candidates}
    elif tokenizer is not None:
        weight = tokenizer_idf(tokenizer, candidates)
    else:
        weight = dict.fromkeys(candidates, 1.0)
    scored = sorted(((tf[w] * weight[w], w) for w in candidates), key=lambda x: (-x[0], x[1]))
    topics = tuple(w for _, w in scored[:max_topics])
    return Profile(len(replies), median_words, thou_share, top_names, topics)


def system_prefix(profile_text: str) -> str:
    """The profile as a ChatML system turn, put before the conversation ('' for an empty profile)."""
    if not profile_text:
        return ""
    return f"<|im_start|>system\n{profile_text}<|im_end|>\n"


def save_profile(store, profile_text: str) -> None:
    """Store the profile (encrypted) when it changed."""
    if store.load_text(PROFILE) != profile_text:
        store.save_text(PROFILE, profile_text)


def refresh_profile(store, pairs: Sequence[tuple[str, str]], *, tokenizer=None, source: str = "") -> bool:
    """Compute and store the profile of ``pairs``, unless the stored profile is the one computed from the very same
    pairs with the same tokenizer (``source``, its model path): a device built again does not redo it. True when
    computed. The key names both the pairs and the profile's text, so a profile written since by anything else
    (``fedpersona chat``) is computed again. The profile and its key land in the caller's commit."""
    pairs_digest = hashlib.sha256(json.dumps([source, [list(p) for p in pairs]]).encode()).hexdigest()
    stored, stored_key = store.load_text(PROFILE), store.load_text(PROFILE_KEY)
    if stored is not None and stored_key == _profile_key(pairs_digest, stored):
        return False
    text = compute_profile(pairs, tokenizer=tokenizer).text()
    if text != stored:
        store.save_text(PROFILE, text)
    key = _profile_key(pairs_digest, text)
    if stored_key != key:
        store.save_text(PROFILE_KEY, key)
    return True


def _profile_key(pairs_digest: str, text: str) -> str:
    return f"{pairs_digest}:{hashlib.sha256(text.encode()).hexdigest()}"


def load_profile(store) -> str | None:
    return store.load_text(PROFILE)


def profile_needles(profile_text: str | None, *, min_chars: int = 16) -> list[str]:
    """What the inventory looks for in outgoing messages: the profile and each of its sentences."""
    if not profile_text:
        return []
    pieces = [profile_text] + [s.strip() for s in re.split(r"(?<=\.)\s+", profile_text)]
    out = []
    for p in pieces:
        if len(p) >= min_chars and p not in out:
            out.append(p)
    return out
