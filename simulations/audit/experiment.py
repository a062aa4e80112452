"""The empirical privacy audit: one federated run with canaries planted, then three attacks.

:func:`run_audit` does, for one configuration (DP on or off):

1. **Plant.** Users come from the Shakespeare corpus as in any run. Each user's data is written
   to a deployment-style data folder (``<state-dir>/<run>/_data/<user>/data.jsonl``) with its
   canaries placed where the device's own train/held-out split puts training examples:
   random-word canaries for the one-run audit (``m`` of them, spread over the users, each
   planted with probability 1/2) and secret canaries for exposure (a few users, each secret
   repeated). Nothing in the device code knows about canaries.
2. **Train.** The real ServerApp loop (:func:`fedpersona.server.federation.run_federation`) drives the
   real ClientApp (mods included, so the inventory is recorded) through
   :class:`fedpersona.simulations.inprocess.InProcessGrid`: DP-SGD, ledgers, personal heads, checkpoints
   and the final evaluation are exactly those of a simulation.
3. **Attack** what the devices released and what they keep:

   * one-run audits (:mod:`fedpersona.privacy.audit.fdp`, judged; :mod:`fedpersona.privacy.audit.onerun`, reported beside it) of
     the last checkpoint's shared adapter (score: base-model loss minus its loss on each random-word
     canary), of each device's own releases (white-box, :func:`_alignment_scores`: the cosine of every
     update the device sent with the canary's negative gradient at the adapter it received, summed over
     its rounds; the auditor records them with a subclass of the real Device, the device code unchanged)
     and of each user's personalized model (shared adapter + that device's personal head); each bound
     beside its ceiling and the theoretical epsilon it is judged against (the canary owners' ledgers;
     none for a local head);
   * exposure (:mod:`fedpersona.privacy.audit.canary`) of each planted secret, and of control secrets
     never planted (the chance level);
   * membership inference (:mod:`fedpersona.privacy.audit.mia`) on each user's real training examples vs
     its held-out examples: loss and base-calibrated attacks on the shared adapter and the
     personalized model, and the personal head alone (calibrated against the shared adapter).

4. **Verdict** (:func:`fedpersona.privacy.audit.empirical.verdict`). A *violation* is a lower bound on something
   a guarantee covers above its epsilon (a broken guarantee or accountant). *Leakage detected* means
   some attack on such a model is above chance at 95%; what a local head reveals is reported as the
   device's own outputs, never judged. With ``reference_epsilon`` (the epsilon of a DP run of the same
   configuration) the result also says whether this run's bound exceeds it, i.e. whether the audit can
   tell this run from a ``reference_epsilon``-DP one.

Results go to ``<run dir>/audit/empirical.json``; ``fedpersona audit <run dir>`` puts them in the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedpersona.client.app as client_app
from fedpersona.client.data import encode_examples, split_examples
from fedpersona.client.device import Device
from fedpersona.client.node_data import SIMULATED, slug
from fedpersona.client.train import CachedExample
from fedpersona.config import load_config
from fedpersona.identity import ROOT_KEY_FILE, provision
from fedpersona.model import IGNORE, adapted_model, collate, labels_for, lower_hidden, resolve_model_dir
from fedpersona.privacy.audit.canary import SECRET_CUE, exposure, random_secrets, secret_reply, word_canaries, word_pool
from fedpersona.privacy.audit.empirical import EMPIRICAL_FILE, VERSION, head_mode, verdict
from fedpersona.privacy.audit.mia import attack_summary
from fedpersona.privacy.audit.fdp import fdp_one_run_audit
from fedpersona.privacy.audit.onerun import one_run_audit
from fedpersona.privacy.budget import composed
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.server.checkpoint import latest_checkpoint
from fedpersona.server.federation import run_federation
from fedpersona.simulations.sources import load_source
from fedpersona.simulations.user_table import attach_user_table
from fedpersona.simulations.inprocess import InProcessGrid

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class AuditSettings:
    """What the audit plants and how it attacks (independent of the federation's config)."""

    onerun_canaries: int = 64  # m: random-word canaries, each planted with probability 1/2
    exposure_users: int = 2  # users that get secret canaries
    exposure_secrets: int = 1  # secrets per such user
    exposure_repeats: int = 8  # copies of each secret in that user's data
    secret_digits: int = 6  # secret space 10^digits
    candidates: int = 256  # random secrets to rank a canary against
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.onerun_canaries < 4:
            raise ValueError(f"Invalid audit setting 'onerun_canaries': must be at least 4. You passed: {self.onerun_canaries}")
        if self.exposure_users < 0 or self.exposure_secrets < 0 or self.exposure_repeats < 1:
            raise ValueError("Invalid audit setting: exposure_users, exposure_secrets >= 0 and exposure_repeats >= 1. "
                             f"You passed: {self.exposure_users}, {self.exposure_secrets}, {self.exposure_repeats}")
        if not 3 <= self.secret_digits <= 12:
            raise ValueError(f"Invalid audit setting 'secret_digits': must be in [3, 12]. You passed: {self.secret_digits}")
        if self.candidates < 16:
            raise ValueError(f"Invalid audit setting 'candidates': must be at least 16. You passed: {self.candidates}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"Invalid audit setting 'confidence': must be in (0.5, 1). You passed: {self.confidence}")
        tests = 2 * self.exposure_users * self.exposure_secrets
        if tests and self.candidates + 1 <= tests / (1 - self.confidence):
            raise ValueError(
                f"Invalid audit setting 'candidates': with {tests} exposure tests, exposure can only be shown above "
                f"chance with more than {math.ceil(tests / (1 - self.confidence)) - 1} candidates. You passed: {self.candidates}")


# ----------------------------------------------------------------------------- planting
@dataclass
class _UserPlan:
    node_id: int
    user_id: str
    data_dir: Path
    state_dir: Path
    n_real: int
    train_positions: list[int]  # file positions that the device's split puts in train, in order
    planted_positions: set[int]


def _plant(flat: dict, cfg, settings: AuditSettings, model, state_root: Path) -> tuple[dict, list[_UserPlan], dict]:
    rng = np.random.default_rng(settings.seed)
    users = load_source(cfg.data, cfg.run.seed)
    if cfg.server.clients_per_round > len(users):
        raise ValueError(f"Invalid config value for 'server.clients-per-round': only {len(users)} users qualify. "
                         f"You passed: {cfg.server.clients_per_round}")
    if settings.exposure_users > len(users):
        raise ValueError(f"Invalid audit setting 'exposure_users': only {len(users)} users. You passed: {settings.exposure_users}")
    m = settings.onerun_canaries
    words = word_canaries(rng, word_pool(model.tokenizer), m)
    included = rng.random(m) < 0.5
    owners = [i % len(users) for i in range(m)]
    n_secrets = settings.exposure_users * settings.exposure_secrets
    secrets = random_secrets(rng, n_secrets, digits=settings.secret_digits)
    secret_owner = [j // max(1, settings.exposure_secrets) for j in range(n_secrets)]
    controls = random_secrets(rng, max(n_secrets, 4), digits=settings.secret_digits, exclude=secrets)
    candidates = random_secrets(rng, settings.candidates, digits=settings.secret_digits, exclude=secrets + controls)

    plans, largest = [], 0
    for u, user in enumerate(users):
        real = [(e.cue, e.reply) for e in user.examples]
        if len(real) > cfg.data.max_examples:
            keep = sorted(rng.choice(len(real), cfg.data.max_examples, replace=False).tolist())
            real = [real[i] for i in keep]
        planted = [words[i] for i in range(m) if owners[i] == u and included[i]]
        planted += [(SECRET_CUE, secret_reply(s)) for s, o in zip(secrets, secret_owner) if o == u
                    for _ in range(settings.exposure_repeats)]
        n = len(real) + len(planted)
        train_idx, _ = split_examples(list(range(n)), eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed,
                                      key=user.user_id)
        if len(train_idx) < len(planted) + 2:
            raise ValueError(f"user {user.user_id!r}: {len(planted)} canaries do not fit in {len(train_idx)} training "
                             "slots; plant fewer canaries or raise data.max-examples")
        positions = set(rng.choice(train_idx, len(planted), replace=False).tolist())
        slots: list[tuple[str, str]] = []
        it_real, it_planted = iter(real), iter(planted)
        for pos in range(n):
            slots.append(next(it_planted) if pos in positions else next(it_real))
        data_dir = state_root / "_data" / slug(user.user_id)
        data_dir.mkdir(parents=True, exist_ok=True)
        with (data_dir / "data.jsonl").open("w") as fh:
            for cue, reply in slots:
                fh.write(json.dumps({"cue": cue, "reply": reply}) + "\n")
        plans.append(_UserPlan(u, user.user_id, data_dir, state_root / slug(user.user_id), len(real), sorted(train_idx),
                               positions))
        largest = max(largest, n)
    flat = dict(flat, **{"data.max-examples": largest})  # every planted example is kept
    plants = {"words": words, "included": included.tolist(), "owners": owners, "secrets": secrets,
              "secret_owner": secret_owner, "controls": controls, "candidates": candidates}
    return flat, plans, plants


# ----------------------------------------------------------------------------- scoring
def _cache(model, cfg, pairs):
    enc = encode_examples(model.tokenizer, pairs, seq_len=cfg.model.seq_len, cue_tokens=cfg.model.cue_tokens)
    hiddens = lower_hidden(model, [e.input_ids for e in enc])
    return [CachedExample(h, tuple(labels_for(e.input_ids, e.target_mask))) for h, e in zip(hiddens, enc)]


@torch.no_grad()
def _losses(model, examples, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(summed loss, target tokens) per example under the model as it stands."""
    sums, counts = [], []
    model.stack.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        hidden, labels = collate([e.hidden for e in chunk], [e.labels for e in chunk])
        per = model.stack(hidden, labels)
        cnt = (labels != IGNORE).sum(dim=1)
        sums.append((per * cnt).double().numpy())
        counts.append(cnt.numpy())
    if not sums:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(sums), np.concatenate(counts).astype(float)


def _mean(loss: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return loss[0] / np.maximum(loss[1], 1)


def _device_for(cfg, plan: _UserPlan, run_id: int):
    node_config = {"data-dir": str(plan.data_dir), "state-dir": str(plan.state_dir), "user-id": plan.user_id}
    return client_app._DEVICES.get((run_id, plan.node_id)) or Device(cfg, node_config)


def _ledger_epsilon(store, delta: float, *, dp: bool, head: bool = False) -> tuple[float, int]:
    """(epsilon, DP steps) of a device's ledger (``head``: composed with its head's ledger); infinite when DP-SGD
    was off."""
    ledgers = [PrivacyLedger.from_json(t) for t in (store.load_text(n) for n in (("ledger", "ledger-head") if head
                                                                                else ("ledger",))) if t is not None]
    ledger = composed(ledgers) if ledgers else None
    steps = ledger.total_steps if ledger is not None else 0
    if not dp:
        return math.inf, steps
    return (ledger.epsilon(delta) if ledger is not None else 0.0), steps


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------------------- the audit
def run_audit(
    flat: dict[str, Any],
    *,
    dp: bool,
    settings: AuditSettings = AuditSettings(),
    reference_epsilon: float | None = None,
    force: bool = False,
) -> dict:
    """Plant, train, attack; write ``<run dir>/audit/empirical.json`` and return its content.

    ``flat``: flat config keys (a scenario plus overrides); ``privacy.enabled`` is set from ``dp``.
    An existing run folder or device state of the same name is refused unless ``force`` (then both
    are deleted first: an audit needs a fresh run and fresh ledgers).
    """
    t0 = time.perf_counter()
    flat = dict(flat, **{"privacy.enabled": bool(dp)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    run_dir = Path(cfg.run.results_dir).resolve() / cfg.run.name
    state_root = Path(cfg.run.state_dir).resolve() / cfg.run.name
    flat["run.results-dir"], flat["run.state-dir"] = str(run_dir.parent), str(state_root.parent)
    for folder in (run_dir, state_root):
        if folder.exists():
            if not force:
                raise ValueError(f"{folder} exists: an audit needs a fresh run and fresh device ledgers. "
                                 "Pick another run.name or pass --force to delete it")
            shutil.rmtree(folder)
    resolve_model_dir(cfg.model.path)
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    flat, plans, plants = _plant(flat, cfg, settings, model, state_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(flat, env=False)
    logger.info("Audit run '%s' (DP %s): %d users, %d one-run canaries (%d planted), %d secret(s) x %d copies",
                cfg.run.name, "on" if dp else "OFF", len(plans), len(plants["words"]), sum(plants["included"]),
                len(plants["secrets"]), settings.exposure_repeats)

    run_id = int(hashlib.sha256(f"audit:{run_dir}".encode()).hexdigest()[:12], 16)
    # The DP-off side of the audit is a non-private run the user asked for: its devices' own policy must allow it.
    nopriv = {} if dp else {"policy.allow-no-dp": True}
    nodes = {p.node_id: {"data-dir": str(p.data_dir), "state-dir": str(p.state_dir), "user-id": p.user_id, **nopriv}
             for p in plans}
    # The simulated devices' identities under a run-level root (secure aggregation with bound keys, as deployed).
    provision([p.state_dir for p in plans], state_root / SIMULATED / ROOT_KEY_FILE)
    t_train = time.perf_counter()
    releases: dict[str, list] = {}
    built = client_app.Device
    client_app.Device = _recording_device(releases)  # the auditor watches what each device releases
    try:
        with InProcessGrid(client_app.app, nodes, flat, run_id=run_id) as grid:
            run_metrics = run_federation(grid, cfg)
        attach_user_table(run_dir, run_metrics, [p.state_dir for p in plans])
        train_seconds = time.perf_counter() - t_train
        failures = sum(r.get("failed", 0) for r in run_metrics.get("rounds", []))
        if failures:
            raise RuntimeError(f"{failures} client failure(s) in the audit run; see the log")
        result = _attack(cfg, settings, model, plans, plants, run_dir, run_id, releases)
    finally:
        client_app.Device = built
        for p in plans:
            client_app._DEVICES.pop((run_id, p.node_id), None)
    result.update({
        "version": VERSION,
        "run": cfg.run.name,
        "dp": bool(dp),
        "settings": asdict(settings),
        "config": cfg.to_flat(),
        "users": [p.user_id for p in plans],
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t0,
    })
    result["verdict"] = verdict(result, reference_epsilon=reference_epsilon)
    path = run_dir / EMPIRICAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(result), indent=1))
    logger.info("Empirical audit written to %s (%.0f s)", path, result["seconds"])
    return result


def _recording_device(releases: dict[str, list]):
    """The real Device, recording each round what it released: the shared adapter it received and the update it
    sent (the auditor's view of one device's DP-SGD outputs, before any sum; the device code is unchanged)."""

    class RecordingDevice(Device):
        def train_round(self, shared, *, server_round):
            update, metrics = super().train_round(shared, server_round=server_round)
            releases.setdefault(self.user_id, []).append(
                ({n: t.detach().float().cpu().clone() for n, t in shared.items()},
                 {n: t.detach().float().cpu().clone() for n, t in update.items()}))
            return update, metrics

    return RecordingDevice


def _alignment_scores(model, rounds: list, canaries: list) -> np.ndarray:
    """Per canary: the sum over the device's rounds of the cosine between the update it sent and the canary's
    negative loss gradient at the shared adapter it received (white-box: what a server that saw the update can
    compute). A canary the device trained on pulls its updates towards that direction."""
    params = model.named_trainable()
    names = list(model.shared_names)
    scores = np.zeros(len(canaries))
    was = [params[n].requires_grad for n in names]
    for n in names:
        params[n].requires_grad_(True)
    try:
        _align(model, params, names, rounds, canaries, scores)
    finally:
        for n, r in zip(names, was):
            params[n].requires_grad_(r)
    return scores


def _align(model, params, names, rounds, canaries, scores) -> None:
    with model.personal_zeroed():
        for received, update in rounds:
            model.load_shared_state(received)
            u = torch.cat([update[n].reshape(-1) for n in names]).double()
            for i, ex in enumerate(canaries):
                hidden, labels = collate([ex.hidden], [ex.labels])
                loss = model.stack(hidden, labels).mean()
                grads = torch.autograd.grad(loss, [params[n] for n in names])
                g = torch.cat([x.reshape(-1) for x in grads]).double().cpu()
                denom = float(g.norm() * u.norm())
                scores[i] += float(-(g @ u)) / denom if denom > 0 else 0.0


def _attack(cfg, settings: AuditSettings, model, plans: list[_UserPlan], plants: dict, run_dir: Path, run_id: int,
            releases: dict[str, list] | None = None) -> dict:
    t0 = time.perf_counter()
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"no checkpoint in {run_dir / 'checkpoints'}: the audit run did not finish a round")
    _, shared, _ = ckpt
    delta = cfg.privacy.delta

    # Examples: members (real training examples), non-members (held-out), canaries, candidates.
    devices, members, nonmembers, heads, eps, head_eps = {}, {}, {}, {}, {}, {}
    for p in plans:
        dev = _device_for(cfg, p, run_id)
        devices[p.node_id] = dev
        if len(dev.data.train) != len(p.train_positions):
            raise RuntimeError(f"{p.user_id}: the device holds {len(dev.data.train)} training examples, the plan "
                               f"{len(p.train_positions)}; the split is not the one planned")
        members[p.node_id] = [ex for ex, pos in zip(dev.data.train, p.train_positions) if pos not in p.planted_positions]
        nonmembers[p.node_id] = list(dev.data.held_out)
        heads[p.node_id] = dev.store.load_tensors("personal") or model.fresh_personal_state()
        eps[p.node_id] = _ledger_epsilon(dev.store, delta, dp=cfg.privacy.enabled)
        head_eps[p.node_id] = _ledger_epsilon(dev.store, delta, dp=cfg.privacy.enabled, head=True)
    words = _cache(model, cfg, plants["words"])
    secret_pairs = [(SECRET_CUE, secret_reply(s)) for s in plants["secrets"] + plants["controls"] + plants["candidates"]]
    secret_ex = _cache(model, cfg, secret_pairs)
    n_s, n_c = len(plants["secrets"]), len(plants["controls"])

    # Losses under the base model, the shared adapter alone, and each user's personalized model.
    loss: dict[str, dict] = {"base": {}, "shared": {}, "personal": {}}
    with model.adapters_disabled():
        loss["base"]["words"] = _losses(model, words)
        for nid in devices:
            loss["base"][("mem", nid)] = _losses(model, members[nid])
            loss["base"][("non", nid)] = _losses(model, nonmembers[nid])
    model.load_shared_state(shared)
    model.load_personal_state(model.fresh_personal_state())
    with model.personal_zeroed():
        loss["shared"]["words"] = _losses(model, words)
        loss["shared"]["secrets"] = _losses(model, secret_ex)
        for nid in devices:
            loss["shared"][("mem", nid)] = _losses(model, members[nid])
            loss["shared"][("non", nid)] = _losses(model, nonmembers[nid])
    owners = np.asarray(plants["owners"])
    pers_words = np.zeros(len(words))
    exposure_users = sorted(set(plants["secret_owner"]))
    for nid in devices:
        model.load_personal_state(heads[nid])
        mine = [i for i in range(len(words)) if owners[i] == nid]
        if mine:
            pers_words[mine] = _mean(_losses(model, [words[i] for i in mine]))
        loss["personal"][("mem", nid)] = _losses(model, members[nid])
        loss["personal"][("non", nid)] = _losses(model, nonmembers[nid])
        if nid in exposure_users:
            loss["personal"][("secrets", nid)] = _losses(model, secret_ex)
    model.load_personal_state(model.fresh_personal_state())
    # Each device's releases (every update it sent), against its own canaries: the gradient-alignment score.
    release_scores = None
    if releases and all(p.user_id in releases for p in plans):
        release_scores = np.zeros(len(words))
        for p in plans:
            mine = [i for i in range(len(words)) if owners[i] == p.node_id]
            if mine:
                release_scores[mine] = _alignment_scores(model, releases[p.user_id], [words[i] for i in mine])
        model.load_shared_state(shared)

    # Theoretical epsilon: the canary owners' ledgers (DP-SGD is per record of each device). The released shared
    # adapter is covered by the federated ledger; the personalized model by nothing with a local head (the
    # default: no verdict, what the device's own outputs reveal), by the composition of the federated and the
    # head's ledgers with a DP head, and by the one DP pass with split fedsa (the head is inside it).
    per_user_eps = {p.user_id: _finite(eps[p.node_id][0]) for p in plans}
    owner_ids = set(owners.tolist()) | set(exposure_users)
    theory = max((eps[n][0] for n in owner_ids), default=math.inf)
    head = head_mode(cfg.adapter.split, cfg.privacy.personal_head)
    theory_personal = {"local": None, "dp": max((head_eps[n][0] for n in owner_ids), default=math.inf),
                       "in-shared": theory}[head]

    # One-run audit: the f-DP bound with Gaussian curves (judged) and Steinke et al.'s (no assumption, reported).
    included = np.asarray(plants["included"], dtype=bool)
    base_words = _mean(loss["base"]["words"])
    one_run = {}
    targets = [("shared", base_words - _mean(loss["shared"]["words"]), theory)]
    if release_scores is not None:
        targets.append(("device-release", release_scores, theory))
    targets.append(("personalized", base_words - pers_words, theory_personal))
    for target, scores, th in targets:
        # The f-DP bound (Gaussian curves) is the one judged; Steinke et al.'s, which assumes no curve, is reported
        # beside it (each at the full confidence: only the first enters the verdict).
        res = one_run_audit(scores, included, delta=delta, confidence=settings.confidence).to_dict()
        fdp = fdp_one_run_audit(scores, included, delta=delta, confidence=settings.confidence).to_dict()
        judged = th is not None
        res.update(steinke_epsilon_lower_bound=res["epsilon_lower_bound"], steinke_ceiling=res["ceiling"], fdp=fdp,
                   confidence=settings.confidence,
                   epsilon_lower_bound=fdp["epsilon_lower_bound"], ceiling=fdp["ceiling"], judged=judged,
                   theoretical_epsilon=_finite(th) if judged else None, scores=scores.tolist(),
                   included=included.tolist())
        res["violation"] = bool(judged and res["epsilon_lower_bound"] > th + 1e-9)
        one_run[target] = res

    # Exposure of the planted secrets and of the never-planted controls.
    space = 10**settings.secret_digits
    tests = max(1, 2 * n_s)
    threshold = math.log2(tests / (1 - settings.confidence))

    def exposures(logppl: np.ndarray) -> tuple[list[dict], list[dict]]:
        cand = logppl[n_s + n_c:]
        return ([exposure(x, cand, space=space) for x in logppl[:n_s]],
                [exposure(x, cand, space=space) for x in logppl[n_s:n_s + n_c]])

    shared_exp, shared_ctl = exposures(loss["shared"]["secrets"][0])
    canaries, controls_personal = [], []
    for j, (secret, owner) in enumerate(zip(plants["secrets"], plants["secret_owner"])):
        pers_exp, pers_ctl = exposures(loss["personal"][("secrets", owner)][0])
        canaries.append({"user": plans[owner].user_id, "secret": secret, "repeats": settings.exposure_repeats,
                         "shared": shared_exp[j], "personalized": pers_exp[j]})
        if not controls_personal:
            controls_personal = pers_ctl
    exposure_result = {
        "space": space, "candidates": len(plants["candidates"]), "threshold": threshold, "tests": tests,
        "canaries": canaries, "controls": {"shared": shared_ctl, "personalized": controls_personal},
        "above_chance": {t: any(c[t]["exposure"] > threshold for c in canaries) for t in ("shared", "personalized")},
    }

    # Membership inference on real examples.
    def pooled(state_a: str, state_b: str | None) -> tuple[list[float], list[float]]:
        mem, non = [], []
        for nid in devices:
            for kind, out in (("mem", mem), ("non", non)):
                attacked = _mean(loss[state_a][(kind, nid)])
                ref = _mean(loss[state_b][(kind, nid)]) if state_b else 0.0
                out.extend((ref - attacked).tolist())
        return mem, non

    attacks = {
        "shared/loss": ("shared", None), "shared/calibrated": ("shared", "base"),
        "personalized/loss": ("personal", None), "personalized/calibrated": ("personal", "base"),
        "personal-head/calibrated": ("personal", "shared"),
    }
    mia = {}
    for name, (a, b) in attacks.items():
        mem, non = pooled(a, b)
        mia[name] = {**attack_summary(mem, non), "member_scores": mem, "nonmember_scores": non}
    return {
        "theoretical": {"epsilon_max": _finite(theory), "per_user": per_user_eps, "delta": delta,
                        "accountant": cfg.privacy.accountant, "personal_head": head,
                        "personalized_epsilon_max": _finite(theory_personal) if theory_personal is not None else None},
        "one_run": one_run,
        "exposure": exposure_result,
        "mia": mia,
        "attack_seconds": time.perf_counter() - t0,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x
