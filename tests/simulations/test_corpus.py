"""The Shakespeare corpus: parse, users, examples, selection."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedpersona.simulations.corpus import (
    Example,
    all_users,
    default_plays_dir,
    load_plays,
    load_users,
    parse_play,
    users_of_play,
)


@pytest.fixture(scope="module")
def users():
    return {u.user_id: u for u in all_users()}


# ---------------------------------------------------------------------------------------- counts
def test_corpus_counts_pinned():
    """DESIGN.md's reference: 1,405 roles, 30,778 speeches, 625 roles >= 10, 67 >= 100.

    This parser takes every ``**SPEAKER**`` line as a speech (31,354 such lines, less the two bold
    ``**Scene III**`` headings) and keeps speaker names exactly as spelled, so ``Nurse`` and
    ``NURSE`` in Romeo and Juliet are two roles (7 such pairs).
    """
    plays = load_plays()
    assert len(plays) == 38
    us = all_users()
    assert len(us) == 1424
    assert sum(u.num_speeches for u in us) == 31352
    assert sum(len(p.speeches) for p in plays) == 31352
    assert sum(u.num_speeches >= 10 for u in us) == 630
    assert sum(u.num_speeches >= 100 for u in us) == 71
    # within 2 % of the reference numbers
    assert abs(len(us) - 1405) / 1405 < 0.02
    assert abs(sum(u.num_speeches for u in us) - 30778) / 30778 < 0.02


def test_parse_is_fast_and_cached():
    load_plays()
    t = time.perf_counter()
    load_plays()
    all_users()
    assert time.perf_counter() - t < 0.1  # cached after the first call
    t = time.perf_counter()
    plays = [parse_play(p) for p in sorted(default_plays_dir().glob("*/*.md"))]
    assert len(plays) == 38
    assert time.perf_counter() - t < 2.0


def test_titles_and_slugs():
    by_slug = {p.slug: p for p in load_plays()}
    assert by_slug["hamlet"].title == "Hamlet"
    assert by_slug["henry-iv-part-1"].title == "Henry IV, Part I"
    # Measure for Measure has no "# Title" line: the title comes from the file name
    assert by_slug["measure-for-measure"].title == "Measure for Measure"


# ------------------------------------------------------------------------------------- speeches
def test_hamlet_to_be_or_not_to_be(users):
    hamlet = users["HAMLET (Hamlet)"]
    assert (hamlet.play, hamlet.role, hamlet.num_speeches) == ("Hamlet", "HAMLET", 359)
    ex = next(e for e in hamlet.examples if e.reply.startswith("To be, or not to be"))
    lines = ex.reply.split("\n")
    assert lines[:3] == [
        "To be, or not to be: that is the question:",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,",
    ]
    assert lines[-1] == "Be all my sins remember'd."
    assert len(lines) == 35
    # the cue is Polonius's line before it (stage directions between are dropped)
    assert ex.cue == "I hear him coming: let's withdraw, my lord."
    # Hamlet's first speech answers Claudius
    assert hamlet.examples[0] == Example(
        cue="Take thy fair hour, Laertes; time be thine,\nAnd thy best graces spend it at thy will!\n"
            "But now, my cousin Hamlet, and my son,--",
        reply="A little more than kin, and less than kind.",
    )


def test_scene_opening_speech_has_empty_cue(users):
    bernardo = users["BERNARDO (Hamlet)"]
    assert bernardo.examples[0] == Example(cue="", reply="Who's there?")
    francisco = users["FRANCISCO (Hamlet)"]
    assert francisco.examples[0] == Example(cue="Who's there?", reply="Nay, answer me: stand, and unfold yourself.")


def test_no_markup_left_in_text():
    for play in load_plays():
        for sp in play.speeches:
            assert sp.text and sp.text == sp.text.strip()
            assert not any(ch in sp.text for ch in "_*[]#\\"), (play.slug, sp)
            assert all(line == line.rstrip() for line in sp.text.split("\n"))


def test_direction_inside_speech_dropped(tmp_path: Path):
    md = tmp_path / "tragedies" / "a-toy-play.md"
    md.parent.mkdir()
    md.write_text(
        "# A Toy\n\n## ACT I\n\n### SCENE I. Here.\n\n_Enter A and B_\n\n"
        "**A**  \nHello there.  \n_\\[Aside]_  \nSecond line.\n\n"
        "**FIRST CITIZEN**  \n[Within]_  \nWho calls?\n\n_Exit A, with a very long direction\nthat wraps_\n\n"
        "**FIRST CITIZEN**  \nGone.\n\n### SCENE II. There.\n\n*Enter B.*\n\n**A**  \nAgain \\-- here.\n"
    )
    play = parse_play(md)
    assert play.title == "A Toy" and play.slug == "a-toy-play"
    assert [(s.speaker, s.text, s.scene) for s in play.speeches] == [
        ("A", "Hello there.\nSecond line.", 0),
        ("FIRST CITIZEN", "Who calls?", 0),
        ("FIRST CITIZEN", "Gone.", 0),
        ("A", "Again -- here.", 1),
    ]
    by_id = {u.user_id: u for u in users_of_play(play)}
    assert by_id["FIRST CITIZEN (A Toy)"].examples == (
        Example("Hello there.\nSecond line.", "Who calls?"),
        Example("", "Gone."),  # follows the same role: no cue from another speaker
    )
    assert by_id["A (A Toy)"].examples == (Example("", "Hello there.\nSecond line."), Example("", "Again -- here."))


# ------------------------------------------------------------------------------------ selection
def test_eligibility_threshold():
    for k in (10, 100):
        got = load_users(min_speeches=k, max_users=None, seed=0)
        assert all(u.num_speeches >= k for u in got)
        assert len(got) == sum(u.num_speeches >= k for u in all_users())
    got = load_users(min_speeches=100, max_users=None, seed=0)
    assert [(-u.num_speeches, u.user_id) for u in got] == sorted((-u.num_speeches, u.user_id) for u in got)
    assert got[0].user_id == "HAMLET (Hamlet)"


def test_sampling_deterministic_per_seed():
    a = load_users(min_speeches=10, max_users=20, seed=0)
    b = load_users(min_speeches=10, max_users=20, seed=0)
    c = load_users(min_speeches=10, max_users=20, seed=1)
    assert [u.user_id for u in a] == [u.user_id for u in b]
    assert len(a) == 20 and len({u.user_id for u in a}) == 20
    assert [u.user_id for u in a] == sorted(u.user_id for u in a)
    assert {u.user_id for u in a} != {u.user_id for u in c}
    assert all(u.num_speeches >= 10 for u in a + c)


def test_max_users_above_eligible_returns_all():
    got = load_users(min_speeches=200, max_users=1000, seed=3)
    assert len(got) == sum(u.num_speeches >= 200 for u in all_users())
    assert [u.user_id for u in got] == sorted(u.user_id for u in got)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_speeches": 0, "max_users": None}, "min_speeches.*0"),
        ({"min_speeches": 10, "max_users": 0}, "max_users.*0"),
        ({"min_speeches": 10_000, "max_users": None}, r"min-speeches=10000.*1424 users"),
    ],
)
def test_load_users_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_users(seed=0, **kwargs)


def test_missing_plays_dir(tmp_path: Path):
    with pytest.raises(ValueError, match="No plays"):
        load_users(min_speeches=1, max_users=None, seed=0, plays_dir=tmp_path)
