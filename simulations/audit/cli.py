"""The ``fedpersona audit`` and ``fedpersona audit-run`` subcommands (registered by :mod:`fedpersona.cli`).

Every subcommand of ``fedpersona`` is registered at start, so the modules behind these two (torch,
Flower, scipy, matplotlib come with them) are imported when a command runs, not here.

    fedpersona audit RUN_FOLDER [--state-dir DIR] [--out DIR] [--strict]
    fedpersona audit --device STATE_DIR [--delta 1e-3] [--target-epsilon 8]
    fedpersona audit-run [SCENARIO] [--dp on|off|both] [--set key=value ...] [--canaries 64] [--force]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_SCENARIO = "audit"
DEFAULT_CANARIES = 1000


def add_audit_parsers(sub) -> None:
    a = sub.add_parser("audit", help="privacy report of a run (or of one device): guarantee, per-user epsilon, "
                                     "data-flow inventory, empirical attacks (docs/audit.md)")
    a.add_argument("run_folder", nargs="?", help="the run's results folder (results/<run.name>)")
    a.add_argument("--state-dir", help="where the devices' state folders are (default: the run's run.state-dir)")
    a.add_argument("--device", metavar="STATE_DIR", help="audit one device from its own state folder")
    a.add_argument("--delta", type=float, default=None, help="delta (default: the run's privacy.delta, or 1e-3)")
    a.add_argument("--target-epsilon", type=float, default=None, help="budget (default: the run's privacy.target-epsilon)")
    a.add_argument("--out", help="report folder (default: the run folder, or the device's state folder)")
    a.add_argument("--strict", action="store_true", help="exit with status 1 if the report raises any flag")
    a.set_defaults(func=cmd_audit)

    r = sub.add_parser("audit-run", help="run the empirical privacy audit (canaries, one-run audit, membership "
                                         "inference) on a small configuration, then the report")
    r.add_argument("scenario", nargs="?", default=DEFAULT_SCENARIO, help="scenario (default: audit)")
    r.add_argument("--dp", choices=["on", "off", "both"], default="both",
                   help="DP-SGD on, off, or both runs side by side (default: both)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--canaries", type=int, default=DEFAULT_CANARIES,
                   help=f"one-run canaries m, each planted with probability 1/2 (default {DEFAULT_CANARIES}: enough for "
                        "a bound above 8 when the attack guesses them all right)")
    r.add_argument("--exposure-users", type=int, default=2, help="users that get secret canaries")
    r.add_argument("--repeats", type=int, default=8, help="copies of each secret canary")
    r.add_argument("--candidates", type=int, default=256, help="random secrets each canary is ranked against")
    r.add_argument("--seed", type=int, default=0, help="seed of the canaries and of their planting")
    r.add_argument("--reference", help="with --dp off: a DP audit run folder whose epsilon to compare with")
    r.add_argument("--force", action="store_true", help="delete an existing run folder and device state of the same name")
    r.set_defaults(func=cmd_audit_run)


def _print_status(audit: dict, paths: dict) -> None:
    st = audit["status"]
    print(f"guarantee:  {st['guarantee']}")
    print(f"data flow:  {st['inventory']}")
    print(f"empirical:  {st['empirical']}")
    for flag in st["flags"]:
        print(f"FLAG:       {flag}")
    print(f"report:     {paths['html']}  (JSON: {paths['json']})")


def cmd_audit(args: argparse.Namespace) -> int:
    from fedpersona.privacy.audit.render import write_report
    from fedpersona.simulations.audit.gather import build_audit

    if not args.run_folder and not args.device:
        raise ValueError("give a run folder, or --device STATE_DIR")
    audit = build_audit(args.run_folder, state_dir=args.state_dir, device_dir=args.device, delta=args.delta,
                        target_epsilon=args.target_epsilon)
    out = args.out or args.run_folder or args.device
    paths = write_report(audit, out)
    _print_status(audit, paths)
    return 1 if args.strict and not audit["status"]["ok"] else 0


def _read_reference(folder: str | Path) -> float:
    from fedpersona.privacy.audit.empirical import read_empirical

    emp = read_empirical(folder)
    if emp is None or emp["theoretical"]["epsilon_max"] is None:
        raise ValueError(f"--reference {folder}: no DP audit results (audit/empirical.json with a finite epsilon) there")
    return float(emp["theoretical"]["epsilon_max"])


def cmd_audit_run(args: argparse.Namespace) -> int:
    from fedpersona.config import parse_overrides
    from fedpersona.privacy.audit.render import write_report
    from fedpersona.simulations.audit.experiment import AuditSettings, run_audit
    from fedpersona.simulations.audit.gather import build_audit
    from fedpersona.simulations.runner import resolve

    settings = AuditSettings(onerun_canaries=args.canaries, exposure_users=args.exposure_users,
                             exposure_repeats=args.repeats, candidates=args.candidates, seed=args.seed)
    flat, cfg = resolve(args.scenario, parse_overrides(args.set))
    threads = int(os.environ.get("FEDPERSONA_TORCH_THREADS", "0"))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    base = cfg.run.name
    wanted = ["on", "off"] if args.dp == "both" else [args.dp]
    reference = _read_reference(args.reference) if args.reference else None
    results = {}
    for mode in wanted:
        name = f"{base}-{'dp' if mode == 'on' else 'nodp'}"
        if mode == "off" and reference is None:
            sibling = Path(cfg.run.results_dir) / f"{base}-dp"
            if "on" in results:
                reference = results["on"]["theoretical"]["epsilon_max"]
            elif (sibling / "audit" / "empirical.json").is_file():
                reference = _read_reference(sibling)
        res = run_audit(dict(flat, **{"run.name": name}), dp=mode == "on", settings=settings,
                        reference_epsilon=reference if mode == "off" else None, force=args.force)
        results[mode] = res
        run_dir = Path(cfg.run.results_dir) / name
        audit = build_audit(run_dir)
        paths = write_report(audit, run_dir)
        print(f"\n== {name}: DP {'on' if mode == 'on' else 'OFF'} ({res['seconds']:.0f} s) ==")
        _print_summary(res)
        _print_status(audit, paths)
    return 0


def _print_summary(res: dict) -> None:
    v = res["verdict"]
    th = v["theoretical_epsilon"]
    print(f"theoretical epsilon of the shared adapter (max over canary owners): {'inf (no DP)' if th is None else f'{th:.3f}'}"
          f"; personal head: {res['theoretical'].get('personal_head', 'unknown')}")
    for target, r in res["one_run"].items():
        judged = "" if r.get("judged", True) else "  [not judged: no guarantee covers it]"
        f = r.get("fdp") or {}
        print(f"one-run audit vs {target:12s}: {r['v']}/{r['r']} correct of {r['m']} canaries -> epsilon >= "
              f"{r.get('steinke_epsilon_lower_bound', r['epsilon_lower_bound']):.3f} (Steinke, ceiling "
              f"{r.get('steinke_ceiling', r['ceiling']):.2f})"
              + (f"; f-DP: {f['v']}/{f['r']} -> mu >= {f['mu_lower_bound']:.3f}, epsilon >= "
                 f"{f['epsilon_lower_bound']:.3f} (ceiling {f['ceiling']:.2f})" if f else "") + judged)
    for c in res["exposure"]["canaries"]:
        print(f"exposure of a secret x{c['repeats']} ({c['user']}): shared {c['shared']['exposure']:.2f} bits, "
              f"personalized {c['personalized']['exposure']:.2f} bits (chance threshold {res['exposure']['threshold']:.2f})")
    for name, r in res["mia"].items():
        print(f"MIA {name:26s}: AUC {r['auc']:.3f} [{r['auc_low']:.3f}, {r['auc_high']:.3f}], "
              f"TPR@FPR<=0.1% {r['tpr_at_fpr']:.3f}")
    print("verdict: " + ("VIOLATION" if v["violation"] else "no violation")
          + f" ({v.get('headline_target', 'shared')}: epsilon >= {v['empirical_epsilon_lower_bound']:.3f}, ceiling "
          + (f"{v['ceiling']:.2f})" if v.get("ceiling") is not None else "?)")
          + ("; leakage detected" if v["leakage_detected"] else "")
          + (f"; lower bound {'exceeds' if v['exceeds_reference'] else 'does not exceed'} the DP run's epsilon "
             f"{v['reference_epsilon']:.3f}" if "reference_epsilon" in v else ""))
    if v.get("device_outputs"):
        print("device outputs (no guarantee covers the local head; not judged): " + "; ".join(v["device_outputs"]))
