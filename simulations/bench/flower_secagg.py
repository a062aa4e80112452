"""Our SecAgg+ (over the Message API) vs Flower's own SecAgg+ workflow, same vectors, same engine, side by side.

    python -m fedpersona.simulations.bench.flower_secagg                        # 10 and 50 clients, 0.5M params, 3 rounds
    python -m fedpersona.simulations.bench.flower_secagg --clients 10 --params 100000 --rounds 2   # quick check

Both run in Flower's Simulation Engine (``flwr.simulation.run_simulation``, Ray, one CPU per
ClientApp), with the same client vectors (a fixed random vector of norm 0.5 per client), the
same cohort (every node, every round) and the same graph: Flower's ``num_shares`` = our
degree k + 1, its ``reconstruction_threshold`` = our t.

* **Flower**: the legacy stack, as Flower ships it: ``DefaultWorkflow(fit_workflow=
  SecAggPlusWorkflow(...))`` with a ``LegacyContext`` and ``FedAvg`` on the server; a
  ``NumPyClient`` whose ``fit`` returns the vector, behind ``secaggplus_mod``. 4 exchanges per
  round (setup, share keys, collect masked vectors, unmask).
* **Ours**: :class:`fedpersona.server.secagg.SecureAggregator` (the code the fedpersona ServerApp runs)
  and a ClientApp that answers ``query.advertise`` / ``train`` / ``query.unmask`` with
  :class:`fedpersona.privacy.secagg.SecAggClient`, its long-term keys kept in the node's
  ``context.state``. 2 exchanges per round plus the key advertisement in round 1.

A round is timed on the server from the first message to the unmasked sum (Flower: one call
of the fit workflow; ours: one ``collect``). Both results are checked against the true mean
and the failure counts (a misconfigured Flower SecAgg+ fails every client silently).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time

import numpy as np

SETTINGS_ENV = "FEDPERSONA_BENCH_SECAGG"  # "n,d,rounds": Ray workers inherit the environment
RESULTS: dict[str, list] = {"flower": [], "flower_checks": [], "ours": [], "ours_checks": []}


def _settings() -> tuple[int, int, int]:
    n, d, r = (int(x) for x in os.environ[SETTINGS_ENV].split(","))
    return n, d, r


def vector(pid: int, d: int) -> np.ndarray:
    """Client ``pid``'s vector: fixed random direction, L2 norm 0.5."""
    v = np.random.default_rng(1000 + pid).normal(size=d)
    return (0.5 * v / np.linalg.norm(v)).astype(np.float32)


def expected_mean(n: int, d: int) -> np.ndarray:
    return np.mean([vector(p, d).astype(np.float64) for p in range(n)], axis=0)


def bench_config(n: int):
    import warnings

    from fedpersona.config import load_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config({"server.clients-per-round": n, "server.min-clients": 2}, env=False)


def graph_params(n: int) -> tuple[int, int]:
    from fedpersona.privacy.secagg.settings import secagg_params

    k, t, _ = secagg_params(bench_config(n)).round_params(n)
    return k, t


# ------------------------------------------------------------------------------ Flower's SecAgg+
def _flower_apps():
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class VectorClient(NumPyClient):
        def __init__(self, pid: int, d: int):
            self.pid, self.d = pid, d

        def fit(self, parameters, config):
            return [vector(self.pid, self.d)], 1, {}

    def client_fn(context: Context):
        import torch  # noqa: F401  - the same imports as our ClientApp: round 1 then costs both sides alike

        import fedpersona.secagg_wire  # noqa: F401
        import fedpersona.privacy.secagg.settings  # noqa: F401
        import fedpersona.wire  # noqa: F401

        _, d, _ = _settings()
        return VectorClient(int(context.node_config["partition-id"]), d).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])

    class CheckedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            n, d, _ = _settings()
            out = super().aggregate_fit(server_round, results, failures)
            err = float("nan")
            if out[0] is not None:
                err = float(np.max(np.abs(parameters_to_ndarrays(out[0])[0] - expected_mean(n, d))))
            RESULTS["flower_checks"].append({"round": server_round, "results": len(results),
                                             "failures": len(failures), "max_error": err})
            return out

    class TimedSecAggPlus(SecAggPlusWorkflow):
        def __call__(self, grid, context):
            t0 = time.perf_counter()
            super().__call__(grid, context)
            RESULTS["flower"].append(time.perf_counter() - t0)

    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        n, d, rounds = _settings()
        k, t = graph_params(n)
        strategy = CheckedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                                 initial_parameters=ndarrays_to_parameters([np.zeros(d, dtype=np.float32)]))
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        # max_weight=1: every client's weight (num_examples) is 1; Flower's default 1000 costs 3 digits of precision.
        workflow = TimedSecAggPlus(num_shares=k + 1, reconstruction_threshold=t, max_weight=1.0)
        DefaultWorkflow(fit_workflow=workflow)(grid, ctx)

    return server, client


