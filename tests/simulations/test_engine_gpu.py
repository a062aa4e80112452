"""The cohort engine on CUDA: the same result as on the CPU (float32), bfloat16 close to it, no memory growth."""

from __future__ import annotations

import pytest
import torch

from fedpersona.simulations.engine import ClientJob, CohortEngine, joint_phases, split_phases
from tests.simulations.engine_helpers import examples, random_states, source, tiny_adapted

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZES, BATCHES = (5, 9, 14), (3, 4, 1)


def _jobs(clients, seed, split=False):
    out = []
    for c, (ex, shared, personal) in enumerate(clients):
        if split:
            phases = split_phases(steps=4, batch_size=BATCHES[c], lr=0.01, noise_multiplier=0.8, max_grad_norm=0.5,
                                  noise_source=source(seed + c), head_steps=2)
        else:
            phases = joint_phases(steps=4, batch_size=BATCHES[c], lr=0.01, noise_multiplier=0.8, max_grad_norm=0.5,
                                  noise_source=source(seed + c))
        out.append(ClientJob(ex, shared, personal, phases))
    return out


@pytest.fixture
def clients(tiny_model_dir):
    m = tiny_adapted(tiny_model_dir)
    return [(examples(m, n, seed=10 + c), *random_states(m, seed=20 + c)) for c, n in enumerate(SIZES)]


@pytest.mark.parametrize("method", ["expanded", "vmap"])
@pytest.mark.parametrize("split", [False, True])
def test_cuda_float32_equals_cpu(tiny_model_dir, clients, method, split):
    cpu = CohortEngine(tiny_adapted(tiny_model_dir), device="cpu", method=method).train_cohort(_jobs(clients, 5, split))
    gpu_engine = CohortEngine(tiny_adapted(tiny_model_dir), device="cuda", method=method)
    assert next(gpu_engine.model.peft.parameters()).is_cuda
    gpu = gpu_engine.train_cohort(_jobs(clients, 5, split))
    for a, b in zip(cpu, gpu):
        assert b.error is None and b.ledger_steps == a.ledger_steps
        for n in a.shared:
            assert b.shared[n].device.type == "cpu"
            torch.testing.assert_close(b.shared[n], a.shared[n], rtol=1e-3, atol=1e-4)
        for n in a.personal:
            torch.testing.assert_close(b.personal[n], a.personal[n], rtol=1e-3, atol=1e-4)


def test_cuda_bfloat16_base_keeps_float32_adapters(tiny_model_dir, clients):
    engine = CohortEngine(tiny_adapted(tiny_model_dir), device="cuda", dtype="bfloat16")
    dtypes = {("lora_" in n): p.dtype for n, p in engine.model.peft.named_parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    ref = CohortEngine(tiny_adapted(tiny_model_dir), device="cpu").train_cohort(_jobs(clients, 9))
    out = engine.train_cohort(_jobs(clients, 9))
    for a, b in zip(ref, out):
        for n in a.shared:
            assert b.shared[n].dtype == torch.float32 and torch.isfinite(b.shared[n]).all()
            # bf16 rounding of the base's activations: close, not equal.
            assert (b.shared[n] - a.shared[n]).norm() <= 0.1 * a.shared[n].norm() + 1e-3


def test_cuda_memory_does_not_grow_over_rounds(tiny_model_dir, clients):
    engine = CohortEngine(tiny_adapted(tiny_model_dir), device="cuda")
    packed = [engine.pack(ex) for ex, _, _ in clients]
    states = [(s, p) for _, s, p in clients]
    peaks = []
    for r in range(10):
        torch.cuda.reset_peak_memory_stats()
        jobs = [ClientJob(packed[c], *states[c], split_phases(steps=2, batch_size=BATCHES[c], lr=0.01,
                                                              noise_multiplier=0.8, noise_source=source(100 * r + c),
                                                              head_steps=2))
                for c in range(len(clients))]
        for c, res in enumerate(engine.train_cohort(jobs)):
            states[c] = (res.shared, res.personal)
        torch.cuda.synchronize()
        peaks.append((torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
    assert peaks[-1][0] <= peaks[1][0] + 64 * 1024, f"allocated memory grew: {peaks}"
    assert peaks[-1][1] <= max(p for _, p in peaks[:3]) * 1.10 + 1024 * 1024, f"peak memory grew: {peaks}"
