"""The ``fedpersona`` console script.

    fedpersona run [SCENARIO] [--set key=value ...]     federated simulation (default scenario: demo)
    fedpersona generate --user "ROLE (Play)" --prompt "..."   reply in a user's voice
    fedpersona bench dp-step                             DP vs non-DP step cost, side by side
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _overrides(pairs: list[str]) -> dict:
    from fedpersona.config import parse_override

    out = {}
    for text in pairs:
        k, v = parse_override(text)
        out[k] = v
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from server.report import summary_table
    from simulations.runner import run

    metrics = run(args.scenario, _overrides(args.set), cpus=args.cpus)
    final = metrics.get("final")
    print()
    print(f"Run '{metrics['run']}' finished in {metrics['wall_seconds']:.0f} s "
          f"({len(metrics['rounds'])} rounds). Results: {os.path.join(metrics['config']['run.results-dir'], metrics['run'])}")
    if final:
        print(summary_table(final["users"], final["summary"]))
        s = final["summary"]
        keys = [k for k in ("base", "shared", "personal", "local") if f"{k}-loss" in s]
        print("mean held-out loss: " + ", ".join(f"{k} {s[k + '-loss']['mean']:.3f}" for k in keys))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from simulations.generate import generate

    text = generate(
        user=args.user, prompt=args.prompt, scenario=args.scenario, overrides=_overrides(args.set),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
    )
    print(text)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import main as bench_main

    return bench_main(args.what, steps=args.steps, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpersona", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a federated simulation")
    r.add_argument("scenario", nargs="?", default="demo", help="scenario name under simulations/conf or a TOML path")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation (default: all)")
    r.set_defaults(func=_cmd_run)

    g = sub.add_parser("generate", help="write a reply in one user's voice with that user's personal head")
    g.add_argument("--user", required=True, help='user id, e.g. "HAMLET (Hamlet)"')
    g.add_argument("--prompt", required=True, help="what is said to the user")
    g.add_argument("--scenario", default="demo", help="scenario of the run to load (default: demo)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("bench", help="print benchmark figures")
    b.add_argument("what", choices=["dp-step"], help="dp-step: DP vs non-DP step on the same batches")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--model", default="smollm2", help="model.path to benchmark")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"fedpersona: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