# ------------------------------------------------------------------------------ ours
def _our_apps():
    import torch
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedpersona.secagg_wire import SELF_ENC_PK, SELF_MASK_PK, SELF_SIGN_PK, from_records, to_records
    from fedpersona.privacy.secagg.settings import secagg_params
    from fedpersona.wire import pack_shared, unpack_shared
    from fedpersona.privacy.secagg import ClientKeys, SecAggClient
    from fedpersona.server.secagg import SecureAggregator

    client = ClientApp()

    def sa_client(context) -> SecAggClient:
        n, _, _ = _settings()
        if "bench-secagg" not in context.state.config_records:
            context.state["bench-secagg"] = ConfigRecord({"keys": ClientKeys().to_bytes()})
        keys = ClientKeys.from_bytes(context.state["bench-secagg"]["keys"])
        return SecAggClient(context.node_id, secagg_params(bench_config(n)), keys=keys)

    @client.query("advertise")
    def advertise(message, context):
        return Message(RecordDict(to_records(sa_client(context).advertise(run_id=context.run_id))), reply_to=message)

    @client.train()
    def train(message, context):
        n, d, _ = _settings()
        unpack_shared(message.content)  # as the real client does (Flower's client decodes it too)
        req = from_records(message.content)
        sa = sa_client(context)
        if (req.pop(SELF_ENC_PK), req.pop(SELF_MASK_PK), req.pop(SELF_SIGN_PK)) != (
                sa.keys.enc_public, sa.keys.mask_public, sa.keys.sign_public):
            raise ValueError("keys changed since the advertisement")
        cfg = bench_config(n)
        extras = {e.name: 0.0 for e in sa.config.extras}
        extras.update({"examples": float(cfg.data.max_examples), "trained": 1.0})  # weight 1 per client
        vec = vector(int(context.node_config["partition-id"]), d)
        return Message(RecordDict(to_records(sa.masked_input(req, vec, extras))), reply_to=message)

    @client.query("consistency")
    def consistency(message, context):
        req = from_records(message.content)
        reply = sa_client(context).consistency(req)
        context.state["bench-signed"] = ConfigRecord({"survivors": [int(x) for x in req["survivors"]]})
        return Message(RecordDict(to_records(reply)), reply_to=message)

    @client.query("unmask")
    def unmask(message, context):
        signed = list(context.state["bench-signed"]["survivors"])
        return Message(RecordDict(to_records(sa_client(context).unmask(from_records(message.content), signed=signed))),
                       reply_to=message)

    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        n, d, rounds = _settings()
        cfg = bench_config(n)
        agg = SecureAggregator(cfg, run_id=context.run_id)
        while len(list(grid.get_node_ids())) < n:
            time.sleep(0.2)
        cohort = sorted(grid.get_node_ids())[:n]
        shared = {"w": torch.zeros(d)}
        truth = expected_mean(n, d)
        for r in range(1, rounds + 1):
            content = RecordDict({**pack_shared(shared), "config": ConfigRecord({"server-round": r})})
            t0 = time.perf_counter()
            rs = agg.collect(grid, cohort, content, server_round=r, timeout=None)
            RESULTS["ours"].append(time.perf_counter() - t0)
            err = float("nan")
            if rs.weight > 0:
                err = float(np.max(np.abs(rs.update_sum["w"].double().numpy() / rs.weight - truth)))
            RESULTS["ours_checks"].append({"round": r, "results": rs.contributors, "failures": len(rs.failures),
                                           "aborted": rs.aborted, "max_error": err,
                                           "server_cpu_s": rs.info.get("secagg-server-cpu-seconds")})

    return server, client


# ------------------------------------------------------------------------------ driver
def _simulate(which: str, n: int, d: int, rounds: int, cpus: int, verbose: bool = False) -> None:
    from flwr.simulation import run_simulation

    from fedpersona.simulations.engine.shards import start_ray

    server, client = _flower_apps() if which == "flower" else _our_apps()
    os.environ[SETTINGS_ENV] = f"{n},{d},{rounds}"
    start_ray(cpus)  # on 127.0.0.1 only; Flower finds it running (started by Flower, Ray binds every interface)
    run_simulation(server_app=server, client_app=client, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                                 "logging_level": logging.INFO if verbose else logging.ERROR,
                                                 "log_to_driver": verbose}})


