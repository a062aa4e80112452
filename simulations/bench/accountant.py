"""What the privacy accounting costs: Opacus's RDP epsilon at all 151 orders vs at the orders that can decide it.

The ledger's RDP epsilon (:func:`fedpersona.privacy.ledger._rdp_epsilon`) computes a history's RDP only at the
orders whose lower bound can beat the best epsilon found (RDP never decreases with the order), and the noise
calibration's search does the same with its guide. This bench measures both side by side in one process, on
random histories and random budgets, and checks that the numbers are the same:

* epsilon: Opacus's ``RDPAccountant.get_epsilon`` (every order) against the ledger's, each from cold caches;
* calibration: :func:`~fedpersona.privacy.ledger.calibrate_noise` with every order computed (the search as it was)
  against the orders that can decide, alternated budget by budget, from cold caches; the sigmas must be identical.

    python -m fedpersona.simulations.bench.accountant --histories 200 --calibrations 40
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np


def random_histories(n: int, seed: int) -> list[tuple[tuple[tuple[float, float, int], ...], float]]:
    """(history, delta) pairs: one to three (sigma, q, steps) entries, sigma 0.2-32, q 1e-3-1, 1-3,000 steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        history = tuple((float(round(10 ** rng.uniform(-0.7, 1.5), 4)), float(round(min(1.0, 10 ** rng.uniform(-3, 0)), 5)),
                         int(rng.integers(1, 3000))) for _ in range(int(rng.integers(1, 4))))
        out.append((history, float(10 ** rng.uniform(-7, -1))))
    return out


def random_budgets(n: int, seed: int) -> list[tuple[float, float, float, int]]:
    """(target epsilon 1-8, delta 1e-5-1e-2, sample rate 8 of 5-300 examples, 4-40 steps): a simulation's devices."""
    rng = np.random.default_rng(seed)
    return [(float(rng.uniform(1, 8)), float(10 ** rng.uniform(-5, -2)), min(1.0, 8 / int(rng.integers(5, 301))),
             int(rng.integers(4, 41))) for _ in range(n)]


def _cold(ledger) -> None:
    ledger._SOLVED.clear()
    ledger._calibrated.cache_clear()
    ledger._step_rdp.cache_clear()
    ledger._epsilon_memo.cache_clear()


def _every_order(rdp_at, delta: float) -> np.ndarray:
    """The reference: the RDP at all of Opacus's orders (what the accounting computed before)."""
    from fedpersona.privacy import ledger

    return np.asarray(rdp_at(list(range(len(ledger._ALPHAS)))), dtype=np.float64)


def bench(histories: int = 200, calibrations: int = 40, seed: int = 0) -> dict:
    from opacus.accountants import RDPAccountant

    from fedpersona.privacy import ledger

    orders = {"n": 0}
    real = ledger.rdp_analysis.compute_rdp

    def counting(**kw):
        orders["n"] += len(kw["orders"])
        return real(**kw)

    out: dict = {"histories": histories, "calibrations": calibrations, "seed": seed}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # ---- epsilon of a history
        t_opacus = t_ours = 0.0
        mismatches, computed = 0, []
        for history, delta in random_histories(histories, seed):
            acc = RDPAccountant()
            acc.history = list(history)
            t0 = time.perf_counter()
            theirs = float(acc.get_epsilon(delta=delta))
            t_opacus += time.perf_counter() - t0
            _cold(ledger)
            t0 = time.perf_counter()
            ours = ledger._rdp_epsilon(history, delta)
            t_ours += time.perf_counter() - t0
            computed.append(max(int(ledger._step_rdp(s, q).known.sum()) for s, q, _ in history))
            mismatches += not (ours == theirs or (math.isinf(ours) and math.isinf(theirs)))
        out["epsilon"] = {"opacus_s": t_opacus, "ledger_s": t_ours, "ratio": t_opacus / t_ours,
                          "mismatches": mismatches, "orders_median": float(np.median(computed)),
                          "orders_max": int(max(computed)), "orders_all": len(ledger._ALPHAS)}
        # ---- noise calibration, alternated budget by budget
        deciding = ledger._least_epsilon
        times = {"every": 0.0, "deciding": 0.0}
        counts = {"every": 0, "deciding": 0}
        differ = 0
        ledger.rdp_analysis.compute_rdp = counting
        try:
            for target, delta, q, steps in random_budgets(calibrations, seed + 1):
                sigmas = {}
                for mode, fn in (("every", _every_order), ("deciding", deciding)):
                    ledger._least_epsilon = fn
                    _cold(ledger)
                    orders["n"] = 0
                    t0 = time.perf_counter()
                    sigmas[mode] = ledger.calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
                    times[mode] += time.perf_counter() - t0
                    counts[mode] += orders["n"]
                differ += sigmas["every"] != sigmas["deciding"]
        finally:
            ledger._least_epsilon = deciding
            ledger.rdp_analysis.compute_rdp = real
            _cold(ledger)
        out["calibration"] = {"every_order_s": times["every"], "deciding_orders_s": times["deciding"],
                              "ratio": times["every"] / times["deciding"], "sigmas_differ": differ,
                              "opacus_orders_every": counts["every"] / calibrations,
                              "opacus_orders_deciding": counts["deciding"] / calibrations}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--histories", type=int, default=200, help="random histories for the epsilon (default 200)")
    p.add_argument("--calibrations", type=int, default=40, help="random budgets to calibrate (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    args = p.parse_args(argv)
    if args.histories < 1 or args.calibrations < 1:
        p.error("--histories and --calibrations must be >= 1")
    r = bench(args.histories, args.calibrations, args.seed)
    e, c = r["epsilon"], r["calibration"]
    print(f"epsilon of {args.histories} random histories: Opacus (all {e['orders_all']} orders) {e['opacus_s']:.2f} s, "
          f"the ledger {e['ledger_s']:.2f} s: {e['ratio']:.2f}x; orders computed: median {e['orders_median']:.0f}, "
          f"max {e['orders_max']}; different epsilons: {e['mismatches']}")
    print(f"calibration of {args.calibrations} random budgets: every order {c['every_order_s']:.2f} s, the orders that "
          f"can decide {c['deciding_orders_s']:.2f} s: {c['ratio']:.2f}x; Opacus orders per calibration "
          f"{c['opacus_orders_every']:.0f} -> {c['opacus_orders_deciding']:.0f}; different sigmas: {c['sigmas_differ']}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 1 if e["mismatches"] or c["sigmas_differ"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
