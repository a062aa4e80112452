"""Cost of secure aggregation against plain quantized aggregation, measured side by side in one run.

    python -m fedpersona.simulations.bench.secagg --clients 10 50 100 200 --params 500000 5000000
    python -m fedpersona.simulations.bench.secagg --quick              # 10 and 50 clients, 0.5M params (~1 min)
    python -m fedpersona.simulations.bench.secagg --ddp-only --params 5000000   # discrete Gaussian sampler speed

For each (clients n, parameters d) it runs the whole protocol in process
(:func:`fedpersona.privacy.secagg.run_secure_sum`: key advertisement excluded; masked input, consistency
check and unmask included; every client with an identity under one root and checking its
neighbours' and the signers' keys against it, with its signature cache emptied before each of its
steps, as a device that verifies everything itself) and, on the same updates, plain aggregation of the same quantized vectors (each
client quantizes, maps to Z_2^b and packs at b bits; the server unpacks, adds and decodes). It prints per client the
CPU seconds (mean over clients), the server's CPU seconds, the bytes a client sends (both
stages) and receives, the bytes of the quantized update (b-bit packed, as both send it; the
float32 update for reference), and the secure / plain ratios. Optional: drop a fraction of the
clients at each stage (``--drop``), add distributed DP noise (``--noise-stddev``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Mapping

import numpy as np

from fedpersona.identity import IdentityRoot, verify
from fedpersona.privacy.secagg import (ExtraSpec, SecAggClient, SecAggParams, SecAggStats, SecureRNG, run_secure_sum,
                            sample_discrete_gaussian)
from fedpersona.privacy.secagg.quantize import pack_bits, unpack_bits

EXTRAS = (ExtraSpec("num_examples", bound=100_000, scale=1.0), ExtraSpec("train_loss", bound=100.0, scale=1e4))


class _Updates(Mapping):
    """Client updates made on demand (a roll of one random vector), so 200 x 5M floats never sit in memory."""

    def __init__(self, ids, d, seed=0):
        self.ids = list(ids)
        self.base = (np.random.default_rng(seed).normal(size=d) / math.sqrt(d)).astype(np.float32)

    def __getitem__(self, c):
        return np.roll(self.base, 7919 * (self.ids.index(c) + 1)) * np.float32(0.5 + (c % 7) / 10)

    def __iter__(self):
        return iter(self.ids)

    def __len__(self):
        return len(self.ids)


class _ColdClient(SecAggClient):
    """A client whose signature checks start from an empty cache at each step (a device alone, not a simulation)."""

    def masked_input(self, *args, **kwargs):
        verify.cache_clear()
        return super().masked_input(*args, **kwargs)

    def consistency(self, *args, **kwargs):
        verify.cache_clear()
        return super().consistency(*args, **kwargs)

    def unmask(self, *args, **kwargs):
        verify.cache_clear()
        return super().unmask(*args, **kwargs)


def plain_aggregation(updates, extras, cfg, rng) -> dict:
    """Quantize, pack at b bits, unpack + sum without masks: per-client and server CPU seconds, bytes sent."""
    q = cfg.quantizer
    client_s = []
    acc = None
    server_s = 0.0
    for c in updates:
        u = updates[c]
        t0 = time.process_time()
        packed = pack_bits(q.encode(u, extras[c], rng), q.bits)
        client_s.append(time.process_time() - t0)
        t0 = time.process_time()
        vec = unpack_bits(packed, q.bits, u.size + len(cfg.extras))
        if acc is None:
            acc = np.zeros(vec.size, dtype=np.uint64)
        np.add(acc, vec, out=acc)
        server_s += time.process_time() - t0
    t0 = time.process_time()
    acc &= np.uint64((1 << q.bits) - 1)
    q.decode_sum(acc, acc.size - len(cfg.extras))
    server_s += time.process_time() - t0
    return {"client_s": statistics.mean(client_s), "server_s": server_s, "bytes_up": int(packed.size)}


def bench_one(n: int, d: int, *, max_cohort: int, drop: float, noise_stddev: float, seed: int = 0) -> dict:
    cfg = SecAggParams(clip_norm=1.0, scale=2.0**20, max_cohort=max_cohort, extras=EXTRAS, noise_stddev=noise_stddev)
    ids = list(range(1000, 1000 + n))
    ups = _Updates(ids, d, seed)
    extras = {c: {"num_examples": 50 + i, "train_loss": 2.0 + i / n} for i, c in enumerate(ids)}
    ndrop = int(round(drop * n))
    order = np.random.default_rng(seed).permutation(ids).tolist()
    d1, d2 = order[:ndrop], order[ndrop:2 * ndrop]
    rng = SecureRNG(b"bench%d" % seed)

    plain = plain_aggregation(ups, extras, cfg, SecureRNG(b"plain"))
    root = IdentityRoot()
    clients = {c: _ColdClient(c, cfg, rng=SecureRNG(rng.bytes(32)), identity=root.issue()) for c in ids}
    st = SecAggStats()
    t0 = time.perf_counter()
    res = run_secure_sum(ups, cfg, extras=extras, drop_before_masking=d1, drop_before_unmasking=d2, rng=rng, stats=st,
                         clients=clients)
    wall = time.perf_counter() - t0
    exp_ex = sum(extras[c]["num_examples"] for c in ids if c not in d1)
    assert res.extras["num_examples"] == exp_ex, "wrong sum"
    k, t, _ = cfg.round_params(n)
    senders = [c for c in ids if c not in d1]
    client_s = statistics.mean(st.client_seconds[c] for c in senders)
    up = statistics.mean(st.bytes_up[c] for c in senders)
    down = statistics.mean(st.bytes_down[c] for c in ids)
    width = d + len(cfg.extras)
    return {"clients": n, "params": d, "degree": k, "threshold": t, "modulus_bits": cfg.modulus_bits,
            "dropped_stage1": len(d1), "dropped_stage2": len(d2), "noise_stddev": noise_stddev,
            "client_cpu_s": client_s, "server_cpu_s": st.server_seconds, "wall_s": wall,
            "bytes_up_per_client": up, "bytes_down_per_client": down,
            "float32_update_bytes": 4 * d, "quantized_bytes_packed": math.ceil(width * cfg.modulus_bits / 8),
            "plain_client_cpu_s": plain["client_s"], "plain_server_cpu_s": plain["server_s"],
            "plain_bytes_up": plain["bytes_up"],
            "ratio_client_cpu": client_s / plain["client_s"], "ratio_server_cpu": st.server_seconds / plain["server_s"],
            "ratio_bytes_up": up / plain["bytes_up"]}


def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000:
            return f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}TB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 200])
    p.add_argument("--params", type=int, nargs="+", default=[500_000, 5_000_000])
    p.add_argument("--quick", action="store_true", help="10 and 50 clients, 0.5M params")
    p.add_argument("--drop", type=float, default=0.0, help="fraction of clients dropped at EACH stage")
    p.add_argument("--noise-stddev", type=float, default=0.0, help="per-client discrete Gaussian stddev (quantized)")
    p.add_argument("--ddp-only", action="store_true", help="only time the discrete Gaussian sampler")
    p.add_argument("--json", help="also write the rows as JSON lines to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.params = [10, 50], [500_000]
    if a.ddp_only:
        for d in a.params:
            for sigma in (1.0, 10.0, 1000.0):
                t0 = time.perf_counter()
                sample_discrete_gaussian(sigma, d, SecureRNG())
                print(f"discrete Gaussian, sigma={sigma:g}, {d:,} coordinates: {time.perf_counter() - t0:.2f} s")
        return 0
    rows = []
    print(f"{'n':>4} {'params':>9} {'k':>3} {'t':>3} {'b':>3} | {'client s':>8} {'plain':>7} {'x':>5} | "
          f"{'server s':>8} {'plain':>7} {'x':>6} | {'up/client':>9} {'down':>8} {'float32':>8} {'b-bit':>8} {'x':>5}")
    for d in a.params:
        for n in a.clients:
            r = bench_one(n, d, max_cohort=max(a.clients), drop=a.drop, noise_stddev=a.noise_stddev)
            rows.append(r)
            print(f"{n:>4} {d:>9,} {r['degree']:>3} {r['threshold']:>3} {r['modulus_bits']:>3} | "
                  f"{r['client_cpu_s']:>8.3f} {r['plain_client_cpu_s']:>7.3f} {r['ratio_client_cpu']:>5.1f} | "
                  f"{r['server_cpu_s']:>8.3f} {r['plain_server_cpu_s']:>7.3f} {r['ratio_server_cpu']:>6.1f} | "
                  f"{_fmt_bytes(r['bytes_up_per_client']):>9} {_fmt_bytes(r['bytes_down_per_client']):>8} "
                  f"{_fmt_bytes(r['float32_update_bytes']):>8} {_fmt_bytes(r['quantized_bytes_packed']):>8} "
                  f"{r['ratio_bytes_up']:>5.3f}", flush=True)
    print("client s: mean CPU seconds per client over the three stages; server s: CPU seconds for the round; "
          "x: secure / plain; up/client: bytes a client sends (all stages); float32: the plain float update, "
          "for reference; b-bit: the quantized update packed at b bits per coordinate (plain sends this).")
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