def _in_subprocess(which: str, n: int, d: int, rounds: int, cpus: int, verbose: bool) -> dict:
    """One simulation in a fresh interpreter (two run_simulation calls in one process can hang in Ray)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, "-m", "fedpersona.simulations.bench.flower_secagg", "--worker", which, "--clients", str(n),
               "--params", str(d), "--rounds", str(rounds), "--cpus", str(cpus), "--json", out]
        if verbose:
            cmd.append("--verbose")
        proc = subprocess.run(cmd, stdout=None if verbose else subprocess.DEVNULL,
                              stderr=None if verbose else subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or "")[-2000:]
            raise RuntimeError(f"the {which} simulation failed (exit {proc.returncode}):\n{tail}")
        with open(out) as f:
            return json.load(f)


def bench(n: int, d: int, rounds: int, cpus: int, only: str = "both", verbose: bool = False) -> dict:
    for key in RESULTS:
        RESULTS[key].clear()
    k, t = graph_params(n)
    for which in ("flower", "ours"):
        if only in ("both", which):
            got = _in_subprocess(which, n, d, rounds, cpus, verbose)
            RESULTS[which] = got[which]
            RESULTS[f"{which}_checks"] = got[f"{which}_checks"]
    flower, ours = list(RESULTS["flower"]), list(RESULTS["ours"])
    fchk, ochk = list(RESULTS["flower_checks"]), list(RESULTS["ours_checks"])
    ok_f = len(flower) == rounds and all(c["results"] == n and c["failures"] == 0 for c in fchk) and len(fchk) == rounds
    ok_o = len(ours) == rounds and all(c["results"] == n and c["failures"] == 0 and not c["aborted"] for c in ochk)
    row = {"clients": n, "params": d, "degree": k, "threshold": t, "rounds": rounds,
           "flower_round_s": flower, "ours_round_s": ours,
           "flower_mean_s": statistics.mean(flower) if flower else math.nan,
           "ours_mean_s": statistics.mean(ours) if ours else math.nan,
           "ours_first_s": ours[0] if ours else math.nan,
           "ours_later_mean_s": statistics.mean(ours[1:]) if len(ours) > 1 else math.nan,
           "flower_first_s": flower[0] if flower else math.nan,
           "flower_later_mean_s": statistics.mean(flower[1:]) if len(flower) > 1 else math.nan,
           "flower_ok": ok_f, "ours_ok": ok_o,
           "flower_max_error": max((c["max_error"] for c in fchk), default=math.nan),
           "ours_max_error": max((c["max_error"] for c in ochk), default=math.nan),
           "flower_checks": fchk, "ours_checks": ochk}
    row["ratio_first"] = row["ours_first_s"] / row["flower_first_s"]
    row["ratio_later"] = row["ours_later_mean_s"] / row["flower_later_mean_s"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--params", type=int, nargs="+", default=[500_000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", choices=["both", "flower", "ours"], default="both")
    p.add_argument("--worker", choices=["flower", "ours"], help=argparse.SUPPRESS)  # one simulation, JSON out
    p.add_argument("--verbose", action="store_true", help="Flower's and the ClientApps' logs")
    p.add_argument("--json", help="also write the rows as JSON lines to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not a.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if a.worker:
        _simulate(a.worker, a.clients[0], a.params[0], a.rounds, a.cpus, a.verbose)
        with open(a.json, "w") as f:
            json.dump(RESULTS, f)
        return 0
    rows = []
    print(f"Simulation Engine, {a.cpus} CPU(s), 1 CPU per ClientApp, {a.rounds} rounds; seconds per round "
          "(server wall clock, first message to unmasked sum)", flush=True)
    header = (f"{'n':>4} {'params':>9} {'k':>3} {'t':>3} | {'Flower r1':>9} {'ours r1':>8} {'ratio':>6} | "
              f"{'Flower r2+':>10} {'ours r2+':>8} {'ratio':>6} | {'ok':>3} | max error Flower / ours")
    print(header, flush=True)
    for d in a.params:
        for n in a.clients:
            r = bench(n, d, a.rounds, a.cpus, a.only, a.verbose)
            rows.append(r)
            print(f"{n:>4} {d:>9,} {r['degree']:>3} {r['threshold']:>3} | {r['flower_first_s']:>9.2f} "
                  f"{r['ours_first_s']:>8.2f} {r['ratio_first']:>6.2f} | {r['flower_later_mean_s']:>10.2f} "
                  f"{r['ours_later_mean_s']:>8.2f} {r['ratio_later']:>6.2f} | "
                  f"{'yes' if r['flower_ok'] and r['ours_ok'] else 'NO':>3} | "
                  f"{r['flower_max_error']:.1e} / {r['ours_max_error']:.1e}", flush=True)
    print("r1: round 1 (both include the ClientApp actors' start; ours also the one-off key advertisement); "
          "r2+: mean of the later rounds; ratio: ours / Flower. ok: every round summed all n clients with 0 "
          "failures on both sides. max error: largest coordinate error of the aggregated mean vs the true mean.")
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0 if all(r["flower_ok"] and r["ours_ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
