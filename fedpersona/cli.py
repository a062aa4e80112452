"""The ``fedpersona`` console script.

    fedpersona run [SCENARIO] [--set key=value ...] [-q|-v] [--engine auto|cohort|devices|flower]
                                                         federated simulation (default scenario: demo)
    fedpersona generate --user "ROLE (Play)" --prompt "..."   reply in a user's voice
    fedpersona chat --state-dir S [--data-dir D] | --user "ROLE (Play)"   the assistant in the terminal, with feedback
    fedpersona bench dp-step                             DP vs non-DP step cost, side by side
    fedpersona bench utility [SCENARIO] [--epsilons 1,4,8] [--quick]   what users get under the privacy guarantee
    fedpersona bench engine [--quick]                    cohort engine vs sequential Opacus path
    fedpersona bench newcomer [--quick]                  a user who joins late: head, profile, Reptile-style
    fedpersona certs --out DIR --supernodes 4 [--san IP:10.0.0.5]   CA, SuperLink TLS cert, SuperNode keys
    fedpersona supernode --superlink HOST:PORT --data-dir D --state-dir S ...   one device (docs/deployment.md)
    fedpersona audit RUN_FOLDER | --device STATE_DIR       privacy report: epsilon, data flow, attacks (docs/audit.md)
    fedpersona audit-run [--dp on|off|both]                 empirical privacy audit on a small configuration
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _overrides(pairs: list[str]) -> dict:
    from fedpersona.config import parse_overrides

    return parse_overrides(pairs)


def _cmd_run(args: argparse.Namespace) -> int:
    from server.run_report import summary_table
    from simulations.progress import make_display
    from simulations.runner import run

    policy = {}
    for text in args.device_policy:
        k, v = _overrides([text]).popitem()
        policy[k] = v
    display = make_display(quiet=args.quiet)
    if display is None:
        metrics = run(args.scenario, _overrides(args.set), cpus=args.cpus, device_policy=policy, engine=args.engine,
                      engines=args.engines)
    else:
        with display:
            metrics = run(args.scenario, _overrides(args.set), cpus=args.cpus, device_policy=policy, progress=display,
                          engine=args.engine, engines=args.engines)
    final = metrics.get("final")
    print()
    print(f"Run '{metrics['run']}' finished in {metrics['wall_seconds']:.0f} s "
          f"({len(metrics['rounds'])} rounds). Results: {os.path.join(metrics['config']['run.results-dir'], metrics['run'])}")
    if final:
        print(summary_table(final["users"], final["summary"]))
        s = final["summary"]
        keys = [k for k in ("base", "shared", "personal", "local") if f"{k}-loss" in s]
        print("mean held-out loss: " + ", ".join(f"{k} {s[k + '-loss']['mean']:.3f}" for k in keys))
    failures = int(metrics.get("failure_count", 0))
    if failures:
        users = metrics.get("failed_users", {})
        detail = "".join(f"\n  {u}: {e}" for u, e in users.items())
        what = f"{failures} failure(s) in run '{metrics['run']}', {len(users)} user(s) failed{detail or ' (see rounds.csv)'}"
        if args.allow_failures:
            print(f"fedpersona: warning: {what} (--allow-failures: exit status 0)", file=sys.stderr)
            return 0
        print(f"fedpersona: error: {what}", file=sys.stderr)
        return 1
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from simulations.generate import generate

    text = generate(
        user=args.user, prompt=args.prompt, scenario=args.scenario, overrides=_overrides(args.set),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, exemplars=args.exemplars,
    )
    print(text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from client.chat import ChatSession, device_profile, load_device_model

    if (args.user is None) == (args.state_dir is None):
        raise ValueError("fedpersona chat needs exactly one of --state-dir (a device) or --user (a simulation run)")
    if args.user is not None:
        from simulations.chat import simulated_user

        cfg, model, store, pairs = simulated_user(args.user, args.scenario, _overrides(args.set))
    else:
        from client.data import read_user_folder
        from client.store import DeviceStore

        store = DeviceStore(args.state_dir)
        cfg, model = load_device_model(store, _overrides(args.set))
        pairs = read_user_folder(args.data_dir) if args.data_dir else None
    profile = "" if args.no_profile else device_profile(store, pairs=pairs, tokenizer=model.tokenizer)
    session = ChatSession(model, cfg, store, profile=profile, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, seed=args.seed, pairs=pairs, exemplars=args.exemplars)
    interactive = sys.stdin.isatty()
    if interactive:
        from client.chat import HELP

        print(HELP)
    session.run(sys.stdin, sys.stdout, prompt="you> " if interactive else "")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "utility":
        from simulations.utility import main as utility_main

        return utility_main(args.scenario, epsilons=args.epsilons, quick=args.quick, overrides=_overrides(args.set),
                            vary=args.vary, vary_row=args.vary_row, rows=args.rows, resume=args.resume,
                            central_steps=args.central_steps, device_policy=_overrides(args.device_policy))
    if args.what == "attribution":
        from simulations.utility import finished_run_attribution

        r = finished_run_attribution(args.scenario, _overrides(args.set))
        ranks = sorted(r["ranks"].items(), key=lambda kv: (kv[1], kv[0]))
        print(f"user attribution, run '{r['run']}' (round {r['round']}): top-1 {r['top1']:.0%} of {len(ranks)} users "
              f"against chance {r['chance']:.1%} ({r['ratio_to_chance']:.1f}x), mean rank {r['mean_rank']:.2f}"
              + (f"; {r['without_head']} user(s) without a head" if r["without_head"] else ""))
        for user, rank in ranks:
            print(f"  {rank:3d}  {user}")
        return 0
    if args.what == "newcomer":
        from simulations.newcomer import main as newcomer_main

        return newcomer_main(quick=args.quick, initial=args.initial, scenario=args.scenario,
                             overrides=_overrides(args.set))
    from simulations.bench import main as bench_main

    cohorts = tuple(int(c) for c in args.cohorts.split(",")) if args.cohorts else None
    methods = tuple(args.methods.split(",")) if args.methods else None
    return bench_main(args.what, steps=args.steps, model=args.model, quick=args.quick, preset=args.preset,
                      cohorts=cohorts, engine_steps=args.engine_steps, methods=methods)


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedpersona.certs import make_credentials

    names = list(args.supernode)
    names += [f"{args.prefix}{i}" for i in range(args.supernodes)]
    creds = make_credentials(args.out, supernodes=names, sans=args.san, days=args.days, force=args.force)
    print(f"CA:               {creds.ca_cert}  (key {creds.ca_key}: keep it offline)")
    print(f"SuperLink TLS:    {creds.server_cert}  {creds.server_key}")
    for name, (private, public) in sorted(creds.supernode_keys.items()):
        print(f"SuperNode {name}: {private}  (register {public})")
    print(f"{len(creds.created)} file(s) created; existing files kept" if not args.force else f"{len(creds.created)} file(s) written")
    return 0


def _cmd_supernode(args: argparse.Namespace) -> int:
    from client.supernode import run_supernode

    return run_supernode(
        superlink=args.superlink, data_dir=args.data_dir, state_dir=args.state_dir, user_id=args.user_id,
        root_certificates=args.root_certificates, auth_key=args.auth_key, insecure=args.insecure,
        runtime_port=args.runtime_port, warm=not args.cold, max_retries=args.max_retries,
        supernode_poll=args.poll_interval,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpersona", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a federated simulation")
    r.add_argument("scenario", nargs="?", default="demo", help="scenario name under simulations/conf or a TOML path")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation (default: all)")
    r.add_argument("--engine", choices=["auto", "cohort", "devices", "flower"], default="auto",
                   help="auto (default): cohort on a GPU or for a small model, devices for a real model on the CPU; "
                        "cohort: each round's cohort trained together by the cohort engine below the ServerApp, in "
                        "this process; devices: the same in-process grid, each device training its own round "
                        "(client.train); flower: Flower's Simulation Engine (Ray), one client at a time")
    r.add_argument("--engines", type=int, default=1, metavar="N",
                   help="cohort engine: split each round's cohort over N engines on Ray actors, one GPU each "
                        "(CPU actors without CUDA); default 1: one engine in this process, no Ray")
    r.add_argument("--device-policy", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy key every simulated device holds as its own, e.g. allow-no-dp=true for a "
                        "non-private run (README: Device policy)")
    r.add_argument("--allow-failures", action="store_true",
                   help="exit 0 (with a warning) even when devices failed; by default any failure exits 1")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress display; only warnings, errors and the result")
    r.add_argument("-v", "--verbose", dest="run_verbose", action="count", default=0,
                   help="also the log lines (-v: info, -vv: debug); default: progress + warnings")
    r.set_defaults(func=_cmd_run)

    g = sub.add_parser("generate", help="write a reply in one user's voice with that user's personal head")
    g.add_argument("--user", required=True, help='user id, e.g. "HAMLET (Hamlet)"')
    g.add_argument("--prompt", required=True, help="what is said to the user")
    g.add_argument("--scenario", default="demo", help="scenario of the run to load (default: demo)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--exemplars", type=int, default=3, metavar="K",
                   help="show K of the user's own (cue, reply) pairs first, as earlier turns, picked on the device by "
                        "the words they share with the prompt (0: none; default: 3)")
    g.set_defaults(func=_cmd_generate)

    h = sub.add_parser("chat", help="chat with a user's assistant; accept / edit / reject replies (they become local data)")
    h.add_argument("--state-dir", help="a device's state folder (shared adapter of its last round + its head)")
    h.add_argument("--data-dir", help="the device's own *.jsonl data (for the user profile; optional)")
    h.add_argument("--user", help='a simulated user of a run, e.g. "HAMLET (Hamlet)"')
    h.add_argument("--scenario", default="demo", help="with --user: the run's scenario (default: demo)")
    h.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    h.add_argument("--no-profile", action="store_true", help="write without the profile prefix")
    h.add_argument("--max-new-tokens", type=int, default=48)
    h.add_argument("--temperature", type=float, default=0.7)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--exemplars", type=int, default=3, metavar="K",
                   help="before the conversation, K of the user's own turns most like the message (its data and kept "
                        "feedback; 0: none; default: 3)")
    h.set_defaults(func=_cmd_chat)

    b = sub.add_parser("bench", help="print benchmark figures")
    b.add_argument("what", choices=["dp-step", "engine", "utility", "newcomer", "attribution"],
                   help="dp-step: DP vs non-DP step on the same batches; engine: cohort engine vs sequential Opacus; "
                        "utility: the utility study (simulations/utility.py); newcomer: a user who joins after training; "
                        "attribution: a finished run's user attribution (does each user's model rank its own held-out "
                        "replies first?)")
    b.add_argument("scenario", nargs="?", default="demo",
                   help="utility: scenario name or TOML path; newcomer / attribution: the run whose newest checkpoint "
                        "is the shared adapter (default: demo)")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--quick", action="store_true", help="engine: tiny model on the CPU, 16 clients (about a minute); "
                   "utility: fewer users and rounds (a smoke run)")
    b.add_argument("--preset", choices=["quick", "demo", "anchor"], default=None,
                   help="engine: quick | demo (SmolLM2-135M shape, CPU) | anchor (all 30 blocks, bf16, CUDA); "
                        "default anchor with CUDA, else demo")
    b.add_argument("--cohorts", default=None, metavar="N,N,...", help="engine: cohort sizes (default: the preset's)")
    b.add_argument("--engine-steps", type=int, default=None, help="engine: steps per client (default: the preset's)")
    b.add_argument("--methods", default=None, metavar="M,M", help="engine: expanded,vmap (default: both; the first "
                   "gives the speedup line)")
    b.add_argument("--model", default="smollm2", help="model.path to benchmark")
    b.add_argument("--epsilons", default="1,4,8", help="utility: epsilons of the DP federated rows (default 1,4,8)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="utility: override a config key")
    b.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="utility: one more row per value, on the row kind --vary-row (at the largest epsilon)")
    b.add_argument("--vary-row", default="device", choices=["nodp", "device", "sum", "ddp"],
                   help="utility: the row --vary changes (sum: t = K/2; default: device)")
    b.add_argument("--rows", default=None, metavar="KIND,KIND",
                   help="utility: which federated rows to run, of nodp,device,sum,ddp (default: all)")
    b.add_argument("--resume", action="store_true",
                   help="utility: reuse the rows already measured for the same config and users (results/<run>/utility-runs)")
    b.add_argument("--central-steps", type=int, default=None,
                   help="utility: Adam steps of the pooled upper bound (default: one pass over the pooled examples, >= 80)")
    b.add_argument("--device-policy", action="append", default=[], metavar="KEY=VALUE",
                   help="utility: policy.* keys of the devices of rows run through the real apps (the sum rows)")
    b.add_argument("--initial", action="store_true", help="newcomer: start from the initial shared adapter, not a checkpoint")
    b.set_defaults(func=_cmd_bench)

    c = sub.add_parser("certs", help="create a CA, the SuperLink TLS certificate and SuperNode key pairs (docs/deployment.md)")
    c.add_argument("--out", required=True, help="credentials folder (created 0700; existing files are kept)")
    c.add_argument("--san", action="append", default=[], metavar="IP:ADDR|DNS:NAME",
                   help="extra subject alternative name of the SuperLink certificate (IP:127.0.0.1 and DNS:localhost are always in)")
    c.add_argument("--supernodes", type=int, default=0, metavar="N", help="create key pairs PREFIX0 .. PREFIX{N-1}")
    c.add_argument("--prefix", default="supernode-", help="name prefix for --supernodes (default: supernode-)")
    c.add_argument("--supernode", action="append", default=[], metavar="NAME", help="create the key pair NAME (repeatable)")
    c.add_argument("--days", type=int, default=365, help="validity of new certificates (default: 365)")
    c.add_argument("--force", action="store_true", help="replace existing files (a new CA invalidates every issued certificate)")
    c.set_defaults(func=_cmd_certs)

    n = sub.add_parser("supernode", help="run one device: a Flower SuperNode + its warm ClientApp worker (docs/deployment.md)")
    n.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    n.add_argument("--root-certificates", metavar="CA.CRT", help="the CA that signed the SuperLink's certificate")
    n.add_argument("--auth-key", metavar="KEY", help="this SuperNode's private key (registered with `flwr supernode register`)")
    n.add_argument("--data-dir", required=True, help="the user's own *.jsonl files (never leave the device)")
    n.add_argument("--state-dir", required=True, help="personal head + privacy ledger, encrypted (keep it across restarts)")
    n.add_argument("--user-id", default=None, help="label in this device's evaluation rows (default: the data folder's name)")
    n.add_argument("--runtime-port", type=int, default=9094, help="local port of the SuperNode's Runtime API (one per device on a host)")
    n.add_argument("--max-retries", type=int, default=None, help="give up connecting to the SuperLink after N tries (default: never)")
    n.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often an idle SuperNode asks the SuperLink for messages (default 1; Flower's own: 3)")
    n.add_argument("--cold", action="store_true", help="Flower's default isolation: a fresh ClientApp process per message (slow)")
    n.add_argument("--insecure", action="store_true", help="NO TLS and NO authentication (loopback debugging only; warns)")
    n.set_defaults(func=_cmd_supernode)

    from simulations.audit_cli import add_audit_parsers

    add_audit_parsers(sub)  # audit, audit-run (docs/audit.md)
    return p


def main(argv: list[str] | None = None) -> int:
    from fedpersona.output import configure

    args = build_parser().parse_args(argv)
    if args.verbose:
        level = logging.DEBUG
    elif args.command == "run":  # the progress display tells what happens; logs only when asked for
        level = {0: logging.WARNING, 1: logging.INFO}.get(args.run_verbose, logging.DEBUG)
        if args.quiet and args.run_verbose:
            print("fedpersona: error: --quiet and --verbose exclude each other", file=sys.stderr)
            return 2
    else:
        level = logging.INFO
    configure(level)  # one handler, one line per event, no ANSI codes (fedpersona/output.py)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"fedpersona: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
