"""Server-side update of the shared adapter: :class:`fedpersona.optim.ServerOptimizer` (in the core, since a
simulated device's local-only baseline replays the same optimizer on its own sums)."""

from fedpersona.optim import KINDS, ServerOptimizer

__all__ = ["KINDS", "ServerOptimizer"]
