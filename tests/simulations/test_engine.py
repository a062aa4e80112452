"""The cohort engine against the sequential Opacus path: same seeds, same tensors, same ledgers."""

from __future__ import annotations

import gc
import tracemalloc
import warnings

import pytest
import torch

from fedpersona.simulations.engine import ClientJob, CohortEngine, Phase, joint_phases, split_phases
from tests.simulations.engine_helpers import (
    examples,
    random_states,
    sequential_joint,
    sequential_split,
    source,
    tiny_adapted,
)

# Three clients with different data sizes; client 2 (batch 1 of 14) draws empty Poisson batches.
SIZES = (5, 9, 14)
BATCHES = (3, 4, 1)
SIGMA, CLIP = 0.8, 0.5


@pytest.fixture
def model(tiny_model_dir):
    return tiny_adapted(tiny_model_dir)


@pytest.fixture
def engine_model(tiny_model_dir):
    """The engine's own copy (the sequential path hooks Opacus into ``model``)."""
    return tiny_adapted(tiny_model_dir)


@pytest.fixture
def clients(model):
    return [(examples(model, n, seed=10 + c), *random_states(model, seed=20 + c)) for c, n in enumerate(SIZES)]


def _close(a: dict, b: dict, what: str, atol=2e-5):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=atol, msg=lambda m: f"{what} {n}: {m}")


