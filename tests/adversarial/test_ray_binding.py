"""Issue 20, hole 3 (Ray): `fedpersona run --engine flower` started Ray listening on every interface.

On main (cb416a4) the Flower engine's Ray (simulations/runner.py) took Ray's Linux default, cluster
mode: its GCS, raylet, object manager and workers listened on the machine's address and on ``::``,
so anyone on the network could reach them (and Ray runs whatever code its clients submit). As a
neighbour on the network would: start Ray the way `fedpersona run --engine flower` does, then list
every TCP port the Ray processes listen on and the address each is bound to. Every one must be a
loopback address. (Every Ray our simulations start goes through the same function,
fedpersona.simulations.engine.shards.start_ray: the sharded cohort engine and the Flower SecAgg+ benchmark too.)
"""

from __future__ import annotations

import os

import pytest

from fedpersona.simulations.processes import listening, process_tree

ray = pytest.importorskip("ray")


def test_the_flower_engines_ray_listens_on_loopback_only():
    from fedpersona.simulations.runner import _init_ray

    if ray.is_initialized():
        ray.shutdown()
    _init_ray(1)
    try:
        ports = listening(process_tree(os.getpid()))
        assert len(ports) >= 3, f"Ray's GCS, raylet and object manager should be listening: {ports}"
        exposed = [p for p in ports if not p.loopback]
        assert not exposed, f"Ray listens beyond the loopback interface: {exposed}"
    finally:
        ray.shutdown()
