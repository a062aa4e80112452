"""fedpersona.flower_patches: Flower's object-pull backoff shortened, nothing else changed."""

from __future__ import annotations

import types

import pytest

from fedpersona.flower_patches import shorten_pull_backoff


def _module():
    mod = types.ModuleType("fake_flower")

    def pull_objects(ids, pull_object_fn, *, max_time=None, initial_backoff=1.0, backoff_cap=10.0):
        return {"ids": list(ids), "fn": pull_object_fn, "max_time": max_time,
                "initial_backoff": initial_backoff, "backoff_cap": backoff_cap}

    mod.pull_objects = pull_objects
    return mod


def test_rebinds_pull_objects_with_a_short_backoff_and_keeps_everything_else():
    mod = _module()
    assert shorten_pull_backoff(mod)
    out = mod.pull_objects(["a"], "f", max_time=5)
    assert out == {"ids": ["a"], "fn": "f", "max_time": 5, "initial_backoff": 0.05, "backoff_cap": 0.5}
    assert shorten_pull_backoff(mod, initial=0.1, cap=1.0)  # idempotent: wraps the original, not the wrapper
    assert mod.pull_objects([], None)["initial_backoff"] == 0.1
    assert mod.pull_objects.func is mod.pull_objects._fedpersona_original


def test_other_layouts_are_left_alone():
    assert not shorten_pull_backoff(types.ModuleType("empty"))
    mod = types.ModuleType("other")
    mod.pull_objects = lambda ids: ids  # no backoff arguments
    assert not shorten_pull_backoff(mod) and mod.pull_objects([1]) == [1]
    with pytest.raises(ValueError, match="initial"):
        shorten_pull_backoff(_module(), initial=1.0, cap=0.5)


def test_flowers_own_modules_have_the_expected_layout():
    # if a Flower upgrade moves these, the deployment would silently get slower: fail here instead
    import flwr.superlink.grid.http_grid as grid
    import flwr.supernode.runtime.run_clientapp as clientapp
    import flwr.supernode.start_client_internal as supernode

    for mod, name in ((grid, "pull_objects"), (supernode, "pull_objects"),
                      (clientapp, "pull_and_inflate_object_from_tree")):
        original = getattr(mod, name)
        try:
            assert shorten_pull_backoff(mod, name), f"{mod.__name__}.{name}"
            assert getattr(mod, name).keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
        finally:
            setattr(mod, name, getattr(original, "_fedpersona_original", original))
