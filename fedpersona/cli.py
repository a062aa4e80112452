"""The ``fedpersona`` console script: one subcommand per task (docs/cli.md).

Every subcommand's options have a help text and show their default (``fedpersona COMMAND --help``).
A command that reads a scenario checks it first (:func:`fedpersona.simulations.scenarios.preflight`: keys,
values, ``data.source`` and ``model.path``) before it imports torch, Flower or transformers, so
a typo fails at once; the heavy modules are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DESCRIPTION = """\
Privacy-preserving federated personalization of a language-model assistant: every user's device
trains LoRA adapters on the user's own text under DP-SGD; only the shared adapter's update leaves it,
masked by secure aggregation; a personal head stays on the device.

Start with `fedpersona run` (the demo), then `fedpersona generate --run results/demo --user USER
--prompt TEXT`. `fedpersona COMMAND --help` lists each command's options and defaults; docs/cli.md
walks through all of them."""

EPILOG = """\
examples:
  fedpersona run                                        the demo: 20 users, 3 rounds (about 10 min on a CPU)
  fedpersona run --set data.source=chats.jsonl          your own per-user data (docs/data.md)
  fedpersona plan --set data.source=chats.jsonl         each user's noise, sample rate and epsilon, before training
  fedpersona generate --run results/demo --user "ESCALUS (Measure for Measure)" --prompt "What news?" --base
  fedpersona chat --run results/demo --user "ESCALUS (Measure for Measure)"
  fedpersona export --run results/demo --user "ESCALUS (Measure for Measure)" --out escalus-adapter
  fedpersona audit results/demo                         the privacy report of a run (docs/audit.md)"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless it names one already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if hidden or "default" in text.lower():
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            return f"{text} (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose subcommands (``audit`` and ``audit-run`` too) format their help alike."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _overrides(pairs: list[str]) -> dict:
    from fedpersona.config import parse_overrides

    return parse_overrides(pairs)


