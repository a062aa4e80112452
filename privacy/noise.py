"""Randomness for DP-SGD: Gaussian noise and Poisson sampling from the OS's CSPRNG.

DP-SGD's guarantee assumes that nobody can predict the noise or the batches. torch's
default generator (MT19937, process-wide) is predictable: anyone who knows or sets its
seed reproduces the noise exactly. :class:`NoiseSource` therefore draws every step's
noise and sampling mask from a ``torch.Generator`` freshly seeded with 64 bits read from
``os.urandom`` (the kernel's CSPRNG) at that step; no state carries over between steps,
and torch's global generator is never used.

Tests (never the default) may inject a seeded ``torch.Generator`` to make noise and
batches reproducible: ``NoiseSource(generator=torch.Generator().manual_seed(0))``; such a
source reports ``secure = False`` so that callers can refuse or flag it.

Pickled (to a Ray actor of :mod:`simulations.engine.shards`, or any other process), a
secure source arrives as a new secure source: the receiving process seeds every step's
generator from its own ``os.urandom``; no generator state ever travels. An injected
source travels with its generator's current state (tests compare sharded and
in-process training with it).
"""

from __future__ import annotations

import os

import torch


class NoiseSource:
    """Where DP noise and Poisson masks come from (keyword-only construction)."""

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self._injected = generator

    @property
    def secure(self) -> bool:
        """True when every draw is seeded from ``os.urandom`` (the default)."""
        return self._injected is None

    def __reduce__(self):
        if self._injected is None:
            return (NoiseSource, ())  # nothing but "secure": the receiver draws from its own CSPRNG
        return (_injected_source, (str(self._injected.device), self._injected.get_state()))

    def generator(self, device: torch.device | str | None = None) -> torch.Generator:
        """A generator for one step's draws: fresh from the OS's CSPRNG, or the injected one."""
        if self._injected is not None:
            return self._injected
        gen = torch.Generator(device=torch.device(device) if device is not None else "cpu")
        gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return gen

    def normal(self, shape: tuple[int, ...] | torch.Size, *, std: float, device=None,
               dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise N(0, std^2) of ``shape`` (zeros when ``std == 0``)."""
        if std == 0:
            return torch.zeros(shape, device=device, dtype=dtype)
        gen = generator if generator is not None else self.generator(device)
        return torch.normal(0.0, float(std), size=tuple(shape), generator=gen, device=device, dtype=dtype)

    def poisson_mask(self, n: int, rate: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each of ``n`` examples joins the batch independently with probability ``rate`` (bool[n])."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Poisson sample rate must be in [0, 1]. You passed: {rate!r}")
        gen = generator if generator is not None else self.generator("cpu")
        return torch.rand(n, generator=gen) < rate


def _injected_source(device: str, state: torch.Tensor) -> NoiseSource:
    """An unpickled injected source: its generator at the state it was pickled with."""
    gen = torch.Generator(device=device)
    gen.set_state(state)
    return NoiseSource(generator=gen)


SECURE = NoiseSource()
