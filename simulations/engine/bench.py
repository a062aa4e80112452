"""``fedpersona bench engine``: the cohort engine against the sequential Opacus path, side by side.

Both paths train the same clients (random-weight Llama of a preset's shape, random
token sequences, every example ``seq`` tokens long) for the same steps, with DP on
and with DP off, in one run:

* sequential: one client at a time through ``fedpersona.client.train.DPTrainer`` (Opacus hooks,
  the device path of today), on its own copy of the model;
* engine: :class:`fedpersona.simulations.engine.CohortEngine` on the whole cohort at once.

Presets: ``quick`` (tiny model on the CPU, 16 clients, about a minute on 2 cores),
``demo`` (SmolLM2-135M's shape with the demo's adapters on the CPU), ``anchor``
(SmolLM2-135M's shape, LoRA r=8 on every linear layer of all 30 blocks, seq 128,
bfloat16 on CUDA, cohorts 8 / 32 / 64). Trained tokens are the positions of the
examples in the Poisson batches (batch x seq per step on average).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import resource
import time
import types
import warnings
from dataclasses import dataclass, replace

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    adapter_layers: int
    personal_layers: int
    split: str
    rank: int
    targets: tuple[str, ...]
    seq: int
    cohorts: tuple[int, ...]
    examples: int
    batch: int
    steps: int
    device: str
    dtype: str
    sequential_clients: int  # clients timed on the sequential path (its per-client rate does not depend on the cohort)
    token_budget: int | None = None


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {
    "quick": Preset("quick", hidden=32, layers=4, heads=4, kv_heads=2, intermediate=64, vocab=400, adapter_layers=2,
                    personal_layers=1, split="ffa", rank=4, targets=ALL_LINEAR, seq=32, cohorts=(16,), examples=24,
                    batch=8, steps=4, device="cpu", dtype="float32", sequential_clients=16),
    "demo": Preset("demo", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, adapter_layers=4,
                   personal_layers=2, split="ffa", rank=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"), seq=64,
                   cohorts=(8,), examples=36, batch=8, steps=2, device="cpu", dtype="float32", sequential_clients=8),
    "anchor": Preset("anchor", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                     adapter_layers=30, personal_layers=1, split="fedsa", rank=8, targets=ALL_LINEAR, seq=128,
                     cohorts=(8, 32, 64), examples=96, batch=32, steps=3, device="cuda", dtype="bfloat16",
                     sequential_clients=8),
}


def _adapted(p: Preset, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpersona.config import AdapterConfig
    from fedpersona.devices import place_model
    from fedpersona.model import AdaptedModel

    cfg = LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                      max_position_embeddings=max(256, p.seq), tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.requires_grad_(False)
    base.eval()
    adapter = AdapterConfig(split=p.split, rank=p.rank, alpha=2.0 * p.rank, layers=p.adapter_layers,
                            personal_layers=p.personal_layers, targets=p.targets)
    model = AdaptedModel(base, types.SimpleNamespace(pad_token_id=0), adapter, seed=0)
    place_model(model.peft, device=device, dtype=dtype)
    return model


def _clients(model, p: Preset, count: int):
    """``count`` clients with 0.5x .. 1.5x the preset's examples, cue = the first third of each sequence."""
    from fedpersona.client.train import CachedExample
    from fedpersona.model import labels_for, lower_hidden

    gen = torch.Generator().manual_seed(1)
    out = []
    for c in range(count):
        n = max(2, int(p.examples * (0.5 + c / max(1, count - 1))))
        seqs = [torch.randint(3, p.vocab, (p.seq,), generator=gen).tolist() for _ in range(n)]
        mask = [i >= p.seq // 3 for i in range(p.seq)]
        hidden = lower_hidden(model, seqs, batch_size=64)
        out.append([CachedExample(h, tuple(labels_for(s, mask))) for h, s in zip(hidden, seqs)])
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS*"


def _sequential(model, clients, p: Preset, *, dp: bool, device, dtype, steps: int) -> dict:
    from fedpersona.client.train import trainer_for
    from fedpersona.devices import autocast

    trainer = trainer_for(model)
    shared0, personal0 = model.initial_shared_state(), model.fresh_personal_state()
    seen = 0
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        for ex in clients:
            model.load_shared_state(shared0)
            model.load_personal_state(personal0)
            with autocast(device, dtype):
                r = trainer.train(ex, steps=steps, batch_size=p.batch, lr=1e-3, optimizer="adam", noise_multiplier=1.0,
                                  max_grad_norm=1.0, dp=dp, noise_source=_secure())
            seen += r.examples_seen
    _sync(device)
    wall = time.perf_counter() - t0
    return {"wall": wall, "tokens": seen * p.seq, "clients": len(clients), "peak": _peak(device), "compute": None}


def _secure():
    from fedpersona.privacy.noise import NoiseSource

    return NoiseSource()


def _engine(engine, packed, model, p: Preset, *, dp: bool, device, steps: int) -> dict:
    from fedpersona.simulations.engine import ClientJob, joint_phases

    shared0, personal0 = model.initial_shared_state(), model.fresh_personal_state()
    jobs = [ClientJob(pk, shared0, personal0, joint_phases(steps=steps, batch_size=p.batch, lr=1e-3, dp=dp,
                                                          noise_multiplier=1.0, max_grad_norm=1.0,
                                                          noise_source=_secure()))
            for pk in packed]
    engine.compute_seconds = 0.0
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    results = engine.train_cohort(jobs)
    _sync(device)
    wall = time.perf_counter() - t0
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"engine: {len(errors)} client(s) failed: {errors[0]}")
    seen = sum(r.phases[0].examples_seen for r in results)
    return {"wall": wall, "tokens": seen * p.seq, "clients": len(packed), "peak": _peak(device),
            "compute": engine.compute_seconds}