@pytest.mark.parametrize("method", ["expanded", "vmap"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_joint_engine_equals_sequential(model, engine_model, clients, optimizer, method):
    steps, lr = 5, 0.01
    seq = []
    for c, (ex, shared, personal) in enumerate(clients):
        seq.append(sequential_joint(model, ex, shared, personal, noise_source=source(100 + c), steps=steps,
                                    batch_size=BATCHES[c], lr=lr, optimizer=optimizer, noise_multiplier=SIGMA,
                                    max_grad_norm=CLIP))
    assert seq[2][3].empty_steps >= 1, "the test needs a client with an empty Poisson batch"
    engine = CohortEngine(engine_model, device="cpu", method=method)
    jobs = [ClientJob(ex, shared, personal, joint_phases(steps=steps, batch_size=BATCHES[c], lr=lr, optimizer=optimizer,
                                                         noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                                         noise_source=source(100 + c)), client_id=f"c{c}")
            for c, (ex, shared, personal) in enumerate(clients)]
    results = engine.train_cohort(jobs)
    for c, (r, (s_shared, s_personal, s_ledger, s_res)) in enumerate(zip(results, seq)):
        assert r.error is None
        _close(r.shared, s_shared, f"client {c} shared")
        _close(r.personal, s_personal, f"client {c} personal")
        assert r.ledger_steps == s_ledger == [(SIGMA, min(1.0, BATCHES[c] / SIZES[c]))] * steps
        assert r.empty_steps == s_res.empty_steps
        assert r.phases[0].examples_seen == s_res.examples_seen
        assert r.phases[0].mean_loss == pytest.approx(s_res.mean_loss, rel=1e-4)
        start_shared = clients[c][1]
        assert all(not torch.equal(r.shared[n], start_shared[n]) for n in r.shared), "every tensor must move"


@pytest.mark.parametrize("method", ["expanded", "vmap"])
@pytest.mark.parametrize("head_dp", [False, True])
def test_split_engine_equals_sequential(model, engine_model, clients, head_dp, method):
    steps, lr, head_steps, head_batch, head_lr = 4, 0.01, 3, 2, 0.02
    seq = []
    for c, (ex, shared, personal) in enumerate(clients):
        seq.append(sequential_split(model, ex, shared, personal, noise_source=source(200 + c), steps=steps,
                                    batch_size=BATCHES[c], lr=lr, optimizer="adam", noise_multiplier=SIGMA,
                                    max_grad_norm=CLIP, head_steps=head_steps, head_batch=head_batch,
                                    head_lr=head_lr, head_dp=head_dp, head_source=source(300 + c),
                                    head_sigma=0.6, head_clip=2.0))
    engine = CohortEngine(engine_model, device="cpu", method=method)
    jobs = [ClientJob(ex, shared, personal,
                      split_phases(steps=steps, batch_size=BATCHES[c], lr=lr, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                   noise_source=source(200 + c), head_steps=head_steps, head_batch_size=head_batch,
                                   head_lr=head_lr, head_dp=head_dp, head_noise_multiplier=0.6, head_max_grad_norm=2.0,
                                   head_noise_source=source(300 + c)))
            for c, (ex, shared, personal) in enumerate(clients)]
    results = engine.train_cohort(jobs)
    for c, (r, (s_shared, s_personal, s_ledger)) in enumerate(zip(results, seq)):
        _close(r.shared, s_shared, f"client {c} shared")
        _close(r.personal, s_personal, f"client {c} personal")
        assert r.ledger_steps == s_ledger
        assert len(r.ledger_steps) == steps + (head_steps if head_dp else 0)
        assert all(not torch.equal(r.personal[n], clients[c][2][n]) for n in r.personal), "the head must train"


def test_shared_phase_never_depends_on_the_head(model, engine_model, clients):
    """Phase 1 with the head off: two very different heads give the same shared release."""
    ex, shared, personal = clients[1]
    engine = CohortEngine(engine_model, device="cpu")
    other = {n: t * -3.0 + 0.5 for n, t in personal.items()}
    out = []
    for head in (personal, other):
        phases = split_phases(steps=3, batch_size=4, lr=0.01, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                              noise_source=source(7), head_steps=1)
        out.append(engine.train_cohort([ClientJob(ex, shared, head, phases)])[0])
    for n in shared:
        torch.testing.assert_close(out[0].shared[n], out[1].shared[n], rtol=0, atol=0)
    assert any(not torch.equal(out[0].personal[n], out[1].personal[n]) for n in personal)


def test_cohort_order_does_not_matter(model, engine_model, clients):
    """A client's result depends only on its own job (steps too), not on who else is in the cohort."""
    engine = CohortEngine(engine_model, device="cpu")

    def job(c, steps=3):
        ex, shared, personal = clients[c]
        return ClientJob(ex, shared, personal, joint_phases(steps=steps, batch_size=BATCHES[c], lr=0.01,
                                                            noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                                            noise_source=source(50 + c)))

    together = engine.train_cohort([job(2), job(1, steps=2), job(0)])
    alone = engine.train_cohort([job(1, steps=2)])[0]
    _close(together[1].shared, alone.shared, "shared")
    _close(together[1].personal, alone.personal, "personal")
    assert len(together[1].ledger_steps) == 2 and len(together[0].ledger_steps) == 3


def test_non_finite_client_is_discarded_alone(model, engine_model, clients):
    engine = CohortEngine(engine_model, device="cpu")
    ex, shared, personal = clients[0]
    huge = joint_phases(steps=2, batch_size=3, lr=1e38, optimizer="sgd", noise_multiplier=1e3, max_grad_norm=1e3,
                        noise_source=source(3))
    fine = joint_phases(steps=2, batch_size=3, lr=0.01, optimizer="sgd", noise_multiplier=SIGMA, max_grad_norm=CLIP,
                        noise_source=source(4))
    bad, good = engine.train_cohort([ClientJob(ex, shared, personal, huge), ClientJob(ex, shared, personal, fine)])
    assert bad.error and "non-finite" in bad.error
    assert all(torch.equal(bad.shared[n], shared[n]) for n in shared), "a failed client's update is discarded"
    assert len(bad.ledger_steps) >= 1, "steps taken still count"
    assert good.error is None and all(torch.isfinite(good.shared[n]).all() for n in shared)


def test_bad_jobs_are_refused(model, engine_model, clients):
    engine = CohortEngine(engine_model, device="cpu")
    ex, shared, personal = clients[0]
    shared_src = source(1)
    p = joint_phases(steps=1, batch_size=2, lr=0.1, noise_multiplier=1.0, noise_source=shared_src)
    with pytest.raises(ValueError, match="share one seeded NoiseSource"):
        engine.train_cohort([ClientJob(ex, shared, personal, p), ClientJob(ex, shared, personal, p)])
    with pytest.raises(ValueError, match="same kind of phases"):
        engine.train_cohort([ClientJob(ex, shared, personal, p),
                             ClientJob(ex, shared, personal, split_phases(steps=1, batch_size=2, lr=0.1, head_steps=1,
                                                                          noise_source=source(2)))])
    with pytest.raises(ValueError, match="does not match the adapter layout"):
        engine.train_cohort([ClientJob(ex, {}, personal, p)])
    with pytest.raises(ValueError, match="Poisson"):
        Phase("joint", 1, 2, 0.1, dp=True, sampling="uniform")
    with pytest.raises(ValueError, match="model.device"):
        CohortEngine(engine_model, device="tpu")
    from fedpersona.client.train import trainer_for

    trainer_for(model)  # Opacus hooks on the sequential model
    with pytest.raises(ValueError, match="hooks"):
        CohortEngine(model, device="cpu")


def test_no_memory_growth_over_ten_rounds(model, engine_model, clients):
    engine = CohortEngine(engine_model, device="cpu")
    packed = [engine.pack(ex) for ex, _, _ in clients]
    states = [(shared, personal) for _, shared, personal in clients]

    def one_round(r):
        jobs = [ClientJob(packed[c], *states[c], split_phases(steps=2, batch_size=BATCHES[c], lr=0.01,
                                                              noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                                              noise_source=source(1000 * r + c), head_steps=2))
                for c in range(len(clients))]
        for c, res in enumerate(engine.train_cohort(jobs)):
            states[c] = (res.shared, res.personal)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() touches deprecated torch attributes
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    one_round(0)
    one_round(1)
    tensors_before = live_tensors()
    tracemalloc.start()
    try:
        one_round(2)
        base, _ = tracemalloc.get_traced_memory()
        for r in range(3, 11):
            one_round(r)
        gc.collect()
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert now - base < 256 * 1024, f"Python memory grew by {now - base} bytes over 8 rounds"
    assert live_tensors() <= tensors_before, "tensors accumulate across rounds"
