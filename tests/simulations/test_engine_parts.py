"""The engine's pieces against torch's own: chunked cross-entropy, stacked Adam/SGD, the step draws."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fedpersona.privacy.dpstep import flat_noise, poisson_batch, step_generator, uniform_batch
from fedpersona.privacy.noise import NoiseSource
from fedpersona.simulations.engine.loss import ChunkedCrossEntropy
from fedpersona.simulations.engine.optim import StackedOptimizer


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_cross_entropy_matches_torch(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, generator=g, requires_grad=True)
    w = torch.randn(11, 5, generator=g)
    labels = torch.randint(0, 11, (7,), generator=g)
    ref = F.cross_entropy(h @ w.T, labels, reduction="none")
    out = ChunkedCrossEntropy.apply(h, w, labels, chunk)
    torch.testing.assert_close(out, ref)
    coef = torch.randn(7, generator=g)
    (gh,) = torch.autograd.grad((out * coef).sum(), h)
    (gref,) = torch.autograd.grad((ref * coef).sum(), h)
    torch.testing.assert_close(gh, gref)


def test_chunked_cross_entropy_under_vmap_grad():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 6, 5, generator=g)  # 4 samples x 6 positions
    w = torch.randn(9, 5, generator=g)
    labels = torch.randint(0, 9, (4, 6), generator=g)

    def loss(x, lab):
        return ChunkedCrossEntropy.apply(x, w, lab, 4).mean()

    per_sample = vmap(grad(loss))(h, labels)
    for i in range(4):
        x = h[i].clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(F.cross_entropy(x @ w.T, labels[i]), x)
        torch.testing.assert_close(per_sample[i], ref)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_stacked_optimizer_matches_torch_per_client(kind):
    g = torch.Generator().manual_seed(2)
    clients, lrs = 3, [0.1, 0.01, 0.5]
    start = torch.randn(clients, 4, 2, generator=g)
    grads = [torch.randn(clients, 4, 2, generator=g) for _ in range(4)]
    apply = [torch.tensor([True, True, True]), torch.tensor([True, False, True]), torch.tensor([False, True, True]),
             torch.tensor([True, True, False])]
    stacked = {"w": start.clone()}
    opt = StackedOptimizer(stacked, kind=kind, lr=torch.tensor(lrs))
    for gr, ap in zip(grads, apply):
        opt.step({"w": gr}, ap)
    for c in range(clients):
        p = torch.nn.Parameter(start[c].clone())
        ref = torch.optim.Adam([p], lr=lrs[c]) if kind == "adam" else torch.optim.SGD([p], lr=lrs[c])
        for gr, ap in zip(grads, apply):
            if ap[c]:
                p.grad = gr[c].clone()
                ref.step()
        torch.testing.assert_close(stacked["w"][c], p.detach(), rtol=1e-5, atol=1e-7)


def test_step_draws_are_reproducible_only_when_injected():
    a, b = NoiseSource(generator=torch.Generator().manual_seed(5)), NoiseSource(generator=torch.Generator().manual_seed(5))
    draws = []
    for src in (a, b):
        gen = step_generator(src)
        draws.append((poisson_batch(src, gen, 20, 0.3), flat_noise(src, gen, 8, std=2.0)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    s = NoiseSource()
    n1 = flat_noise(s, step_generator(s), 64, std=1.0)
    n2 = flat_noise(s, step_generator(s), 64, std=1.0)
    assert not torch.equal(n1, n2), "the secure default draws fresh noise every step"
    assert torch.equal(flat_noise(s, step_generator(s), 4, std=0.0), torch.zeros(4))
    idx = uniform_batch(torch.Generator().manual_seed(0), 10, 4)
    assert len(idx) == 4 and len(set(idx.tolist())) == 4 and idx.tolist() == sorted(idx.tolist())
    assert len(uniform_batch(torch.Generator().manual_seed(0), 3, 8)) == 3
    with pytest.raises(ValueError, match="at least 1"):
        uniform_batch(torch.Generator(), 3, 0)
