"""Examples kept in the engines' actors, or sent with every cohort: the cost of each, measured.

    python -m fedpersona.simulations.bench.shards --model MODEL_DIR [--clients 16 --examples 16 --rounds 4 --engines 2 --cpus 2]

Trains the same cohort (random token sequences of ``--seq`` tokens, the cached lower-block
activations of ``--model``) for ``--rounds`` rounds: in this process (one CohortEngine), and
over ``--engines`` Ray actors with the examples kept in the actors (the default) and sent with
every call. Prints each round's wall time and the bytes of activations sent.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from fedpersona.client.train import CachedExample
    from fedpersona.config import load_config
    from fedpersona.model import labels_for, lower_hidden
    from fedpersona.simulations.engine import ClientJob, CohortEngine, joint_phases
    from fedpersona.simulations.engine.shards import ShardedEngine, start_ray
    from fedpersona.simulations.engine.engine import engine_model

    ap = argparse.ArgumentParser(prog="python -m fedpersona.simulations.bench.shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model.path (a model folder)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config keys (adapter.* ...)")
    args = ap.parse_args(argv)

    from fedpersona.config import parse_overrides

    flat = {"model.path": args.model, "server.clients-per-round": args.clients, **parse_overrides(args.set)}
    cfg = load_config(flat, env=False)
    torch.set_num_threads(max(1, args.cpus // args.engines))
    local = CohortEngine(engine_model(cfg), device="cpu")
    gen = torch.Generator().manual_seed(0)
    vocab = local.model.peft.get_input_embeddings().weight.shape[0]
    clients = []
    for _ in range(args.clients):
        seqs = [torch.randint(3, vocab, (args.seq,), generator=gen).tolist() for _ in range(args.examples)]
        mask = [i >= args.seq // 3 for i in range(args.seq)]
        clients.append([CachedExample(h, tuple(labels_for(s, mask)))
                        for h, s in zip(lower_hidden(local.model, seqs), seqs)])
    state = (local.model.shared_state(), local.model.personal_state())
    nbytes = sum(e.hidden.numel() * e.hidden.element_size() for ex in clients for e in ex)

    def rounds(engine, label):
        packed = [engine.pack(ex) for ex in clients]
        times = []
        for _ in range(args.rounds):
            jobs = [ClientJob(p, *state, joint_phases(steps=args.steps, batch_size=4, lr=0.01, noise_multiplier=1.0))
                    for p in packed]
            t0 = time.perf_counter()
            engine.train_cohort(jobs)
            times.append(time.perf_counter() - t0)
        sent = getattr(engine, "sent", 0)
        print(f"| {label} | " + " | ".join(f"{t:.2f}" for t in times)
              + f" | {sent * nbytes / len(clients) / 2**20:.1f} MiB |", flush=True)

    print(f"{args.clients} clients x {args.examples} examples x {args.seq} tokens "
          f"({nbytes / args.clients / 2**20:.2f} MiB of activations each), {args.steps} DP steps, "
          f"{args.rounds} rounds, {args.cpus} CPU(s)")
    print("| engine | " + " | ".join(f"round {r + 1} s" for r in range(args.rounds)) + " | activations sent |")
    print("|---|" + "---|" * (args.rounds + 1))
    rounds(local, "1, in this process")
    started = start_ray(args.cpus)
    try:
        for keep in (True, False):
            sharded = ShardedEngine(flat, args.engines, cpus=args.cpus, keep_examples=keep)
            try:
                sharded.wait_ready()
                rounds(sharded, f"{args.engines} actors, examples {'kept' if keep else 'sent per call'}")
            finally:
                sharded.close()
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
