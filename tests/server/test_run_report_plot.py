"""users.png: named bars for a few users, one point per user for many (a readable figure of bounded size)."""

from __future__ import annotations

import random

from PIL import Image

from fedpersona.server.run_report import BARS_UP_TO, plot_users


def _users(n: int) -> list[dict]:
    rng = random.Random(n)
    out = []
    for i in range(n):
        base = 5.0 + rng.random()
        out.append({"user": f"play::role-{i}", "base-loss": base, "shared-loss": base * 0.98,
                    "personal-loss": base * (0.95 - 0.02 * rng.random()), "local-loss": base * 0.96})
    return out


def test_users_png_stays_readable_and_bounded_for_a_thousand_users(tmp_path):
    for name in ("few", "many"):
        (tmp_path / name).mkdir()
    few = plot_users(tmp_path / "few", _users(BARS_UP_TO))
    many = plot_users(tmp_path / "many", _users(1000))
    w_few, _ = Image.open(few).size
    w_many, h_many = Image.open(many).size
    assert w_few > 0.3 * BARS_UP_TO * 110  # one named pair of bars per user, 0.38 in each at 110 dpi
    assert w_many <= 11 * 110 and h_many <= 5 * 110  # 1000 users: the same 10 x 4.6 in, not 382 in wide


def test_users_png_has_nothing_to_draw_without_figures(tmp_path):
    assert plot_users(tmp_path, [{"user": "a", "base-loss": float("nan")}]) is None