def versions(device: torch.device) -> str:
    import peft
    import transformers

    try:
        import opacus

        op = opacus.__version__
    except ImportError:
        op = "absent"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return (f"device {where}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, opacus {op}, python {platform.python_version()}")


def run(preset: str | Preset = "quick", *, cohorts: tuple[int, ...] | None = None, steps: int | None = None,
        methods: tuple[str, ...] = ("expanded", "vmap"), out=print) -> dict:
    """Measure and print the table; returns the figures (the last line printed is the speedup)."""
    from fedpersona.devices import resolve_device, resolve_dtype
    from fedpersona.simulations.engine import CohortEngine

    if isinstance(preset, Preset):
        p, preset = preset, preset.name
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ValueError(f"bench engine: preset must be one of {tuple(PRESETS)}. You passed: {preset!r}")
    if cohorts:
        p = replace(p, cohorts=tuple(cohorts))
    if steps:
        p = replace(p, steps=steps)
    device, dtype = resolve_device(p.device), resolve_dtype(p.dtype)
    t_setup = time.perf_counter()
    seq_model = _adapted(p, device, dtype)
    eng_model = _adapted(p, device, dtype)
    largest = max(p.cohorts)
    clients = _clients(seq_model, p, max(largest, p.sequential_clients))
    engines = {m: CohortEngine(eng_model, device=device, dtype=dtype, token_budget=p.token_budget, method=m)
               for m in methods}
    for e in engines.values():
        e.profile = True
    packed = [engines[methods[0]].pack(ex) for ex in clients]
    counts = eng_model.parameter_counts()
    logger.info("bench engine %s: set up in %.1f s", preset, time.perf_counter() - t_setup)
    # Warm-up (kernels, allocator, Opacus hooks): one step on two clients, both paths, both modes.
    seq_error = None
    for dp in (True, False):
        try:
            _sequential(seq_model, clients[:2], p, dp=dp, device=device, dtype=dtype, steps=1)
        except Exception as exc:  # reported in the table; the engine is still measured
            seq_error = f"{type(exc).__name__}: {exc}"
        for e in engines.values():
            _engine(e, packed[:2], eng_model, p, dp=dp, device=device, steps=1)
    seq_clients = clients[: p.sequential_clients]
    seq = None
    if seq_error is None:
        seq = {dp: _sequential(seq_model, seq_clients, p, dp=dp, device=device, dtype=dtype, steps=p.steps)
               for dp in (True, False)}
    eng = {(c, m): {dp: _engine(engines[m], packed[:c], eng_model, p, dp=dp, device=device, steps=p.steps)
                    for dp in (True, False)}
           for c in p.cohorts for m in methods}

    def tps(r):
        return r["tokens"] / r["wall"]

    def per_hour(r):
        return 3600.0 * r["clients"] / r["wall"]

    labels = {"expanded": "expanded per-sample adapters, one backward", "vmap": "torch.func vmap(grad)"}
    rows = []
    if seq is not None:
        rows.append(("sequential (Opacus hooks, one client at a time)", p.sequential_clients, seq[True], seq[False]))
    for c in p.cohorts:
        for m in methods:
            rows.append((f"engine, {labels[m]}", c, eng[(c, m)][True], eng[(c, m)][False]))
    out(f"bench engine --preset {preset}: engine speedup = engine (first method, largest cohort) over sequential, "
        f"DP tokens/s; {p.steps} steps per client, expected batch {p.batch} x {p.seq} tokens, "
        f"LoRA r={p.rank} on {len(p.targets)} linear layers of the top {p.adapter_layers} of {p.layers} blocks "
        f"({counts['shared'] + counts['personal']:,} trained parameters, joint DP-SGD), base {p.dtype}")
    out(versions(device))
    out("")
    out("| path | clients | DP tokens/s | non-DP tokens/s | DP / non-DP time | round wall / compute | peak memory (DP) "
        "| client updates per hour (DP; 64 of 1,000 users a round) |")
    out("|---|---|---|---|---|---|---|---|")
    for name, c, d, nd in rows:
        ratio = tps(nd) / tps(d)
        comp = f"{d['wall'] / d['compute']:.2f}" if d["compute"] else "-"
        out(f"| {name} | {c} | {tps(d):,.0f} | {tps(nd):,.0f} | {ratio:.2f}x | {comp} | {d['peak']} | {per_hour(d):,.0f} |")
    out("")
    if device.type != "cuda":
        out("* process peak resident memory so far (CPU).")
    if seq is None:
        out(f"sequential path failed: {seq_error}")
        out("engine speedup: n/a (no sequential figure)")
        return {"preset": preset, "sequential": None, "engine": eng, "speedup": None}
    speedups = {key: tps(eng[key][True]) / tps(seq[True]) for key in eng}
    for key in eng:
        if key != (p.cohorts[-1], methods[0]):
            out(f"engine speedup at {key[0]} clients ({key[1]}): {speedups[key]:.2f}x")
    out(f"engine speedup: {speedups[(p.cohorts[-1], methods[0])]:.2f}x")
    return {"preset": preset, "sequential": seq, "engine": eng, "speedup": speedups}


@contextlib.contextmanager
def _quiet():
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        logging.getLogger().setLevel(prev)


def main(*, quick: bool = False, preset: str | None = None, cohorts: tuple[int, ...] | None = None,
         steps: int | None = None, methods: tuple[str, ...] | None = None) -> int:
    name = "quick" if quick else (preset or ("anchor" if torch.cuda.is_available() else "demo"))
    with _quiet():
        run(name, cohorts=cohorts, steps=steps, methods=methods or ("expanded", "vmap"))
    return 0
