"""One user's device: its data, its state folder, and what it does in a round.

The device keeps, in its own state folder (never in a message):

* ``personal`` — the personal head (tensors of the personal adapter),
* ``ledger`` — the privacy ledger: every DP-SGD step it ever took,
* ``local-baseline`` / ``ledger-local-baseline`` — the local-only model used
  for evaluation in simulations only, with its own ledger (its epsilon is reported beside the
  federated one: it covers the local-only model, which never leaves the device; the federated
  epsilon covers the shared updates the device sent),
* ``evaluation`` — the device's own final-evaluation row (user id and figures); it never leaves
  the device: the server gets only sums (:mod:`privacy.secagg.eval_figures`); a simulation reads
  the rows from the devices' stores on its own machine.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from client.data import encode_examples, read_user_folder, split_examples
from client.node_data import node_data
from client.store import DeviceStore
from client.train import CachedExample, evaluate, trainer_for
from fedpersona.config import Config
from fedpersona.model import AdaptedModel, adapted_model, labels_for, lower_hidden
from privacy.ledger import PrivacyLedger, calibrate_noise

logger = logging.getLogger(__name__)

LEDGER = "ledger"
HEAD_FILE = "personal"
BASELINE = "local-baseline"
BASELINE_LEDGER = "ledger-local-baseline"
EVALUATION = "evaluation"


class BudgetExhausted(RuntimeError):
    """The next round would take the device past its privacy budget."""


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

    def cached(ps):
        enc = encode_examples(model.tokenizer, ps, seq_len=cfg.model.seq_len, cue_tokens=cfg.model.cue_tokens)
        hiddens = lower_hidden(model, [e.input_ids for e in enc])
        return [CachedExample(h, tuple(labels_for(e.input_ids, e.target_mask))) for h, e in zip(hiddens, enc)]

    return UserData(user_id, cached(train_pairs), cached(held_pairs))


def load_pairs_for_node(cfg: Config, node_config: dict) -> tuple[str, list[tuple[str, str]], Path]:
    """(user id, (cue, reply) pairs, state folder) for this node: simulation or deployment (:mod:`client.node_data`)."""
    node = node_data(cfg, node_config)
    return node.user_id, read_user_folder(node.data_dir), node.state_dir


def state_dir_for(cfg: Config, node_config: dict) -> Path:
    """The node's state folder, without reading its data."""
    return node_data(cfg, node_config).state_dir


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
        # A deployment device (its own data folder) never trains the local-only baseline: a second DP
        # model of the same data whose ledger the device's epsilon does not cover.
        self.simulated = "data-dir" not in node_config
        self.data = prepare_user(self.model, cfg, user_id, pairs)
        self.user_id = user_id
        n = len(self.data.train)
        self.sample_rate = min(1.0, cfg.client.batch_size / n)
        self.noise_multiplier = self._noise_multiplier()

    # ------------------------------------------------------------ privacy
    def _noise_multiplier(self) -> float:
        p = self.cfg.privacy
        if not p.enabled:
            return 0.0
        if p.noise_multiplier > 0:
            return p.noise_multiplier
        planned = self.cfg.planned_rounds * self.cfg.client.local_steps
        return _calibrated(p.target_epsilon, p.delta, self.sample_rate, planned, p.accountant)

    def load_ledger(self, name: str = LEDGER) -> PrivacyLedger:
        text = self.store.load_text(name)
        if text is None:
            return PrivacyLedger(accountant=self.cfg.privacy.accountant)
        return PrivacyLedger.from_json(text)

    def epsilon(self, ledger: PrivacyLedger) -> float:
        return ledger.epsilon(self.cfg.privacy.delta) if self.cfg.privacy.enabled else math.inf

    # ------------------------------------------------------------- rounds
    def _personal(self) -> dict[str, torch.Tensor]:
        state = self.store.load_tensors(HEAD_FILE)
        return state if state is not None else self.model.fresh_personal_state()

    def _heldout(self) -> dict[str, float]:
        return evaluate(self.model, self.data.held_out)

    def train_round(self, shared: dict[str, torch.Tensor], *, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train one round; returns (weighted shared update, summable metrics)."""
        cfg = self.cfg
        ledger = self.load_ledger()
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
        weight = float(len(self.data.train))
        update = {n: (after[n] - shared[n].to(after[n].dtype)) * weight for n in after}
        # Persist before replying: a lost reply must never hand back privacy budget.
        self.store.save_text(LEDGER, ledger.to_json())
        self.store.save_tensors(HEAD_FILE, self.model.personal_state())
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

    def final_evaluation(self, shared: dict[str, torch.Tensor], *, run_id: int = 0) -> dict[str, float]:
        """Base, shared only, personalized and (simulation) local-only on the held-out split.

        The row is written to the device's own store (``evaluation``, with the user id); only its
        summable figures are sent (:mod:`privacy.secagg.eval_figures`).
        """
        cfg = self.cfg
        self.model.load_shared_state(shared)
        self.model.load_personal_state(self._personal())
        out: dict[str, float] = {}
        with self.model.adapters_disabled():
            r = self._heldout()
        out["base-loss"], out["base-accuracy"], out["base-tokens"] = r["loss"], r["accuracy"], float(r["tokens"])
        with self.model.personal_zeroed():
            r = self._heldout()
        out["shared-loss"], out["shared-accuracy"], out["shared-tokens"] = r["loss"], r["accuracy"], float(r["tokens"])
        r = self._heldout()
        out["personal-loss"], out["personal-accuracy"] = r["loss"], r["accuracy"]
        out["personal-tokens"] = float(r["tokens"])
        ledger = self.load_ledger()
        eps = self.epsilon(ledger)
        out["epsilon"] = eps if math.isfinite(eps) else -1.0
        out["rounds"] = float(len(ledger.rounds)) if cfg.privacy.enabled else float("nan")
        out["steps"] = float(ledger.total_steps)
        out["held-out-examples"] = float(len(self.data.held_out))
        out["train-examples"] = float(len(self.data.train))
        if cfg.eval.local_baseline:
            if self.simulated:
                out.update(self._local_baseline(shared, steps=ledger.total_steps))
            else:
                logger.warning("eval.local-baseline = true refused: the local-only baseline trains a second DP model "
                               "of this user's data and runs in simulations only")
        row = {"run_id": int(run_id), "user": self.user_id,
               **{k: (v if math.isfinite(v) else None) for k, v in out.items()}}
        self.store.save_text(EVALUATION, json.dumps(row, sort_keys=True))
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
        return {"local-loss": r["loss"], "local-accuracy": r["accuracy"], "local-tokens": float(r["tokens"]),
                "local-epsilon": eps if math.isfinite(eps) else -1.0}
