"""Randomness for DP-SGD: Gaussian noise and Poisson sampling from a cryptographically secure generator.

DP-SGD's guarantee assumes that nobody can predict the noise or the batches. torch's
generators (MT19937 on the CPU, Philox on CUDA) are not cryptographically secure: whoever
knows or recovers their state reproduces the noise. A secure :class:`NoiseSource` therefore
draws every step's randomness from a :class:`CsprngStream`: an AES-256-CTR keystream
(:class:`fedpersona.privacy.secagg.crypto.SecureRNG`) under a key of 32 bytes read from ``os.urandom``
(the kernel's CSPRNG) for that step. From that stream:

* **uniforms**: 53-bit floats ``k / 2^53`` (``k`` uniform in ``[0, 2^53)``);
* **Poisson masks**: example ``i`` joins the batch iff its uniform is below the rate ``q``;
* **Gaussians**: the Box-Muller transform of two such uniforms, computed in float64
  (``sqrt(-2 ln(1 - u1)) * cos(2 pi u2)`` and ``... sin(2 pi u2)``), cast to the
  tensor's dtype; :func:`fedpersona.privacy.dpstep.flat_noise` adds 4 of them per coordinate
  (divided by 2) against floating-point attacks on a sampled Gaussian.

No state carries over between steps, and no torch generator is used. The draws are made on
the CPU and moved to the model's device.

Tests (never the default) may inject a seeded ``torch.Generator`` to make noise and
batches reproducible: ``NoiseSource(generator=torch.Generator().manual_seed(0))``; such a
source reports ``secure = False`` so that callers can refuse or flag it.

Pickled (to a Ray actor of :mod:`fedpersona.simulations.engine.shards`, or any other process), a
secure source arrives as a new secure source: the receiving process keys every step's
stream from its own ``os.urandom``; no key or stream state ever travels. An injected
source travels with its generator's current state (tests compare sharded and
in-process training with it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["CsprngStream", "NoiseSource", "SECURE", "StepRandomness"]


class CsprngStream:
    """One step's random draws from AES-256-CTR under a fresh ``os.urandom`` key (see the module docstring).

    ``seed`` (bytes) makes the stream deterministic: only for tests of the transforms.
    """

    def __init__(self, *, seed: bytes | None = None) -> None:
        from fedpersona.privacy.secagg.crypto import SecureRNG  # cryptography's AES; loaded with the first secure draw

        self._rng = SecureRNG(seed)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def uniform(self, n: int) -> np.ndarray:
        """``n`` uniforms in ``[0, 1)`` with 53 random bits each (float64)."""
        return self._rng.uniform01(int(n))

    def normal(self, n: int) -> np.ndarray:
        """``n`` standard normal draws (float64), Box-Muller from pairs of 53-bit uniforms."""
        n = int(n)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u1 in (0, 1]: the log is finite
        angle = (2.0 * math.pi) * u[pairs:]
        out = np.empty(2 * pairs, dtype=np.float64)
        out[:pairs] = radius * np.cos(angle)
        out[pairs:] = radius * np.sin(angle)
        return out[:n]


#: What one step draws from: a CSPRNG stream (secure) or an injected torch generator (tests).
StepRandomness = CsprngStream | torch.Generator


class NoiseSource:
    """Where DP noise and Poisson masks come from (keyword-only construction)."""

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self._injected = generator

    @property
    def secure(self) -> bool:
        """True when every step draws from a fresh AES-256-CTR stream keyed from ``os.urandom`` (the default)."""
        return self._injected is None

    def __reduce__(self):
        if self._injected is None:
            return (NoiseSource, ())  # nothing but "secure": the receiver keys its own streams
        return (_injected_source, (str(self._injected.device), self._injected.get_state()))

    def generator(self, device: torch.device | str | None = None) -> StepRandomness:
        """The draws of one step: a fresh CSPRNG stream, or the injected generator.

        ``device`` is ignored by a secure source: its draws are made on the CPU (and moved).
        """
        if self._injected is not None:
            return self._injected
        return CsprngStream()

    def normal(self, shape: tuple[int, ...] | torch.Size, *, std: float, device=None,
               dtype: torch.dtype = torch.float32, generator: StepRandomness | None = None) -> torch.Tensor:
        """Gaussian noise N(0, std^2) of ``shape`` (zeros when ``std == 0``)."""
        if std == 0:
            return torch.zeros(shape, device=device, dtype=dtype)
        gen = generator if generator is not None else self.generator(device)
        if isinstance(gen, CsprngStream):
            n = math.prod(tuple(shape))
            values = torch.from_numpy(gen.normal(n) * float(std)).reshape(tuple(shape))
            return values.to(device=device if device is not None else "cpu", dtype=dtype)
        return torch.normal(0.0, float(std), size=tuple(shape), generator=gen, device=device, dtype=dtype)

    def poisson_mask(self, n: int, rate: float, *, generator: StepRandomness | None = None) -> torch.Tensor:
        """Each of ``n`` examples joins the batch independently with probability ``rate`` (bool[n])."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Poisson sample rate must be in [0, 1]. You passed: {rate!r}")
        gen = generator if generator is not None else self.generator("cpu")
        if isinstance(gen, CsprngStream):
            return torch.from_numpy(gen.uniform(n) < rate)
        return torch.rand(n, generator=gen) < rate


def _injected_source(device: str, state: torch.Tensor) -> NoiseSource:
    """An unpickled injected source: its generator at the state it was pickled with."""
    gen = torch.Generator(device=device)
    gen.set_state(state)
    return NoiseSource(generator=gen)


SECURE = NoiseSource()
