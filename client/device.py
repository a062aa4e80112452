"""One user's device: its data, its state folder, and what it does in a round.

The device keeps, in its own state folder (never in a message):

* ``personal`` — the personal head (tensors of the personal adapter),
* ``ledger`` — the privacy ledger: every DP-SGD step it ever took,
* ``local-baseline`` / ``ledger-local-baseline`` — the local-only model used
  for evaluation in simulations, with its own ledger,
* ``shared-received`` / ``shared-received-config`` — the shared adapter (and run config) of the
  last round, for ``fedpersona chat`` on the device,
* ``feedback`` / ``feedback-used`` / ``profile`` — chat feedback that grows the training set and
  the user's profile (:mod:`client.feedback`, :mod:`client.profile`).

What leaves the device in a round is built by :meth:`Device.train_round`: the
change of the *shared* adapter tensors (times the example weight), the weight,
and summable metrics. Nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from client.data import encode_examples, read_user_folder, split_examples
from client.feedback import noise_for_remaining_budget, pairs_of, training_feedback
from client.profile import compute_profile, save_profile
from client.store import DeviceStore
from client.train import CachedExample, evaluate, trainer_for
from fedpersona.config import Config
from fedpersona.model import AdaptedModel, adapted_model, labels_for, lower_hidden
from privacy.ledger import PrivacyLedger, calibrate_noise

logger = logging.getLogger(__name__)

LEDGER = "ledger"
PERSONAL = "personal"
BASELINE = "local-baseline"
BASELINE_LEDGER = "ledger-local-baseline"
RECEIVED_SHARED = "shared-received"
RECEIVED_CONFIG = "shared-received-config"


class BudgetExhausted(RuntimeError):
    """The next round would take the device past its privacy budget."""


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (s or "user")[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:6]


@dataclass
class UserData:
    user_id: str
    train: list[CachedExample]
    held_out: list[CachedExample]


def prepare_user(model: AdaptedModel, cfg: Config, user_id: str, pairs: list[tuple[str, str]]) -> UserData:
    """Cap, split, tokenize, and run the frozen lower blocks once per example."""
    if len(pairs) < 2:
        raise ValueError(f"User {user_id!r} has only {len(pairs)} example(s); at least 2 are needed")
    if len(pairs) > cfg.data.max_examples:
        gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{cfg.run.seed}:{user_id}".encode()).hexdigest()[:15], 16))
        keep = sorted(torch.randperm(len(pairs), generator=gen)[: cfg.data.max_examples].tolist())
        pairs = [pairs[i] for i in keep]
    train_pairs, held_pairs = split_examples(pairs, eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed, key=user_id)
    if cfg.privacy.enabled and cfg.privacy.delta >= 1.0 / len(train_pairs):
        raise ValueError(
            f"Invalid config value for 'privacy.delta': must be below 1/number-of-examples = "
            f"1/{len(train_pairs)} for user {user_id!r}. You passed: {cfg.privacy.delta}"
        )

    return UserData(user_id, cache_examples(model, cfg, train_pairs), cache_examples(model, cfg, held_pairs))


def cache_examples(model: AdaptedModel, cfg: Config, pairs: list[tuple[str, str]]) -> list[CachedExample]:
    """Tokenize (cue, reply) pairs and run the frozen lower blocks once per example."""
    enc = encode_examples(model.tokenizer, pairs, seq_len=cfg.model.seq_len, cue_tokens=cfg.model.cue_tokens)
    hiddens = lower_hidden(model, [e.input_ids for e in enc])
    return [CachedExample(h, tuple(labels_for(e.input_ids, e.target_mask))) for h, e in zip(hiddens, enc)]


def load_pairs_for_node(cfg: Config, node_config: dict) -> tuple[str, list[tuple[str, str]], Path]:
    """(user id, (cue, reply) pairs, state folder) for this node: simulation or deployment."""
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        user_id = str(node_config.get("user-id", data_dir.name))
        state_dir = Path(str(node_config.get("state-dir", data_dir / ".fedpersona-state"))).expanduser()
        return user_id, read_user_folder(data_dir), state_dir
    if "partition-id" not in node_config:
        raise ValueError("node config needs 'data-dir' (deployment) or 'partition-id' (simulation)")
    from simulations.corpus import load_users

    users = load_users(min_speeches=cfg.data.min_speeches, max_users=cfg.data.max_users, seed=cfg.run.seed)
    pid = int(node_config["partition-id"])
    if not 0 <= pid < len(users):
        raise ValueError(f"partition-id {pid} has no user: the corpus gives {len(users)} users")
    user = users[pid]
    pairs = [(e.cue, e.reply) for e in user.examples]
    return user.user_id, pairs, simulated_state_dir(cfg, user.user_id)


def simulated_state_dir(cfg: Config, user_id: str) -> Path:
    """A simulated device's state folder: ``<run.state-dir>/<run.name>/<user slug>``."""
    return Path(cfg.run.state_dir) / cfg.run.name / slug(user_id)


