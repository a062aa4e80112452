"""The random draws of one training step, in one fixed order, for every trainer.

The sequential trainer (:mod:`client.train`) and the cohort engine
(:mod:`simulations.engine`) both draw a client's step like this, so that with the
same :class:`~privacy.noise.NoiseSource` they train the same model:

1. one generator per step: :func:`step_generator` (fresh from the OS's CSPRNG by
   default; the injected one in tests);
2. the batch from it: a Poisson mask over the ``n`` examples (DP-SGD), or a
   uniform minibatch without replacement (local, non-private training);
3. then, for a DP step, the Gaussian noise of every trained tensor as ONE flat
   float32 noise vector of their total size, in the trainer's parameter order, split
   into the tensors afterwards (:func:`flat_noise`). With :data:`ROBUST_NOISE` (the
   default) each coordinate is the sum of 4 Gaussian draws divided by 2, after one
   discarded draw (the construction of Opacus's ``secure_mode``, Holohan et al. 2021),
   which defeats the floating-point attacks on a sampled Gaussian (Mironov 2012); it
   does not choose the generator: the CSPRNG-seeded one of step 1 does.

One flat draw per client and step keeps the kernel launches of a cohort of many
clients low; its values equal per-tensor draws in distribution, not bit for bit.
"""

from __future__ import annotations

import torch

from privacy.noise import NoiseSource

#: Noise robust to floating-point attacks (see the module docstring); the benchmark turns it off to price it.
ROBUST_NOISE = True


def step_generator(source: NoiseSource) -> torch.Generator:
    """The CPU generator of one step's batch draw (and of its noise on the CPU)."""
    return source.generator("cpu")


def poisson_batch(source: NoiseSource, gen: torch.Generator, n: int, rate: float) -> torch.Tensor:
    """Indices of the examples that joined this step's Poisson batch (sorted, possibly empty)."""
    return source.poisson_mask(n, rate, generator=gen).nonzero().flatten()


def uniform_batch(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """``min(size, n)`` distinct indices drawn uniformly (sorted)."""
    if size < 1:
        raise ValueError(f"A uniform minibatch needs a size of at least 1. You passed: {size}")
    return torch.randperm(n, generator=gen)[: min(size, n)].sort().values


def flat_noise(source: NoiseSource, gen: torch.Generator, numel: int, *, std: float,
               device: torch.device | str = "cpu", robust: bool | None = None) -> torch.Tensor:
    """N(0, std^2) noise for all of a step's trained coordinates, float32 on ``device``.

    A secure source draws on ``device`` itself (a fresh CSPRNG-seeded generator for
    a CUDA device); an injected generator draws where it lives (the CPU) and the
    values are moved, so a test's noise does not depend on the device.
    """
    device = torch.device(device)
    if std == 0:
        return torch.zeros(numel, dtype=torch.float32, device=device)
    if source.secure and device.type != "cpu":
        where, draw_gen = device, source.generator(device)
    else:
        where, draw_gen = gen.device, gen
    if not (ROBUST_NOISE if robust is None else robust):
        return source.normal((numel,), std=std, device=where, generator=draw_gen).to(device)
    source.normal((1,), std=std, device=where, generator=draw_gen)  # discarded, as Opacus's secure_mode does
    total = source.normal((numel,), std=std, device=where, generator=draw_gen)
    for _ in range(3):
        total += source.normal((numel,), std=std, device=where, generator=draw_gen)
    return (total / 2).to(device)