def _policy(pairs: list[str]) -> dict:
    policy = {}
    for text in pairs:
        k, v = _overrides([text]).popitem()
        policy[k] = v
    return policy


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ------------------------------------------------------------------------------------------------ run
class Stopped(BaseException):
    """The run got SIGTERM: a BaseException, like KeyboardInterrupt, so that no ``except Exception`` keeps it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:  # noqa: ARG001 - the signal module's handler signature
    raise Stopped(signum)


def _resume_hint(args: argparse.Namespace, signum: int) -> str:
    """What a stopped run did, and the command that resumes it."""
    from pathlib import Path

    from fedpersona.simulations.scenarios import preflight

    cfg = preflight(args.scenario, _overrides(args.set), check_paths=False)
    ckpts = Path(cfg.run.results_dir) / cfg.run.name / "checkpoints"
    done = sorted(p.name for p in ckpts.glob("round-*") if (p / "round.json").is_file()) if ckpts.is_dir() else []
    where = f"after round {int(done[-1].split('-')[1])} of {cfg.server.num_rounds}" if done else "before its first round"
    command = "fedpersona " + " ".join(shlex.quote(a) for a in args.argv)
    return (f"run '{cfg.run.name}' stopped by {signal.Signals(signum).name} {where}. The same command resumes it "
            f"after the last complete round (the devices keep composing their epsilon): {command}\n"
            f"To start over instead, delete {Path(cfg.run.results_dir) / cfg.run.name} and "
            f"{Path(cfg.run.state_dir) / cfg.run.name}.")


def _cmd_run(args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return _run(args)
    except Stopped as stop:
        print(f"\nfedpersona: {_resume_hint(args, stop.signum)}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"\nfedpersona: {_resume_hint(args, signal.SIGINT)}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from fedpersona.server.run_report import summary_table
    from fedpersona.simulations.progress import make_display
    from fedpersona.simulations.runner import run

    policy = _policy(args.device_policy)
    display = make_display(quiet=args.quiet)
    kw = dict(cpus=args.cpus, device_policy=policy, engine=args.engine, engines=args.engines)
    if display is None:
        metrics = run(args.scenario, _overrides(args.set), **kw)
    else:
        with display:
            metrics = run(args.scenario, _overrides(args.set), progress=display, **kw)
    final = metrics.get("final")
    run_dir = os.path.join(metrics["config"]["run.results-dir"], metrics["run"])
    print()
    print(f"Run '{metrics['run']}' finished in {metrics['wall_seconds']:.0f} s "
          f"({_plural(len(metrics['rounds']), 'round')}). Results: {run_dir}")
    if final:
        print(summary_table(final["users"], final["summary"]))
        s = final["summary"]
        keys = [k for k in ("base", "shared", "personal", "local") if f"{k}-loss" in s]
        if not final["users"]:  # no per-user rows on this machine: the server's noised view is all there is
            print("mean held-out loss (the server's noised sum): "
                  + ", ".join(f"{k} {s[k + '-loss']['mean']:.3f}" for k in keys))
    if display is None:  # -q: the display did not show what the data filters and model.seq-len did
        for line in metrics.get("data", {}).get("lines", []):
            print(line)
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
    if metrics["rounds"] and not any(r.get("applied") for r in metrics["rounds"]):
        reasons = sorted({r["aborted"] for r in metrics["rounds"] if r.get("aborted")})
        print(f"fedpersona: error: run '{metrics['run']}' trained nothing: no round was applied"
              + (f" (secure aggregation aborted: {reasons[0]})" if reasons else "") + f"; see {run_dir}/rounds.csv",
              file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ plan
def _cmd_plan(args: argparse.Namespace) -> int:
    from fedpersona.simulations.plan import format_plan, make_plan

    plan = make_plan(args.scenario, _overrides(args.set), device_policy=_policy(args.device_policy))
    print(format_plan(plan))
    return 1 if plan["refused"] else 0


# ------------------------------------------------------------------------------------ generate / chat
def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        if args.prompts == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(args.prompts, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError as exc:
                raise ValueError(f"--prompts: cannot read {args.prompts!r} ({exc.strerror})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("fedpersona generate needs --prompt TEXT (repeatable) or --prompts FILE (one a line; - reads "
                         "stdin)")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    from fedpersona.simulations.generate import generate_many

    prompts = _prompts(args)
    answers = generate_many(
        user=args.user, prompts=prompts, run=args.run, scenario=args.scenario, overrides=_overrides(args.set),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, exemplars=args.exemplars,
        base=args.base,
    )
    if len(prompts) == 1 and not args.base:
        print(answers[0]["personalized"])  # one prompt: the reply alone, as before
        return 0
    for a in answers:
        print(f"prompt: {a['prompt']}")
        print(f"personalized: {a['personalized']}")
        if args.base:
            print(f"base model:   {a['base']}")
        print()
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from fedpersona.client.chat import ChatSession, device_profile, load_device_model

    if (args.user is None) == (args.state_dir is None):
        raise ValueError("fedpersona chat needs exactly one of --state-dir (a device) or --user (a simulated user of a "
                         "run, with --run or --scenario)")
    if args.user is not None:
        from fedpersona.simulations.chat import simulated_user

        cfg, model, store, pairs = simulated_user(args.user, args.scenario, _overrides(args.set), run=args.run)
    else:
        from fedpersona.client.data import read_user_folder
        from fedpersona.client.store import DeviceStore

        store = DeviceStore(args.state_dir)
        cfg, model = load_device_model(store, _overrides(args.set))
        pairs = read_user_folder(args.data_dir) if args.data_dir else None
    profile = "" if args.no_profile else device_profile(store, pairs=pairs, tokenizer=model.tokenizer)
    session = ChatSession(model, cfg, store, profile=profile, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, seed=args.seed, pairs=pairs, exemplars=args.exemplars,
                          compare_base=args.base)
    interactive = sys.stdin.isatty()
    if interactive:
        from fedpersona.client.chat import HELP

        print(HELP)
    session.run(sys.stdin, sys.stdout, prompt="you> " if interactive else "")
    return 0


# ---------------------------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace) -> int:
    if (args.user is None) == (args.state_dir is None):
        raise ValueError("fedpersona export needs exactly one of --state-dir (a device) or --user (a simulated user of "
                         "a run, with --run or --scenario)")
    if args.user is not None:
        from fedpersona.simulations.export import export_simulated_user

        done = export_simulated_user(args.user, args.out, run=args.run, scenario=args.scenario,
                                     overrides=_overrides(args.set), shared_only=args.shared_only)
    else:
        from fedpersona.client.export import export_device

        done = export_device(args.state_dir, args.out, overrides=_overrides(args.set), shared_only=args.shared_only)
    for what, path in done["folders"].items():
        print(f"{what:<13} {path}")
    print(f"base model    {done['base']}")
    print("load it with transformers + peft:")
    print("  from transformers import AutoModelForCausalLM, AutoTokenizer")
    print("  from peft import PeftModel")
    print(f"  base = AutoModelForCausalLM.from_pretrained({str(done['base'])!r})")
    first = next(iter(done["folders"].values()))
    print(f"  model = PeftModel.from_pretrained(base, {str(first)!r})")
    print(f"  tokenizer = AutoTokenizer.from_pretrained({str(first)!r})")
    return 0


# ----------------------------------------------------------------------------------------------- bench
def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "utility":
        from fedpersona.simulations.studies.utility import main as utility_main

        return utility_main(args.scenario, epsilons=args.epsilons, quick=args.quick, overrides=_overrides(args.set),
                            vary=args.vary, vary_row=args.vary_row, rows=args.rows, resume=args.resume,
                            central_steps=args.central_steps, device_policy=_overrides(args.device_policy),
                            contributors=args.contributors)
    if args.what == "attribution":
        from fedpersona.simulations.studies.utility import finished_run_attribution

        r = finished_run_attribution(args.scenario, _overrides(args.set))
        ranks = sorted(r["ranks"].items(), key=lambda kv: (kv[1], kv[0]))
        print(f"user attribution, run '{r['run']}' (round {r['round']}): top-1 {r['top1']:.0%} of {len(ranks)} users "
              f"against chance {r['chance']:.1%} ({r['ratio_to_chance']:.1f}x), mean rank {r['mean_rank']:.2f}"
              + (f"; {r['without_head']} user(s) without a head" if r["without_head"] else ""))
        for user, rank in ranks:
            print(f"  {rank:3d}  {user}")
        return 0
    if args.what == "newcomer":
        from fedpersona.simulations.studies.newcomer import main as newcomer_main

        return newcomer_main(quick=args.quick, initial=args.initial, scenario=args.scenario,
                             overrides=_overrides(args.set))
    if args.what == "overhead":
        from fedpersona.simulations.bench.overhead import main as overhead_main

        def ints(text: str | None, key: str) -> tuple[int, ...] | None:
            try:
                return tuple(int(x) for x in text.split(",")) if text else None
            except ValueError:
                raise ValueError(f"bench overhead: {key} takes whole numbers N,N,... You passed: {text!r}") from None

        return overhead_main(quick=args.quick, users=ints(args.users, "--users"), cohorts=ints(args.cohorts, "--cohorts"),
                             rounds=args.rounds, cpus=args.cpus, overrides=_overrides(args.set), json_path=args.json)
    from fedpersona.simulations.bench.training import main as bench_main

    if args.what == "dp-step":
        return bench_main("dp-step", steps=args.steps, model=args.model)
    cohorts = tuple(int(c) for c in args.cohorts.split(",")) if args.cohorts else None
    methods = tuple(args.methods.split(",")) if args.methods else None
    return bench_main("engine", quick=args.quick, preset=args.preset, cohorts=cohorts, engine_steps=args.engine_steps,
                      methods=methods)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks and studies, side by side (`fedpersona bench WHAT --help`)",
                       description="Benchmarks and studies; each has its own options: fedpersona bench WHAT --help.")
    bs = b.add_subparsers(dest="what", required=True, metavar="WHAT")

    d = bs.add_parser("dp-step", help="a DP-SGD step vs a plain step on the same Poisson batches",
                      description="A DP-SGD step vs a plain step on the same Poisson batches, and the noise's cost "
                                  "(torch's generator, the CSPRNG, Opacus's secure_mode).")
    d.add_argument("--steps", type=int, default=10, help="steps timed (the median is printed)")
    d.add_argument("--model", default="smollm2", help="model.path to benchmark")

    e = bs.add_parser("engine", help="the cohort engine vs the sequential Opacus path (docs/performance.md)",
                      description="The cohort engine (every client of a round in one pass) vs one client at a time "
                                  "through Opacus, in DP-trained tokens per second (docs/performance.md).")
    e.add_argument("--quick", action="store_true", help="a tiny model on the CPU, 16 clients (about a minute)")
    e.add_argument("--preset", choices=["quick", "demo", "anchor"], default=None,
                   help="quick | demo (SmolLM2-135M shape, CPU) | anchor (all 30 blocks, bf16, CUDA); "
                        "default anchor with CUDA, else demo")
    e.add_argument("--cohorts", default=None, metavar="N,N,...", help="cohort sizes (default: the preset's)")
    e.add_argument("--engine-steps", type=int, default=None, help="steps per client (default: the preset's)")
    e.add_argument("--methods", default=None, metavar="M,M",
                   help="expanded,vmap (default: both; the first gives the speedup line)")

    u = bs.add_parser("utility", help="what users get under the privacy guarantee (docs/utility.md)",
                      description="The utility study: DP federated rows at several epsilons beside the non-private "
                                  "and local-only baselines (simulations/studies/utility.py, docs/utility.md).")
    u.add_argument("scenario", nargs="?", default="demo", help="scenario name or TOML path")
    u.add_argument("--epsilons", default="1,4,8", help="epsilons of the DP federated rows")
    u.add_argument("--quick", action="store_true", help="fewer users and rounds (a smoke run)")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    u.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="one more row per value, on the row kind --vary-row, at the largest epsilon (repeatable)")
    u.add_argument("--vary-row", default="device", choices=["nodp", "device", "sum", "ddp"],
                   help="the row --vary changes (sum: t = K/2)")
    u.add_argument("--rows", default=None, metavar="KIND,KIND",
                   help="which federated rows to run, of nodp,device,sum,ddp (default: all)")
    u.add_argument("--resume", action="store_true",
                   help="reuse the rows already measured for the same config and users (results/<run>/utility-runs)")
    u.add_argument("--central-steps", type=int, default=None,
                   help="Adam steps of the pooled upper bound (default: one pass over the pooled examples, >= 80)")
    u.add_argument("--device-policy", action="append", default=[], metavar="KEY=VALUE",
                   help="policy.* keys of the devices of rows run through the real apps (the sum rows; repeatable)")
    u.add_argument("--contributors", default=None, metavar="T,T",
                   help="t (honest contributors) of the noise-on-the-sum rows (default: 3, K/2 and K)")

    n = bs.add_parser("newcomer", help="a user who joins late: head, profile prompt, Reptile-style",
                      description="Users the run never trained on, starting from its shared adapter: the head, the "
                                  "profile as a prompt, both; and a Reptile-style inner loop (simulations/studies/newcomer.py).")
    n.add_argument("scenario", nargs="?", default="demo", help="the run whose newest checkpoint is the shared adapter")
    n.add_argument("--quick", action="store_true", help="a tiny random-weight model (checks the machinery, < 1 min)")
    n.add_argument("--initial", action="store_true", help="start from the initial shared adapter, not a checkpoint")
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")

    a = bs.add_parser("attribution", help="after a run: does each user's model rank its own held-out replies first?",
                      description="After a run: each user's held-out replies scored by every user's personalized "
                                  "model; how often the user's own model ranks first.")
    a.add_argument("scenario", nargs="?", default="demo", help="the run (scenario name or TOML path)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")

    o = bs.add_parser("overhead", help="the framework's time per participation besides training (docs/performance.md)",
                      description="The framework's cost per participation (state writes, secure aggregation, "
                                  "evaluation, the server's loop) beside the engine's training time, for N users and K "
                                  "clients a round, with the tests' tiny model (simulations/bench/overhead.py).")
    o.add_argument("--quick", action="store_true", help="16 users, all 16 a round (a smoke run)")
    o.add_argument("--users", default=None, metavar="N,N,...", help="numbers of users (default 50,200,1000)")
    o.add_argument("--cohorts", default=None, metavar="K,K,...", help="clients per round (default 8,32,64)")
    o.add_argument("--rounds", type=int, default=None, help="rounds per (N, K) (default 2)")
    o.add_argument("--cpus", type=int, default=None, help="CPU threads for the runs (default: all)")
    o.add_argument("--json", default=None, metavar="PATH", help="where the figures go (default results/bench-overhead.json)")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    b.set_defaults(func=_cmd_bench)


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedpersona.certs import make_credentials

    names = list(args.supernode)
    names += [f"{args.prefix}{i}" for i in range(args.supernodes)]
    creds = make_credentials(args.out, supernodes=names, sans=args.san, days=args.days, force=args.force)
    print(f"CA:               {creds.ca_cert}  (key {creds.ca_key}: keep it offline)")
    print(f"SuperLink TLS:    {creds.server_cert}  {creds.server_key}")
    for name, (private, public) in sorted(creds.supernode_keys.items()):
        print(f"SuperNode {name}: {private}  (register {public})")
    print(f"Identity root:    {creds.identity_root}  (keep it offline)")
    for name, path in sorted(creds.identities.items()):
        print(f"Identity {name}:  {path}  (to that device only, as <state-dir>/identity.json)")
    print(f"{len(creds.created)} file(s) created; existing files kept" if not args.force else f"{len(creds.created)} file(s) written")
    return 0


def _cmd_supernode(args: argparse.Namespace) -> int:
    from fedpersona.client.supernode import run_supernode

    return run_supernode(
        superlink=args.superlink, data_dir=args.data_dir, state_dir=args.state_dir, user_id=args.user_id,
        root_certificates=args.root_certificates, auth_key=args.auth_key, insecure=args.insecure,
        runtime_port=args.runtime_port, warm=not args.cold, max_retries=args.max_retries,
        supernode_poll=args.poll_interval,
    )


def _scenario_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", default="demo", help="scenario name under simulations/conf or a TOML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set server.num-rounds=5 (repeatable; every key: "
                        "docs/configuration.md)")


def _reply_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=48, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same seed, the same reply)")
    p.add_argument("--base", action="store_true",
                   help="also the base model's reply (no adapter, no head; the same exemplars and seed), to compare")


def _run_options(p: argparse.ArgumentParser, *, what: str) -> None:
    p.add_argument("--run", metavar="RESULTS/NAME",
                   help=f"the run folder (results/<run.name>, or just its name): {what} with the config it saved in "
                        "metrics.json, no --set to repeat")
    p.add_argument("--scenario", default="demo", help="without --run: the scenario of the run to load")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the run (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedpersona", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    r = sub.add_parser("run", help="run a federated simulation (default scenario: demo)",
                       description="Run a scenario as a federated simulation of the real Flower apps; outputs go to "
                                   "results/<run.name>/, device state to state/<run.name>/. Running it again resumes "
                                   "after the last complete round.")
    _scenario_options(r)
    r.add_argument("--cpus", type=int, default=None, help="CPUs for the simulation (default: all)")
    r.add_argument("--engine", choices=["auto", "cohort", "devices", "flower"], default="auto",
                   help="auto: cohort on a GPU or for a small model, devices for a real model on the CPU; "
                        "cohort: each round's cohort trained together by the cohort engine below the ServerApp, in "
                        "this process; devices: the same in-process grid, each device training its own round "
                        "(fedpersona.client.train); flower: Flower's Simulation Engine (Ray), one client at a time")
    r.add_argument("--engines", type=int, default=1, metavar="N",
                   help="cohort engine: split each round's cohort over N engines on Ray actors, one GPU each "
                        "(CPU actors without CUDA); 1: one engine in this process, no Ray")
    r.add_argument("--device-policy", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy key every simulated device holds as its own, e.g. allow-no-dp=true for a "
                        "non-private run (docs/configuration.md, Device policy; repeatable)")
    r.add_argument("--allow-failures", action="store_true",
                   help="exit 0 (with a warning) even when devices failed; otherwise any failure exits 1")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress display; only warnings, errors and the result")
    r.add_argument("-v", "--verbose", dest="run_verbose", action="count", default=0,
                   help="also the log lines (-v: info, -vv: debug); without it: progress + warnings")
    r.set_defaults(func=_cmd_run, preflight=True)

    pl = sub.add_parser("plan", help="dry run: each user's planned noise, sample rate, steps and epsilon",
                        description="A dry run: for the scenario and the devices' policy, each user's examples, "
                                    "sample rate q, noise multiplier sigma, DP steps, the rounds it is sampled in and "
                                    "the epsilon it reaches, before anything trains (reads the data and the "
                                    "tokenizer-free settings only; no model is loaded).")
    _scenario_options(pl)
    pl.add_argument("--device-policy", action="append", default=[], metavar="KEY=VALUE",
                    help="a policy key every simulated device holds, as with `fedpersona run` (repeatable)")
    pl.set_defaults(func=_cmd_plan, preflight=True)

    g = sub.add_parser("generate", help="write replies in one user's voice with that user's personal head",
                       description="Replies in one user's voice: the base model + the run's newest shared adapter + "
                                   "the user's personal head, after K of the user's own turns most like the prompt. "
                                   "The model loads once for all prompts.")
    g.add_argument("--user", required=True, help='the user id, e.g. "HAMLET (Hamlet)" (an unknown id lists the run\'s '
                                                 "users)")
    g.add_argument("--prompt", action="append", default=[], help="what is said to the user (repeatable)")
    g.add_argument("--prompts", metavar="FILE", help="more prompts, one a line (- reads them from stdin)")
    _run_options(g, what="generate")
    _reply_options(g)
    g.add_argument("--exemplars", type=int, default=3, metavar="K",
                   help="show K of the user's own (cue, reply) pairs first, as earlier turns, picked on the device by "
                        "the words they share with the prompt (0: none)")
    g.set_defaults(func=_cmd_generate, preflight=False)

    h = sub.add_parser("chat", help="chat with a user's assistant; accept / edit / reject replies (they become local data)",
                       description="The assistant in the terminal: each line is a message to the user, the assistant "
                                   "drafts the user's reply; /accept, /edit TEXT, /reject keep feedback on the device "
                                   "for its next round (/help lists the commands). Input may be piped.")
    h.add_argument("--state-dir", help="a device's state folder (the shared adapter of its last round + its head)")
    h.add_argument("--data-dir", help="with --state-dir: the device's own *.jsonl data (for the user profile)")
    h.add_argument("--user", help='a simulated user of a run, e.g. "HAMLET (Hamlet)"')
    _run_options(h, what="chat")
    h.add_argument("--no-profile", action="store_true", help="write without the profile prefix")
    _reply_options(h)
    h.add_argument("--exemplars", type=int, default=3, metavar="K",
                   help="before the conversation, K of the user's own turns most like the message (its data and kept "
                        "feedback; 0: none)")
    h.set_defaults(func=_cmd_chat, preflight=False)

    x = sub.add_parser("export", help="the personalized model (and the shared adapter alone) as peft LoRA folders",
                       description="Write the personalized model (shared adapter + personal head) as one peft LoRA "
                                   "adapter folder that PeftModel.from_pretrained loads on the base model, and the "
                                   "shared adapter alone as another. The personalized folder holds the personal head "
                                   "unencrypted: keep it on the device.")
    x.add_argument("--out", required=True, help="folder to write: OUT/personalized and OUT/shared")
    x.add_argument("--user", help="a simulated user of a run (with --run or --scenario)")
    x.add_argument("--state-dir", help="a device's state folder (the shared adapter of its last round + its head)")
    _run_options(x, what="export")
    x.add_argument("--shared-only", action="store_true", help="only the shared adapter (no personal head leaves the "
                                                              "encrypted store)")
    x.set_defaults(func=_cmd_export, preflight=False)

    _add_bench(sub)

    c = sub.add_parser("certs", help="create a CA, the SuperLink TLS certificate and SuperNode key pairs (docs/deployment.md)")
    c.add_argument("--out", required=True, help="credentials folder (created 0700; existing files are kept)")
    c.add_argument("--san", action="append", default=[], metavar="IP:ADDR|DNS:NAME",
                   help="extra subject alternative name of the SuperLink certificate (IP:127.0.0.1 and DNS:localhost are always in)")
    c.add_argument("--supernodes", type=int, default=0, metavar="N", help="create key pairs PREFIX0 .. PREFIX{N-1}")
    c.add_argument("--prefix", default="supernode-", help="name prefix for --supernodes")
    c.add_argument("--supernode", action="append", default=[], metavar="NAME", help="create the key pair NAME (repeatable)")
    c.add_argument("--days", type=int, default=365, help="validity of new certificates, in days")
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
                   help="how often an idle SuperNode asks the SuperLink for messages (Flower's own: 3)")
    n.add_argument("--cold", action="store_true", help="Flower's default isolation: a fresh ClientApp process per message (slow)")
    n.add_argument("--insecure", action="store_true", help="NO TLS and NO authentication (loopback debugging only; warns)")
    n.set_defaults(func=_cmd_supernode)

    from fedpersona.simulations.audit.cli import add_audit_parsers

    add_audit_parsers(sub)  # audit, audit-run (docs/audit.md)
    return p


def _preflight(args: argparse.Namespace) -> None:
    """Check the scenario, the keys and the paths before the heavy imports (:mod:`fedpersona.simulations.scenarios`)."""
    from fedpersona.simulations.scenarios import preflight

    preflight(args.scenario, _overrides(args.set))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "run" and args.quiet and args.run_verbose:
        print("fedpersona: error: --quiet and --verbose exclude each other", file=sys.stderr)
        return 2
    try:
        if getattr(args, "preflight", False):
            _preflight(args)  # a typo fails here, before torch, Flower and transformers are imported
    except ValueError as exc:
        print(f"fedpersona: error: {exc}", file=sys.stderr)
        return 2
    from fedpersona.output import configure

    if args.verbose:
        level = logging.DEBUG
    elif args.command == "run":  # the progress display tells what happens; logs only when asked for
        level = {0: logging.WARNING, 1: logging.INFO}.get(args.run_verbose, logging.DEBUG)
    elif args.command == "plan":  # the table is the output
        level = logging.WARNING
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
