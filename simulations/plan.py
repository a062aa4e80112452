"""``fedpersona plan``: what every user's device will do, before anything trains.

For the scenario (a ``simulations/conf`` file + ``--set``) and the devices' policy (``--device-policy``,
as ``fedpersona run`` gives it to the simulated devices), each user of the source after the filters:

* the examples its device keeps (``data.max-examples``) and trains on (after the held-out split);
* the sample rate ``q = client.batch-size / training examples`` and the noise multiplier sigma, as the
  device picks it (calibrated so that the participations it accepts (``client.max-participations``,
  lowered by ``policy.max-participations``) of ``client.local-steps`` steps, twice with the local-only
  baseline, stay within ``privacy.target-epsilon``, unless ``privacy.noise-multiplier`` fixes it: the
  same call as :meth:`fedpersona.client.device.Device._noise_multiplier` makes);
* the rounds it is sampled in (``server.sampling`` over the run's rounds, as the in-process grid of
  ``fedpersona run`` numbers its nodes) and the DP steps they add up to;
* the epsilon its ledger reaches after them, the epsilon its budget counts (``epsilon-composed``: with the
  local-only baseline's pass), and the budget's worst case (every participation it plans); a round past
  its budget or its participation cap is declined, as the device declines it;
* whether its policy accepts the run's settings at all (:meth:`fedpersona.client.policy.DevicePolicy.check`).

Nothing is loaded but the data: no model, no tokenizer.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

from fedpersona.client.data import split_examples
from fedpersona.client.policy import PREFIX, DevicePolicy, PolicyViolation
from fedpersona.config import Config
from fedpersona.privacy.ledger import PrivacyLedger, calibrate_noise
from fedpersona.server.federation import sample_cohort
from fedpersona.simulations.sources import load_source_report

#: The node ids ``fedpersona run``'s in-process grid gives the users, in partition order (fedpersona.simulations.runner).
FIRST_NODE = 100


def _passes(cfg: Config) -> int:
    """DP passes over a simulated device's records per step: 2 with the local-only baseline (one budget for both
    ledgers, as :attr:`fedpersona.client.device.Device.budget_passes` counts them), else 1."""
    p, e = cfg.privacy, cfg.eval
    return 2 if (p.enabled and e.final and e.local_baseline) else 1


def _noise(cfg: Config, q: float, steps_per_round: int, participations: int) -> float:
    """Sigma as a device picks it: for ``participations * steps_per_round`` steps (times the passes) at rate ``q``."""
    p = cfg.privacy
    if not p.enabled:
        return 0.0
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return _calibrated(p.target_epsilon, p.delta, q, participations * steps_per_round * _passes(cfg), p.accountant)


@functools.lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """Users with as many training examples share one calibration."""
    return calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps,
                           accountant=accountant)


def _spend(cfg: Config, sigma: float, q: float, steps: int, rounds: int, cap: int,
           honest: int | None = None) -> tuple[float, float, int]:
    """(the federated ledger's epsilon after ``rounds`` sampled participations of ``steps`` steps, the epsilon
    the budget counts (with the local-only baseline's pass), rounds declined for the budget or the cap).
    ``honest``: steps on a noisy sum counting on that many honest contributors (integer RDP orders)."""
    p = cfg.privacy
    if not p.enabled:
        return math.inf, math.inf, 0
    ledger = PrivacyLedger(accountant=p.accountant)
    passes = _passes(cfg)
    declined = taken = 0
    for _ in range(rounds):
        nxt = ledger.repeated(passes).epsilon_if(noise_multiplier=sigma, sample_rate=q, num_steps=steps * passes,
                                                 delta=p.delta, on_sum=honest is not None)
        if taken >= cap or nxt > p.target_epsilon * (1 + 1e-9):
            declined += 1
            continue
        if honest is None:
            ledger.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        else:
            ledger.step_on_sum(noise_multiplier=sigma, sample_rate=q, honest=honest, num_steps=steps)
        taken += 1
    return ledger.epsilon(p.delta), ledger.repeated(passes).epsilon(p.delta), declined


def make_plan(scenario: str | None, overrides: dict[str, Any] | None = None, *,
              device_policy: dict[str, Any] | None = None) -> dict:
    """The plan of every user (module docstring) and of the run: ``{"config", "data", "users", "refused", ...}``."""
    from fedpersona.simulations.runner import resolve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a run warns about its settings; the plan shows them
        flat, cfg = resolve(scenario, dict(overrides or {}))
    values = {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in (device_policy or {}).items()}
    policy = DevicePolicy.from_mapping(values, source="--device-policy")
    users, report = load_source_report(cfg.data, cfg.run.seed)
    if cfg.server.clients_per_round > len(users):
        from fedpersona.simulations.runner import _origin, too_few_users

        raise ValueError(too_few_users(report, cfg, origin=_origin("server.clients-per-round", scenario,
                                                                   dict(overrides or {}))))
    from fedpersona.simulations.runner import fill_participations

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = fill_participations(flat, cfg, len(users))  # as the run fills client.max-participations = 0
    nodes = [FIRST_NODE + i for i in range(len(users))]
    sampled = dict.fromkeys(nodes, 0)
    size = cfg.server.clients_per_round
    for r in range(1, cfg.server.num_rounds + 1):
        for n in sample_cohort(nodes, size, seed=cfg.run.seed, server_round=r, sampling=cfg.server.sampling):
            sampled[n] += 1
    p, c = cfg.privacy, cfg.client
    head_dp = p.enabled and p.personal_head == "dp" and cfg.adapter.split != "fedsa" and c.head_steps > 0
    honest = sum_sigma = None
    if p.noise_on == "sum":  # one sigma for every device of a sum (privacy.sumdp), t of the announced cohort
        from fedpersona.privacy.sumdp import honest_contributors, sum_noise_multiplier

        honest = honest_contributors(cfg, min(size, len(users)))
        sum_sigma = sum_noise_multiplier(cfg)
    rows, refused = [], 0
    for node, u in zip(nodes, users):
        kept = min(len(u.examples), cfg.data.max_examples)
        train, held = split_examples(list(range(kept)), eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed,
                                     key=u.user_id)
        n = len(train)
        q = min(1.0, c.batch_size / n)
        cap = policy.participations(cfg)
        sigma = sum_sigma if honest is not None else _noise(cfg, q, c.local_steps, cap)
        row: dict[str, Any] = {"user": u.user_id, "examples": len(u.examples), "train": n, "held-out": len(held),
                               "q": q, "sigma": sigma, "steps-per-round": c.local_steps, "sampled": sampled[node]}
        why = ""
        if p.enabled and p.delta >= 1.0 / n:
            why = f"privacy.delta = {p.delta:g} is not below 1/{n} (its training examples)"
        else:
            try:
                policy.check(cfg, train_examples=n, noise_multiplier=sigma)
            except PolicyViolation as exc:
                why = str(exc)
        if why:
            refused += 1
            row.update({"refused": why, "epsilon": 0.0, "steps": 0, "declined": sampled[node]})
        else:
            eps, composed, declined = _spend(cfg, sigma, q, c.local_steps, sampled[node], cap, honest)
            row.update({"epsilon": eps, "epsilon-composed": composed, "participations-planned": cap,
                        "steps": (sampled[node] - declined) * c.local_steps, "declined": declined,
                        "epsilon-planned": _spend(cfg, sigma, q, c.local_steps, cap, cap, honest)[1]})
            if head_dp:  # the head's own ledger, planned as the device plans it (every planned round)
                hq = min(1.0, c.head_batch_size / n)
                hs = _noise(cfg, hq, c.head_steps, cfg.planned_rounds)
                taken = sampled[node] - declined
                row.update({"head-q": hq, "head-sigma": hs,
                            "head-epsilon": _spend(cfg, hs, hq, c.head_steps, taken, taken)[0]})
        rows.append(row)
    return {"run": cfg.run.name, "config": cfg, "data": report, "users": rows, "refused": refused,
            "head-dp": head_dp, "policy": policy, "honest": honest}


def format_plan(plan: dict) -> str:
    """The plan as text: the run's settings, one row per user, the totals."""
    cfg: Config = plan["config"]
    p, c, s = cfg.privacy, cfg.client, cfg.server
    rows = plan["users"]
    out = [f"plan of run '{plan['run']}': {len(rows)} users, {s.clients_per_round} per round, {s.num_rounds} "
           f"round{'s' if s.num_rounds != 1 else ''} ({s.sampling} sampling), {c.local_steps} DP-SGD steps of expected "
           f"batch {c.batch_size} per round",
           (f"privacy: target epsilon {p.target_epsilon:g} at delta {p.delta:g} per user, planned over "
            f"{cfg.planned_participations} participation(s) a device (client.max-participations), {p.accountant} "
            f"accountant, clip {p.max_grad_norm:g}, "
            + (f"noise once on each step's secure sum, t = {plan['honest']} honest contributors"
               if plan.get("honest") else "noise on each device")
            if p.enabled else "privacy: OFF (privacy.enabled = false): no guarantee"),
           f"personal head: {p.personal_head}" + (", DP-SGD with its own ledger" if plan["head-dp"] else
                                                  ", never leaves the device, no noise")]
    out += plan["data"].lines()
    width = max([len("user")] + [len(r["user"]) for r in rows])
    head = f"{'user':<{width}}  {'examples':>8}  {'train':>5}  {'q':>6}  {'sigma':>6}  {'sampled':>7}  {'steps':>5}  " \
           f"{'epsilon':>7}  {'budget counts':>13}  {'if all planned':>14}"
    if plan["head-dp"]:
        head += f"  {'head sigma':>10}  {'head eps':>8}"
    out += ["", head, "-" * len(head)]
    for r in rows:
        if r.get("refused"):
            out.append(f"{r['user']:<{width}}  {r['examples']:>8}  {r['train']:>5}  {r['q']:>6.3f}  {r['sigma']:>6.3f}  "
                       f"{r['sampled']:>7}  REFUSED: {r['refused']}")
            continue
        declined = f" ({r['declined']} declined)" if r["declined"] else ""
        line = (f"{r['user']:<{width}}  {r['examples']:>8}  {r['train']:>5}  {r['q']:>6.3f}  {r['sigma']:>6.3f}  "
                f"{r['sampled']:>7}  {r['steps']:>5}  {r['epsilon']:>7.2f}  {r['epsilon-composed']:>13.2f}  "
                f"{r['epsilon-planned']:>14.2f}")
        if plan["head-dp"]:
            line += f"  {r['head-sigma']:>10.3f}  {r['head-epsilon']:>8.2f}"
        out.append(line + declined)
    ok = [r for r in rows if not r.get("refused")]
    if ok:
        eps = [r["epsilon-composed"] for r in ok]
        never = sum(1 for r in ok if r["sampled"] == 0)
        out += ["", f"epsilon reached: {min(eps):.2f} to {max(eps):.2f} (budget {p.target_epsilon:g}); "
                    f"{sum(1 for r in ok if r['sampled'])} of {len(rows)} users take part"
                    + (f", {never} never sampled" if never else "")]
    if plan["refused"]:
        out.append(f"{plan['refused']} user(s) would refuse every round: see REFUSED above")
    return "\n".join(out)
