"""The random draws of one training step, in one fixed order, for every trainer.

The sequential trainer (:mod:`fedpersona.client.train`) and the cohort engine
(:mod:`fedpersona.simulations.engine`) both draw a client's step like this, so that with the
same :class:`~fedpersona.privacy.noise.NoiseSource` they train the same model:

1. one source of draws per step: :func:`step_generator` (a fresh AES-256-CTR stream
   keyed from ``os.urandom`` by default, :class:`~fedpersona.privacy.noise.CsprngStream`; the
   injected torch generator in tests);
2. the batch from it: a Poisson mask over the ``n`` examples (DP-SGD), or a
   uniform minibatch without replacement (local, non-private training);
3. then, for a DP step, the Gaussian noise of every trained tensor as ONE flat
   float32 noise vector of their total size, in the trainer's parameter order, split
   into the tensors afterwards (:func:`flat_noise`). With :data:`ROBUST_NOISE` (the
   default) each coordinate is the sum of 4 Gaussian draws divided by 2 (the
   construction Opacus's ``secure_mode`` uses, Holohan et al. 2021), which defeats the
   floating-point attacks on a sampled Gaussian (Mironov 2012); the draws themselves
   come from the step's source of step 1.

One flat draw per client and step keeps the kernel launches of a cohort of many
clients low; its values equal per-tensor draws in distribution, not bit for bit.
A secure source draws on the CPU and the noise is moved to the model's device.
"""

from __future__ import annotations

import torch

from fedpersona.privacy.noise import CsprngStream, NoiseSource, StepRandomness

#: Noise robust to floating-point attacks (see the module docstring); the benchmark turns it off to price it.
ROBUST_NOISE = True


def step_generator(source: NoiseSource) -> StepRandomness:
    """The draws of one step: its batch, then its noise (a fresh CSPRNG stream, or the injected generator)."""
    return source.generator("cpu")


def poisson_batch(source: NoiseSource, gen: StepRandomness, n: int, rate: float) -> torch.Tensor:
    """Indices of the examples that joined this step's Poisson batch (sorted, possibly empty)."""
    return source.poisson_mask(n, rate, generator=gen).nonzero().flatten()


def uniform_batch(gen: StepRandomness, n: int, size: int) -> torch.Tensor:
    """``min(size, n)`` distinct indices drawn uniformly (sorted)."""
    if size < 1:
        raise ValueError(f"A uniform minibatch needs a size of at least 1. You passed: {size}")
    if isinstance(gen, CsprngStream):  # a uniformly random permutation: the order of n uniform keys
        return torch.from_numpy(gen.uniform(n).argsort(kind="stable")[: min(size, n)]).sort().values
    return torch.randperm(n, generator=gen)[: min(size, n)].sort().values


def flat_noise(source: NoiseSource, gen: StepRandomness, numel: int, *, std: float,
               device: torch.device | str = "cpu", robust: bool | None = None) -> torch.Tensor:
    """N(0, std^2) noise for all of a step's trained coordinates, float32 on ``device``.

    Drawn where ``gen`` draws (the CPU: a CSPRNG stream, or an injected CPU generator) and
    moved, so a test's noise does not depend on the device.
    """
    device = torch.device(device)
    if std == 0:
        return torch.zeros(numel, dtype=torch.float32, device=device)
    if not (ROBUST_NOISE if robust is None else robust):
        return source.normal((numel,), std=std, generator=gen).to(device)
    if isinstance(gen, CsprngStream):  # the 4 draws summed in float64, then one cast
        total = gen.normal(4 * numel).reshape(4, numel).sum(axis=0) * (float(std) / 2)
        return torch.from_numpy(total).to(device=device, dtype=torch.float32)
    source.normal((1,), std=std, generator=gen)  # discarded (the injected generators' draw order since 2026-11)
    total = source.normal((numel,), std=std, generator=gen)
    for _ in range(3):
        total += source.normal((numel,), std=std, generator=gen)
    return (total / 2).to(device)