def state_dir_for(cfg: Config, node_config: dict) -> Path:
    """The node's state folder, without reading its data (deployment: ``state-dir``; simulation: by user)."""
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        return Path(str(node_config.get("state-dir", data_dir / ".fedpersona-state"))).expanduser()
    from simulations.corpus import load_users

    users = load_users(min_speeches=cfg.data.min_speeches, max_users=cfg.data.max_users, seed=cfg.run.seed)
    return simulated_state_dir(cfg, users[int(node_config["partition-id"])].user_id)


@functools.lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Noise for a budget spread over the planned steps (devices with equal data sizes share the result)."""
    return calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


class Device:
    """The device-side logic; built once per (process, node) and cached by the ClientApp."""

    def __init__(self, cfg: Config, node_config: dict) -> None:
        self.cfg = cfg
        self.model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed)
        self.trainer = trainer_for(self.model)
        user_id, pairs, state_dir = load_pairs_for_node(cfg, node_config)
        self.store = DeviceStore(state_dir)
        self.data = prepare_user(self.model, cfg, user_id, pairs)
        self.user_id = user_id
        self.pairs = pairs
        self.base_train = list(self.data.train)
        self.feedback_examples = 0
        self._feedback_cache: dict[str, CachedExample] = {}
        n = len(self.data.train)
        self.sample_rate = min(1.0, cfg.client.batch_size / n)
        self.noise_multiplier = self._noise_multiplier()

    # ------------------------------------------------------------ privacy
    def _noise_multiplier(self, ledger: PrivacyLedger | None = None) -> float:
        """Sigma for this round's steps at the current sample rate.

        Calibrated once for all planned steps at a fixed q, as long as every past step had that very
        (sigma, q); after the dataset grew (q changed), the noise is picked so that the ledger's past
        steps composed with the remaining planned steps at the new q stay within the budget.
        """
        p = self.cfg.privacy
        if not p.enabled:
            return 0.0
        if p.noise_multiplier > 0:
            return p.noise_multiplier
        planned = self.cfg.planned_rounds * self.cfg.client.local_steps
        sigma = _calibrated(p.target_epsilon, p.delta, self.sample_rate, planned, p.accountant)
        if ledger is None or all((s, q) == (sigma, self.sample_rate) for s, q, _ in ledger.history):
            return sigma
        remaining = max(self.cfg.client.local_steps, planned - ledger.total_steps)
        adjusted = noise_for_remaining_budget(ledger, target_epsilon=p.target_epsilon, delta=p.delta,
                                              sample_rate=self.sample_rate, remaining_steps=remaining)
        return adjusted if adjusted is not None else sigma  # budget spent: train_round declines

    def _grow_training_set(self, server_round: int, ledger: PrivacyLedger) -> None:
        """The round's training set: the device's data + accepted/edited chat feedback (client.feedback)."""
        fb = training_feedback(self.store, server_round=server_round, max_new=self.cfg.client.max_new_examples)
        new = [e for e in fb if e.id not in self._feedback_cache]
        if new:
            for e, ex in zip(new, cache_examples(self.model, self.cfg, pairs_of(new))):
                self._feedback_cache[e.id] = ex
        self.data = UserData(self.user_id, self.base_train + [self._feedback_cache[e.id] for e in fb], self.data.held_out)
        self.feedback_examples = len(fb)
        self.sample_rate = min(1.0, self.cfg.client.batch_size / len(self.data.train))
        self.noise_multiplier = self._noise_multiplier(ledger)
        save_profile(self.store, compute_profile(self.pairs + pairs_of(fb), tokenizer=self.model.tokenizer).text())

    def load_ledger(self, name: str = LEDGER) -> PrivacyLedger:
        text = self.store.load_text(name)
        if text is None:
            return PrivacyLedger(accountant=self.cfg.privacy.accountant)
        return PrivacyLedger.from_json(text)

    def epsilon(self, ledger: PrivacyLedger) -> float:
        return ledger.epsilon(self.cfg.privacy.delta) if self.cfg.privacy.enabled else math.inf

    # ------------------------------------------------------------- rounds
    def _personal(self) -> dict[str, torch.Tensor]:
        state = self.store.load_tensors(PERSONAL)
        return state if state is not None else self.model.fresh_personal_state()

    def _heldout(self) -> dict[str, float]:
        return evaluate(self.model, self.data.held_out)

    def train_round(self, shared: dict[str, torch.Tensor], *, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train one round; returns (weighted shared update, summable metrics)."""
        cfg = self.cfg
        ledger = self.load_ledger()
        self._grow_training_set(server_round, ledger)
        steps = cfg.client.local_steps
        if cfg.privacy.enabled:
            eps_next = ledger.epsilon_if(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, num_steps=steps,
                delta=cfg.privacy.delta,
            )
            if eps_next > cfg.privacy.target_epsilon * (1 + 1e-9):
                raise BudgetExhausted(
                    f"{self.user_id}: a round of {steps} steps would bring epsilon to {eps_next:.3f} > "
                    f"budget {cfg.privacy.target_epsilon} (spent {self.epsilon(ledger):.3f}); not training"
                )
        self.model.load_shared_state(shared)
        self.store.save_tensors(RECEIVED_SHARED, shared)  # for `fedpersona chat` on the device
        self.store.save_text(RECEIVED_CONFIG, json.dumps(cfg.to_flat(), sort_keys=True))
        self.model.load_personal_state(self._personal())
        metrics: dict[str, float] = {}
        if cfg.eval.per_round:
            with self.model.personal_zeroed():
                metrics["heldout-shared-loss"] = self._heldout()["loss"]
            metrics["heldout-personal-loss"] = self._heldout()["loss"]
        result = self.trainer.train(
            self.data.train, steps=steps, batch_size=cfg.client.batch_size, lr=cfg.client.lr,
            optimizer=cfg.client.optimizer, noise_multiplier=self.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm, dp=cfg.privacy.enabled, ledger=ledger,
        )
        if cfg.privacy.enabled:
            ledger.record_round(
                round=server_round, steps=steps, noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate, delta=cfg.privacy.delta,
            )
        after = self.model.shared_state()
        # Feedback may grow n past data.max-examples: the weight stays capped there (secure sum: n / max <= 1).
        weight = float(min(len(self.data.train), cfg.data.max_examples))
        update = {n: (after[n] - shared[n].to(after[n].dtype)) * weight for n in after}
        # Persist before replying: a lost reply must never hand back privacy budget.
        self.store.save_text(LEDGER, ledger.to_json())
        self.store.save_tensors(PERSONAL, self.model.personal_state())
        eps = self.epsilon(ledger)
        metrics.update(
            {
                "weight": weight,
                "trained": 1.0,
                "train-loss": result.mean_loss if math.isfinite(result.mean_loss) else 0.0,
                "epsilon": eps if math.isfinite(eps) else -1.0,
                "empty-steps": float(result.empty_steps),
                "train-seconds": result.seconds,
            }
        )
        logger.info(
            "%s round %d: %d steps (%d empty) loss %.3f sigma %.3f q %.3f epsilon %.3f in %.1fs",
            self.user_id, server_round, steps, result.empty_steps, result.mean_loss, self.noise_multiplier,
            self.sample_rate, eps, result.seconds,
        )
        return update, metrics

    def final_evaluation(self, shared: dict[str, torch.Tensor]) -> dict[str, float]:
        """Base, shared only, personalized and local-only on the held-out split."""
        cfg = self.cfg
        self.model.load_shared_state(shared)
        self.model.load_personal_state(self._personal())
        out: dict[str, float] = {}
        with self.model.adapters_disabled():
            r = self._heldout()
        out["base-loss"], out["base-accuracy"] = r["loss"], r["accuracy"]
        with self.model.personal_zeroed():
            r = self._heldout()
        out["shared-loss"], out["shared-accuracy"] = r["loss"], r["accuracy"]
        r = self._heldout()
        out["personal-loss"], out["personal-accuracy"] = r["loss"], r["accuracy"]
        ledger = self.load_ledger()
        eps = self.epsilon(ledger)
        out["epsilon"] = eps if math.isfinite(eps) else -1.0
        out["rounds"] = float(len(ledger.rounds)) if cfg.privacy.enabled else float("nan")
        out["steps"] = float(ledger.total_steps)
        out["held-out-examples"] = float(len(self.data.held_out))
        out["train-examples"] = float(len(self.data.train))
        if cfg.eval.local_baseline:
            out.update(self._local_baseline(shared, steps=ledger.total_steps))
        return out

    def _local_baseline(self, shared: dict[str, torch.Tensor], *, steps: int) -> dict[str, float]:
        """Local-only model: the same number of DP steps (hence the same epsilon), no federation."""
        baseline = self.store.load_tensors(BASELINE)
        if baseline is None or int(baseline.get("__steps__", torch.tensor(-1)).item()) != steps:
            init = self.model.fresh_personal_state()
            self.model.load_personal_state(init)
            # The shared adapter starts from the same public initialisation the server used.
            initial = self.model.initial_shared_state()
            self.model.load_shared_state(initial)
            ledger = PrivacyLedger(accountant=self.cfg.privacy.accountant)
            if steps > 0:
                self.trainer.train(
                    self.data.train, steps=steps, batch_size=self.cfg.client.batch_size, lr=self.cfg.client.lr,
                    optimizer=self.cfg.client.optimizer, noise_multiplier=self.noise_multiplier,
                    max_grad_norm=self.cfg.privacy.max_grad_norm, dp=self.cfg.privacy.enabled, ledger=ledger,
                )
            baseline = {f"shared::{k}": v for k, v in self.model.shared_state().items()}
            baseline.update({f"personal::{k}": v for k, v in self.model.personal_state().items()})
            baseline["__steps__"] = torch.tensor(steps)
            self.store.save_tensors(BASELINE, baseline)
            self.store.save_text(BASELINE_LEDGER, ledger.to_json())
        self.model.load_shared_state({k[8:]: v for k, v in baseline.items() if k.startswith("shared::")})
        self.model.load_personal_state({k[10:]: v for k, v in baseline.items() if k.startswith("personal::")})
        r = self._heldout()
        eps_text = self.store.load_text(BASELINE_LEDGER)
        eps = PrivacyLedger.from_json(eps_text).epsilon(self.cfg.privacy.delta) if eps_text else 0.0
        # Leave the federated state loaded again.
        self.model.load_shared_state(shared)
        self.model.load_personal_state(self._personal())
        return {"local-loss": r["loss"], "local-accuracy": r["accuracy"], "local-epsilon": eps if math.isfinite(eps) else -1.0}
