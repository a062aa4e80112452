"""One user's device: its data, its state folder, and what it does in a round.

The device keeps, in its own state folder (never in a message):

* ``personal`` — the personal head (tensors of the personal adapter, or the soft prompt's offset
  with ``adapter.head = prompt``),
* ``ledger`` — the privacy ledger: every DP-SGD step of the released (shared) pass,
* ``ledger-head`` — with ``privacy.personal-head = dp``: the head's DP-SGD steps,
* ``participation`` — the rounds it trained in and their step counts (what the
  local-only baseline replays),
* ``local-baseline`` / ``ledger-local-baseline`` — the local-only model used
  for evaluation in simulations only, with its own ledger. It is a second DP mechanism on the
  user's records, so one budget covers both: such a device plans its noise and checks every round
  for the two ledgers composed (:attr:`Device.budget_passes`), and its evaluation row's
  ``epsilon`` is their composition (``epsilon-federated``: the shared updates it sent alone;
  ``local-epsilon``: the baseline's),
* ``lower-activations`` — the frozen lower blocks' outputs for the device's examples, keyed by
  the model and the examples (``client.cache-activations``): a device built again (the next
  round, a restart, the final evaluation) reads them instead of running the lower blocks again,
* ``evaluation`` — the device's own final-evaluation row (user id and figures); it never leaves
  the device: the server gets only sums (:mod:`fedpersona.privacy.secagg.eval_figures`); a simulation reads
  the rows from the devices' stores on its own machine,
* ``shared-received`` / ``shared-received-config`` — the shared adapter (and run config) of the
  last round, for ``fedpersona chat`` on the device,
* ``feedback`` / ``feedback-used`` / ``profile`` — chat feedback that grows the training set and
  the user's profile (:mod:`fedpersona.client.feedback`, :mod:`fedpersona.client.profile`).

A round (:meth:`Device.train_round`), Ditto / FedRep style:

1. the shared adapter alone is trained with DP-SGD, the head switched off
   (:func:`fedpersona.client.train.train_shared`): the released update never depends on the head;
2. the head alone is trained on top of the new shared adapter for
   ``client.head-steps`` steps: without noise by default (``privacy.personal-head =
   local``: the head and its outputs stay with its owner, joint DP), or with DP-SGD and
   its own ledger (``dp``). With ``adapter.split = fedsa`` the head (B) is inside the
   shared adapter: A and B are trained together in the one DP pass, one ledger, and
   there is no separate head pass.

What leaves the device in a round: the change of the *shared* adapter tensors (weight 1 for
every device) and the constant ``trained``; at the end, the noised evaluation figures
(:mod:`fedpersona.privacy.secagg.eval_figures`). Every field of every reply, with what covers it:
:data:`fedpersona.privacy.audit.message_table.TABLE`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpersona.client.data import encode_examples, read_user_folder, split_examples
from fedpersona.client.node_data import node_data
from fedpersona.client.policy import DevicePolicy, PolicyViolation
from fedpersona.client.feedback import noise_for_remaining_budget, pairs_of, training_feedback
from fedpersona.client.profile import refresh_profile
from fedpersona.client.store import DeviceStore
from fedpersona.client.sumdp import StepLog, StepRefused, check_context, local_optimizer, local_replay_round
from fedpersona.client.train import (CachedExample, TrainResult, clipped_grad_sum, deadline_after, evaluate, train_head,
                          train_shared, trainer_for)
from fedpersona.secagg_wire import flatten
from fedpersona.config import Config
from fedpersona.model import AdaptedModel, adapted_model, labels_for, lower_hidden
from fedpersona.privacy.budget import composed
from fedpersona.privacy.ledger import PrivacyLedger, calibrate_noise
from fedpersona.privacy.noise import SECURE, NoiseSource
from fedpersona.privacy.sumdp import SumContext, sum_noise_multiplier

logger = logging.getLogger(__name__)

LEDGER = "ledger"
HEAD_FILE = "personal"
HEAD_LEDGER = "ledger-head"
PARTICIPATION = "participation"
ACTIVATIONS = "lower-activations"
BASELINE = "local-baseline"
BASELINE_LEDGER = "ledger-local-baseline"
BASELINE_HEAD_LEDGER = "ledger-local-baseline-head"
RECEIVED_SHARED = "shared-received"
RECEIVED_CONFIG = "shared-received-config"
EVALUATION = "evaluation"
HEAD_AT_END = "head-at-end"  # client.head-at = end: {"run", "round", "steps"} of the head trained at the end


class BudgetExhausted(RuntimeError):
    """The next round would take the device past its privacy budget."""


class RoundTimeExceeded(RuntimeError):
    """The round's DP pass reached the device's wall-time budget (``policy.max-round-seconds``) and was stopped:
    nothing of it is released; the steps it took are in the ledger."""

    public_reason = "stopped: the round went past this device's wall-time budget (policy.max-round-seconds)"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class RoundPlan:
    """What a round will train, decided before anything is trained (:meth:`Device.plan_round`).

    ``ledger`` / ``head_ledger``: the device's ledgers as loaded for the round (not yet stepped);
    ``shared`` / ``personal``: the state the round starts from. :attr:`key` names the plan:
    a result trained for another key is never used.
    """

    server_round: int
    shared_digest: str
    personal_digest: str
    train_examples: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    head_steps: int
    head_noise_multiplier: float
    head_sample_rate: float
    settings: dict
    ledger: PrivacyLedger
    head_ledger: PrivacyLedger | None
    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]

    @property
    def key(self) -> tuple:
        return (self.server_round, self.shared_digest, self.personal_digest, self.train_examples, self.steps,
                self.noise_multiplier, self.sample_rate, self.head_steps, self.head_noise_multiplier,
                self.head_sample_rate)


@dataclass
class UserData:
    user_id: str
    train: list[CachedExample]
    held_out: list[CachedExample]


def _check_delta(cfg: Config, user_id: str, n_train: int) -> None:
    if cfg.privacy.enabled and cfg.privacy.delta >= 1.0 / n_train:
        # The device's own log may say how many examples it holds; the reply to the server does not.
        logger.warning("privacy.delta = %g is not below 1/%d (this device's training examples): refusing",
                       cfg.privacy.delta, n_train)
        raise PolicyViolation("privacy.delta", cfg.privacy.delta, "must be below 1/(this device's training examples)")


def kept_pairs(cfg: Config, user_id: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The user's examples the device keeps: all, or a subset of ``data.max-examples`` seeded by (seed, user)."""
    if len(pairs) <= cfg.data.max_examples:
        return list(pairs)
    gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{cfg.run.seed}:{user_id}".encode()).hexdigest()[:15], 16))
    keep = sorted(torch.randperm(len(pairs), generator=gen)[: cfg.data.max_examples].tolist())
    return [pairs[i] for i in keep]


def prepare_user(model: AdaptedModel, cfg: Config, user_id: str, pairs: list[tuple[str, str]], *,
                 store: DeviceStore | None = None) -> UserData:
    """Cap, split, tokenize, and run the frozen lower blocks once per example.

    With a ``store`` (and ``client.cache-activations``), the lower blocks' outputs are kept in
    the device's encrypted store (:data:`ACTIVATIONS`) and read back the next time the device is
    built for the same model, layout and examples, instead of being computed again.
    """
    return prepare_users(model, cfg, [(user_id, pairs, store)])[0]  # type: ignore[return-value]


@dataclass
class _Staged:
    user_id: str
    enc: dict[str, list]
    seqs: dict[str, list[list[int]]]
    store: DeviceStore | None
    key: str
    hiddens: dict[str, list[torch.Tensor]] | None


def prepare_users(model: AdaptedModel, cfg: Config,
                  users: Sequence[tuple[str, list[tuple[str, str]], DeviceStore | None]], *,
                  batch_size: int = 16, skip_failed: bool = False) -> list[UserData | None]:
    """:func:`prepare_user` for several ``(user id, pairs, store)`` at once, in their order.

    The examples whose lower-block outputs no store holds run through the frozen blocks in one sweep
    (batches of ``batch_size`` across the users, sorted by length; a causal model with right padding
    gives each example the outputs it gets alone, up to float rounding): a simulation builds a
    cohort's devices together instead of paying a small forward pass per device and split.
    ``skip_failed``: a user whose examples cannot be prepared (too few, a delta the data does not
    allow, a store that cannot be read or was rolled back) gets ``None`` instead of failing the others;
    the device meets the same error when built.
    """
    staged: list[_Staged | None] = []
    for user_id, pairs, store in users:
        try:
            staged.append(_stage(model, cfg, user_id, pairs, store))
        except Exception as exc:  # noqa: BLE001 - with skip_failed, one user's failure is that user's alone
            if not skip_failed:
                raise
            logger.debug("%s not prepared: %s: %s", user_id, type(exc).__name__, exc)
            staged.append(None)
    todo = [s for s in staged if s is not None and s.hiddens is None]
    flat = [seq for s in todo for part in _PARTS for seq in s.seqs[part]]
    out = iter(lower_hidden(model, flat, batch_size=batch_size) if flat else [])
    for s in todo:
        s.hiddens = {part: [next(out) for _ in s.seqs[part]] for part in _PARTS}
        if s.key:
            _store_activations(model, s.store, s.key, s.hiddens)
    return [None if s is None else UserData(s.user_id, *(_with_labels(s.hiddens[p], s.enc[p]) for p in _PARTS))
            for s in staged]


_PARTS = ("train", "held-out")


def _stage(model: AdaptedModel, cfg: Config, user_id: str, pairs: list[tuple[str, str]],
           store: DeviceStore | None) -> _Staged:
    """One user's examples capped, split and tokenized, and their lower-block outputs when its store holds them."""
    if len(pairs) < 2:
        raise ValueError(f"User {user_id!r} has only {len(pairs)} example(s); at least 2 are needed")
    pairs = kept_pairs(cfg, user_id, pairs)
    train_pairs, held_pairs = split_examples(pairs, eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed, key=user_id)
    _check_delta(cfg, user_id, len(train_pairs))
    both = encode_examples(model.tokenizer, train_pairs + held_pairs, seq_len=cfg.model.seq_len,
                           cue_tokens=cfg.model.cue_tokens)  # one pass of the tokenizer over both splits
    enc = {"train": both[:len(train_pairs)], "held-out": both[len(train_pairs):]}
    seqs = {part: [e.input_ids for e in es] for part, es in enc.items()}
    kept = store is not None and cfg.client.cache_activations
    key = _activations_key(model, seqs) if kept else ""
    hiddens = _stored_activations(model, store, seqs, key) if kept else None
    return _Staged(user_id, enc, seqs, store, key, hiddens)


def cache_examples(model: AdaptedModel, cfg: Config, pairs: list[tuple[str, str]]) -> list[CachedExample]:
    """Tokenize (cue, reply) pairs and run the frozen lower blocks once per example."""
    enc = encode_examples(model.tokenizer, pairs, seq_len=cfg.model.seq_len, cue_tokens=cfg.model.cue_tokens)
    return _with_labels(lower_hidden(model, [e.input_ids for e in enc]), enc)


def _with_labels(hiddens: list[torch.Tensor], enc: list) -> list[CachedExample]:
    return [CachedExample(h, tuple(labels_for(e.input_ids, e.target_mask))) for h, e in zip(hiddens, enc)]


def _activations_key(model: AdaptedModel, seqs: dict[str, list[list[int]]]) -> str:
    """What the lower blocks' outputs depend on: the base's weights below the cache boundary (a
    fingerprint), where that boundary is, the dtype, and every example's token ids."""
    lm = model.peft.base_model.model
    first = model.layout.first_layer
    probe = [lm.model.embed_tokens.weight[:4, :16]]
    if first > 0:
        probe.append(next(iter(lm.model.layers[first - 1].parameters())).flatten()[:64])
    h = hashlib.sha256(json.dumps({"version": 1, "first-layer": first, "dtype": str(model.dtype),
                                   "seqs": seqs}, sort_keys=True).encode())
    for t in probe:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _stored_activations(model: AdaptedModel, store: DeviceStore, seqs: dict[str, list[list[int]]],
                        key: str) -> dict[str, list[torch.Tensor]] | None:
    blob = store.load_tensors(ACTIVATIONS)
    if blob is None or "key" not in blob:
        return None
    if bytes(blob["key"].tolist()).hex() != key:
        return None  # another model, layout or set of examples: computed afresh (and replaced)
    out: dict[str, list[torch.Tensor]] = {}
    for part, s in seqs.items():
        lengths = blob.get(f"{part}-lengths")
        if lengths is None or lengths.tolist() != [len(x) for x in s]:
            return None
        flat = blob[part].to(device=model.device, dtype=model.dtype)
        out[part] = list(torch.split(flat, lengths.tolist())) if s else []
    return out


def _store_activations(model: AdaptedModel, store: DeviceStore, key: str,
                       hiddens: dict[str, list[torch.Tensor]]) -> None:
    """One blob, key inside: a crash between two writes cannot pair a key with other activations."""
    dim = model.peft.base_model.model.config.hidden_size
    blob = {"key": torch.tensor(list(bytes.fromhex(key)), dtype=torch.uint8)}
    for part, hs in hiddens.items():
        blob[part] = torch.cat(hs) if hs else torch.zeros(0, dim, dtype=model.dtype)
        blob[f"{part}-lengths"] = torch.tensor([h.shape[0] for h in hs], dtype=torch.long)
    store.save_tensors(ACTIVATIONS, blob)


def load_pairs_for_node(cfg: Config, node_config: dict) -> tuple[str, list[tuple[str, str]], Path]:
    """(user id, (cue, reply) pairs, state folder) for this node: simulation or deployment (:mod:`fedpersona.client.node_data`)."""
    node = node_data(cfg, node_config)
    return node.user_id, read_user_folder(node.data_dir), node.state_dir


def state_dir_for(cfg: Config, node_config: dict) -> Path:
    """The node's state folder, without reading its data."""
    return node_data(cfg, node_config).state_dir


@functools.lru_cache(maxsize=None)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Noise for a budget spread over the planned steps, solved once per process for every training-set size
    (devices with equal data sizes share the result; :func:`fedpersona.privacy.ledger.calibrate_noise` warm-starts each
    new size from the nearest one solved)."""
    return calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


class Device:
    """The device-side logic; built once per (process, node) and cached by the ClientApp."""

    def __init__(self, cfg: Config, node_config: dict, *, prepared: UserData | None = None,
                 simulated: bool | None = None) -> None:
        """``prepared``: this user's examples already run through the frozen lower blocks by
        :func:`prepare_user` with the same model, adapter layout and data settings (a study
        that builds devices for several configurations computes them once). ``simulated``: the
        device is part of a simulation on this machine (default: it has no ``data-dir`` in its node
        config); only a simulated device trains the local-only baseline."""
        self.cfg = cfg
        self.model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed,
                                   device=cfg.model.device, dtype=cfg.model.dtype)
        self.trainer = trainer_for(self.model)
        user_id, pairs, state_dir = load_pairs_for_node(cfg, node_config)
        self.store = DeviceStore(state_dir)
        # A deployment device (its own data folder) never trains the local-only baseline: a second DP
        # model of the same data whose ledger the device's epsilon does not cover.
        self.simulated = "data-dir" not in node_config if simulated is None else bool(simulated)
        #: The run this device object answers (the ClientApp sets it from the message's context): the participation
        #: cap counts the participations of this run (``None``: every participation the store holds).
        self.run_id: int | None = None
        self.policy = DevicePolicy.load(node_config, state_dir=state_dir)  # the device's own floors
        self.policy.check_cost(cfg)  # a run asking for more work than the device allows: refused before any work
        if prepared is None:
            self.data = prepare_user(self.model, cfg, user_id, pairs, store=self.store)
        else:
            if prepared.user_id != user_id:
                raise ValueError(f"prepared data of {prepared.user_id!r} handed to the device of {user_id!r}")
            first = next(iter(prepared.train + prepared.held_out), None)
            h = first.hidden if first is not None else None
            if h is not None and (h.device, h.dtype) != (self.model.device, self.model.dtype):
                raise ValueError(f"prepared data of {user_id!r} lives on {h.device} in {h.dtype}, the model on "
                                 f"{self.model.device} in {self.model.dtype}: prepare it with the same "
                                 f"model.device / model.dtype")
            _check_delta(cfg, user_id, len(prepared.train))
            self.data = prepared
        self.user_id = user_id
        self.pairs = pairs
        self.base_train = list(self.data.train)
        self.feedback_examples = 0
        self._feedback_cache: dict[str, CachedExample | None] = {}
        n = len(self.data.train)
        self.sample_rate = min(1.0, cfg.client.batch_size / n)
        self.head_sample_rate = min(1.0, cfg.client.head_batch_size / n)
        # Sigma is calibrated when the device first plans a round (noise_multiplier), not when it is built: a
        # device built only to evaluate never needs it.
        self._sigma: float | None = None
        self._head_sigma: float | None = None
        # Where the DP-SGD passes draw their batches and noise: the CSPRNG; a seeded source only from tests.
        self.noise_source: NoiseSource = SECURE
        self._offered: tuple[tuple, object] | None = None
        #: The last round's figures for the device's own log and tests (loss, epsilon, timings): never sent.
        self.last_round: dict[str, float] = {}
        self._offered_evaluation: tuple[tuple, dict] | None = None
        self._profile_of: tuple | None = None  # the feedback examples the stored profile was computed with

    # ------------------------------------------------------------ privacy
    @property
    def noise_multiplier(self) -> float:
        """Sigma of this device's next DP-SGD steps (calibrated on first use; after the dataset grows, again)."""
        if self._sigma is None:
            self._sigma = self._noise_multiplier()
        return self._sigma

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self._sigma = float(value)

    @property
    def head_noise_multiplier(self) -> float:
        """Sigma of the head's own DP-SGD steps (``privacy.personal-head = dp``; else 0), calibrated on first use."""
        if self._head_sigma is None:
            self._head_sigma = self._head_noise_multiplier()
        return self._head_sigma

    @property
    def joint(self) -> bool:
        """``fedsa``: the head (B) is part of the shared adapter; one joint DP pass, no head pass."""
        return self.cfg.adapter.split == "fedsa"

    @property
    def head_dp(self) -> bool:
        return self.cfg.privacy.enabled and self.cfg.privacy.personal_head == "dp" and not self.joint

    @property
    def budget_passes(self) -> int:
        """DP passes over this user's records per planned step: 2 on a simulated device that also trains the
        local-only baseline (it replays every DP step the device took), else 1.

        One budget per user: the noise is planned, and every round checked, so that the federated
        ledger and the baseline's, composed, stay within ``privacy.target-epsilon``.
        """
        c = self.cfg
        return 2 if (self.simulated and c.privacy.enabled and c.eval.final and c.eval.local_baseline) else 1

    def spent(self, ledger: PrivacyLedger) -> PrivacyLedger:
        """``ledger`` as the budget counts it: every step :attr:`budget_passes` times (a copy; the file is untouched)."""
        return ledger if self.budget_passes == 1 else ledger.repeated(self.budget_passes)

    def _noise_multiplier(self, ledger: PrivacyLedger | None = None) -> float:
        """Sigma for this round's steps at the current sample rate.

        Calibrated once for all planned steps at a fixed q, as long as every past step had that very
        (sigma, q); after the dataset grew (q changed), the noise is picked so that the ledger's past
        steps composed with the remaining planned steps at the new q stay within the budget.
        """
        p = self.cfg.privacy
        if not p.enabled:
            return 0.0
        if p.noise_on == "sum":
            return sum_noise_multiplier(self.cfg)  # the same for every device of a sum (fedpersona.privacy.sumdp)
        if p.noise_multiplier > 0:
            return p.noise_multiplier
        # Planned for the participations the device will accept, not every round of the server's plan.
        planned = self.policy.participations(self.cfg) * self.cfg.client.local_steps
        passes = self.budget_passes
        sigma = _calibrated(p.target_epsilon, p.delta, self.sample_rate, planned * passes, p.accountant)
        if ledger is None or all((s, q) == (sigma, self.sample_rate) for s, q, _ in ledger.history):
            return sigma
        remaining = max(self.cfg.client.local_steps, planned - ledger.total_steps)
        adjusted = noise_for_remaining_budget(self.spent(ledger), target_epsilon=p.target_epsilon, delta=p.delta,
                                              sample_rate=self.sample_rate, remaining_steps=remaining * passes)
        return adjusted if adjusted is not None else sigma  # budget spent: train_round declines

    def _grow_training_set(self, server_round: int, ledger: PrivacyLedger) -> None:
        """The round's training set: the device's data + accepted/edited chat feedback (fedpersona.client.feedback).

        A feedback example the device cannot encode is skipped and reported in its log (by id), and the
        device trains on the rest: one bad example never fails the rounds that follow."""
        fb = training_feedback(self.store, server_round=server_round, max_new=self.cfg.client.max_new_examples)
        new = [e for e in fb if e.id not in self._feedback_cache]
        if new:
            self._cache_feedback(new)
        used = [e for e in fb if self._feedback_cache[e.id] is not None]
        self.data = UserData(self.user_id, self.base_train + [self._feedback_cache[e.id] for e in used],
                             self.data.held_out)
        self.feedback_examples = len(used)
        self.sample_rate = min(1.0, self.cfg.client.batch_size / len(self.data.train))
        self.noise_multiplier = self._noise_multiplier(ledger)
        ids = tuple(e.id for e in used)
        if ids != self._profile_of:  # the profile depends on the pairs alone: computed again when they change
            refresh_profile(self.store, self.pairs + pairs_of(used), tokenizer=self.model.tokenizer,
                            source=str(self.cfg.model.path))
            self._profile_of = ids

    def _cache_feedback(self, new: list) -> None:
        """Encode new feedback examples once (in one batch; one by one if the batch fails); ``None`` marks
        an example that cannot be encoded (skipped, reported)."""
        try:
            for e, ex in zip(new, cache_examples(self.model, self.cfg, pairs_of(new))):
                self._feedback_cache[e.id] = ex
            return
        except (ValueError, TypeError, UnicodeError, RuntimeError):
            pass
        for e in new:
            try:
                (self._feedback_cache[e.id],) = cache_examples(self.model, self.cfg, pairs_of([e]))
            except (ValueError, TypeError, UnicodeError, RuntimeError) as exc:
                logger.warning("%s: feedback example %s cannot be encoded (%s): skipped; the device trains on the "
                               "rest", self.user_id, e.id, type(exc).__name__)
                self._feedback_cache[e.id] = None

    def _head_noise_multiplier(self) -> float:
        """The head's own DP-SGD noise (``privacy.personal-head = dp``), for its own budget."""
        p = self.cfg.privacy
        if not self.head_dp or self.cfg.client.head_steps == 0:
            return 0.0
        if p.noise_multiplier > 0:
            return p.noise_multiplier
        passes = 1 if self.cfg.client.head_at == "end" else self.cfg.planned_rounds  # head passes it may take
        planned = passes * self.cfg.client.head_steps * self.budget_passes
        return _calibrated(p.target_epsilon, p.delta, self.head_sample_rate, planned, p.accountant)

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

    def personal_state(self) -> dict[str, torch.Tensor]:
        """The personal head as stored on the device (a fresh one before its first round)."""
        return self._personal()

    def _heldout(self) -> dict[str, float]:
        return evaluate(self.model, self.data.held_out)

    def _participation(self) -> list[dict]:
        text = self.store.load_text(PARTICIPATION)
        return json.loads(text) if text else []

    def _taken(self, participation: list[dict], run_id: int | None = None) -> int:
        """Participations of this run (``run_id``, else :attr:`run_id`) that count against the cap."""
        run = self.run_id if run_id is None else run_id
        return sum(1 for p in participation if run is None or p.get("run") == run)

    def _shared_pass(self, steps: int, ledger: PrivacyLedger | None, *, deadline: float | None = None) -> TrainResult:
        """The released pass (head switched off; ``fedsa``: A and B together)."""
        cfg = self.cfg
        kw = dict(
            steps=steps, batch_size=cfg.client.batch_size, lr=cfg.client.lr, optimizer=cfg.client.optimizer,
            noise_multiplier=self.noise_multiplier, max_grad_norm=cfg.privacy.max_grad_norm,
            dp=cfg.privacy.enabled, ledger=ledger, noise_source=self.noise_source, deadline=deadline,
        )
        if self.joint:
            return self.trainer.train(self.data.train, group="all", **kw)
        return train_shared(self.trainer, self.data.train, **kw)

    def head_source(self, server_round: int) -> NoiseSource:
        """Where the head pass of ``server_round`` draws its batches.

        A DP head (``privacy.personal-head = dp``): the device's noise source, the CSPRNG, as every
        DP pass. A local head (no noise; it never leaves the device, nor does anything computed from
        it but the final evaluation's secure sums): a generator seeded by (``run.seed``, user, round).
        Its batches protect nothing, and the local-only replay of that round draws the very same
        ones, so personalized and local-only differ only by the shared adapter they were trained on.
        """
        if self.head_dp:
            return self.noise_source
        digest = hashlib.sha256(f"{self.cfg.run.seed}:head-batches:{self.user_id}:{int(server_round)}".encode())
        return NoiseSource(generator=torch.Generator().manual_seed(int(digest.hexdigest()[:15], 16)))

    def _head_pass(self, ledger: PrivacyLedger | None, steps: int, server_round: int, *,
                   deadline: float | None = None) -> TrainResult:
        """The head alone on top of the shared adapter as loaded, ``steps`` steps (:meth:`_head_steps`)."""
        cfg = self.cfg
        return train_head(
            self.trainer, self.data.train, steps=steps, batch_size=cfg.client.head_batch_size, lr=cfg.client.head_lr,
            optimizer=cfg.client.optimizer, noise_multiplier=self.head_noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm, dp=self.head_dp, ledger=ledger if self.head_dp else None,
            noise_source=self.head_source(server_round), deadline=deadline,
        )

    def plan_round(self, shared: dict[str, torch.Tensor], *, server_round: int, log_refusal: bool = True) -> RoundPlan:
        """Every check that can refuse the round, and what the round will train from.

        Raises :class:`~fedpersona.client.policy.PolicyViolation` when the server's settings would weaken the
        device's policy, :class:`BudgetExhausted` when the round would take it past its budget
        (nothing trained, nothing recorded). Grows the training set by the round's chat feedback
        (the same examples each time it is asked for the same round).
        """
        cfg = self.cfg
        ledger = self.load_ledger()
        # The training set first: a grown set re-picks sigma, and the policy checks the sigma that will be used.
        self._grow_training_set(server_round, ledger)
        try:
            settings = self.policy.check(cfg, train_examples=len(self.data.train), noise_multiplier=self.noise_multiplier)
        except PolicyViolation as exc:
            if log_refusal:
                logger.warning("round %d refused by this device's privacy policy (%s): %s", server_round,
                               self.policy.source, exc)
            raise
        if cfg.privacy.noise_on == "sum":
            raise PolicyViolation("privacy.noise-on", cfg.privacy.noise_on,
                                  "with noise on the sum a device answers the steps of noisy sums only; a local "
                                  "round (several steps with the sum's noise) is not allowed")
        cap = self.policy.participations(cfg)
        taken = self._taken(self._participation())
        if taken >= cap:
            raise BudgetExhausted(f"{self.user_id}: {taken} participation(s) taken in this run, the cap is {cap} "
                                  "(client.max-participations / policy.max-participations); not training")
        steps = cfg.client.local_steps
        if cfg.privacy.enabled and math.isinf(self.epsilon(ledger)):
            raise BudgetExhausted(
                f"{self.user_id}: this device already released an update without DP noise (recorded as epsilon = "
                f"infinity): no DP round can be claimed from it any more; not training"
            )
        if cfg.privacy.enabled:
            eps_next = self.spent(ledger).epsilon_if(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                num_steps=steps * self.budget_passes, delta=cfg.privacy.delta,
            )
            if eps_next > cfg.privacy.target_epsilon * (1 + 1e-9):
                raise BudgetExhausted(
                    f"{self.user_id}: a round of {steps} steps would bring epsilon to {eps_next:.3f} > "
                    f"budget {cfg.privacy.target_epsilon} (spent {self.epsilon(self.spent(ledger)):.3f}"
                    f"{', with the local-only baseline' if self.budget_passes > 1 else ''}); not training"
                )
        head_ledger = self.load_ledger(HEAD_LEDGER) if self.head_dp else None
        personal = self._personal()
        return RoundPlan(
            server_round=int(server_round), shared_digest=state_digest(shared), personal_digest=state_digest(personal),
            train_examples=len(self.data.train), steps=steps, noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            head_steps=self._head_steps(head_ledger, log=log_refusal) if cfg.client.head_at == "round" else 0,
            head_noise_multiplier=self.head_noise_multiplier, head_sample_rate=self.head_sample_rate,
            settings=settings, ledger=ledger, head_ledger=head_ledger, shared=shared, personal=personal,
        )

    def _head_steps(self, head_ledger: PrivacyLedger | None, *, log: bool = True) -> int:
        """The head pass's steps this round: 0 without a head pass, or when the DP head's budget is spent."""
        cfg = self.cfg
        steps = cfg.client.head_steps
        if self.joint or steps == 0:
            return 0
        if self.head_dp:
            if head_ledger is None:
                raise RuntimeError("a DP head pass needs the head's ledger")
            eps_next = self.spent(head_ledger).epsilon_if(
                noise_multiplier=self.head_noise_multiplier, sample_rate=self.head_sample_rate,
                num_steps=steps * self.budget_passes, delta=cfg.privacy.delta,
            )
            if eps_next > cfg.privacy.target_epsilon * (1 + 1e-9):
                if log:
                    logger.info("%s: the head's budget is spent (%.3f next); head not trained", self.user_id, eps_next)
                return 0
        return steps

    def offer_result(self, plan: RoundPlan, result) -> None:
        """A result trained elsewhere (the cohort engine) for exactly ``plan``; :meth:`train_round` uses it
        when the plan it makes itself matches, and otherwise trains the round here. ``result``: a
        :class:`fedpersona.simulations.engine.jobs.ClientResult`."""
        self._offered = (plan.key, result)

    def train_round(self, shared: dict[str, torch.Tensor], *, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train one round; returns (the shared update, what the reply carries beside it: ``weight`` 1, ``trained`` 1).

        The round's loss, epsilon and timings stay on the device (:attr:`last_round`, its log).

        Raises :class:`~fedpersona.client.policy.PolicyViolation` (nothing trained, nothing recorded) when the
        server's settings would weaken the device's policy, :class:`BudgetExhausted` when the round
        would take it past its budget (:meth:`plan_round`). The passes are the result offered for
        this very plan (:meth:`offer_result`) or, without one, trained here; the ledger, the
        persistence and the reply are the same code either way.
        """
        cfg = self.cfg
        # The device's wall-time budget for the round (policy.max-round-seconds), checked between steps.
        deadline = deadline_after(self.policy.max_round_seconds)
        plan = self.plan_round(shared, server_round=server_round)
        offered, self._offered = self._offered, None
        if offered is not None and offered[0] != plan.key:
            logger.warning("%s round %d: the result offered was trained for another plan; training here",
                           self.user_id, server_round)
            offered = None
        ledger, steps = plan.ledger, plan.steps
        self.model.load_shared_state(shared)
        self.store.save_tensors(RECEIVED_SHARED, shared)  # for `fedpersona chat` on the device
        self.store.save_text(RECEIVED_CONFIG, json.dumps(cfg.to_flat(), sort_keys=True))
        self.model.load_personal_state(plan.personal)
        local: dict[str, float] = {}  # figures for the device's own log: never sent
        if cfg.eval.per_round:
            with self.model.personal_zeroed():
                local["heldout-shared-loss"] = self._heldout()["loss"]
            local["heldout-personal-loss"] = self._heldout()["loss"]
        if offered is None:
            result = self._shared_pass(steps, ledger if cfg.privacy.enabled else None, deadline=deadline)
            if result.stopped:
                self._stopped(plan, result)  # raises: nothing released
            head_ledger = plan.head_ledger
            head = (self._head_pass(head_ledger, plan.head_steps, server_round, deadline=deadline)
                    if plan.head_steps else None)
            if head is not None and head.stopped:
                logger.warning("%s round %d: the head pass reached policy.max-round-seconds = %g after %d of %d "
                               "step(s); the head keeps them, the shared update (all %d steps) is sent",
                               self.user_id, server_round, self.policy.max_round_seconds, head.steps,
                               plan.head_steps, steps)
        else:
            result, head = self._apply_offered(plan, offered[1])
            head_ledger = plan.head_ledger
        if not cfg.privacy.enabled:
            # A release without noise (the policy allowed it): epsilon is infinite from now on, for good.
            ledger.step(noise_multiplier=0.0, sample_rate=self.sample_rate, num_steps=max(1, steps))
        ledger.record_round(
            round=server_round, steps=steps, noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate, delta=cfg.privacy.delta, settings=plan.settings,
        )
        if cfg.privacy.enabled:
            m = self.policy.participations(cfg)
            ledger.set_plan(participations=m, steps=m * steps, noise_multiplier=self.noise_multiplier,
                            sample_rate=self.sample_rate, delta=cfg.privacy.delta)
        # The head has trained on top of the new shared adapter by now; it never enters the update.
        after = self.model.shared_state()
        # Weight 1 for every device (public): nothing sent depends on how many examples it holds.
        update = {n: after[n] - shared[n].to(after[n].dtype) for n in after}
        if head is not None and head_ledger is not None:
            head_ledger.record_round(
                round=server_round, steps=head.steps, noise_multiplier=self.head_noise_multiplier,
                sample_rate=self.head_sample_rate, delta=cfg.privacy.delta,
            )
        participation = self._participation()
        participation.append({"round": server_round, "steps": steps, "head-steps": head.steps if head else 0,
                              **({"run": self.run_id} if self.run_id is not None else {})})
        # Persist before replying: a lost reply must never hand back privacy budget.
        self.store.save_text(LEDGER, ledger.to_json())
        if head_ledger is not None:
            self.store.save_text(HEAD_LEDGER, head_ledger.to_json())
        self.store.save_tensors(HEAD_FILE, self.model.personal_state())
        self.store.save_text(PARTICIPATION, json.dumps(participation))
        eps = self.epsilon(ledger)
        local.update(
            {
                "train-loss": result.mean_loss if math.isfinite(result.mean_loss) else 0.0,
                "epsilon": eps if math.isfinite(eps) else -1.0,
                "empty-steps": float(result.empty_steps),
                "train-seconds": result.seconds + (head.seconds if head else 0.0),
            }
        )
        self.last_round = local
        logger.info(
            "%s round %d: %d steps (%d empty) loss %.3f sigma %.3f q %.3f epsilon %.3f in %.1fs%s; head %s%s",
            self.user_id, server_round, steps, result.empty_steps, result.mean_loss, self.noise_multiplier,
            self.sample_rate, eps, result.seconds, "" if offered is None else " (cohort engine)",
            f"{head.steps} steps loss {head.mean_loss:.3f} ({'DP' if self.head_dp else 'local, no noise'})"
            if head else "not trained",
            "".join(f"; {k} {v:.3f}" for k, v in local.items() if k.startswith("heldout-")),
        )
        # What the reply carries besides the update: the public weight and a constant (fedpersona.privacy.audit.message_table).
        return update, {"weight": 1.0, "trained": 1.0}

    def _stopped(self, plan: RoundPlan, result: TrainResult) -> None:
        """A shared pass stopped by the wall-time budget: release nothing; keep its steps in the ledger.

        The steps were computed on the user's data, so the ledger (every DP-SGD step the device ever
        took) records them, saved before the refusal goes out; the round entry says it released nothing.
        """
        cfg = self.cfg
        if cfg.privacy.enabled and result.steps:
            plan.ledger.record_round(
                round=plan.server_round, steps=result.steps, noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate, delta=cfg.privacy.delta,
                settings={**plan.settings, "released": False, "stopped-by": "policy.max-round-seconds"},
            )
            self.store.save_text(LEDGER, plan.ledger.to_json())
        logger.warning("%s round %d: policy.max-round-seconds = %g reached after %d of %d DP step(s): the round is "
                       "stopped and nothing of it is sent (the steps taken stay in the ledger: epsilon %.3f)",
                       self.user_id, plan.server_round, self.policy.max_round_seconds, result.steps, plan.steps,
                       self.epsilon(plan.ledger))
        raise RoundTimeExceeded(f"round {plan.server_round} stopped after {result.steps} of {plan.steps} steps by "
                                f"policy.max-round-seconds = {self.policy.max_round_seconds:g}")

    def _apply_offered(self, plan: RoundPlan, res) -> tuple[TrainResult, TrainResult | None]:
        """Step the ledgers with the DP steps the engine took, load its tensors: as the passes here would."""
        cfg = self.cfg
        phases = list(res.phases)
        shared_phase = phases[0]
        if cfg.privacy.enabled:
            for sigma, q in shared_phase.ledger_steps:
                plan.ledger.step(noise_multiplier=sigma, sample_rate=q)
        head_phase = phases[1] if len(phases) > 1 and plan.head_steps else None
        if head_phase is not None and plan.head_ledger is not None:
            for sigma, q in head_phase.ledger_steps:
                plan.head_ledger.step(noise_multiplier=sigma, sample_rate=q)
        if res.error is not None:
            raise FloatingPointError(res.error)
        self.model.load_shared_state(res.shared)
        self.model.load_personal_state(res.personal)

        def as_train(p, noise_multiplier: float) -> TrainResult:
            return TrainResult(steps=p.steps, empty_steps=p.empty_steps, examples_seen=p.examples_seen,
                               mean_loss=p.mean_loss, seconds=p.seconds, noise_multiplier=noise_multiplier,
                               sample_rate=p.sample_rate)

        shared_result = as_train(shared_phase, self.noise_multiplier if cfg.privacy.enabled else 0.0)
        head = as_train(head_phase, self.head_noise_multiplier) if head_phase is not None else None
        return shared_result, head

    # ------------------------------------------------------------- noise on the sum (fedpersona.client.sumdp)
    def sum_step(self, shared: dict[str, torch.Tensor], claimed: SumContext, *, run_id: int, server_round: int,
                 step: int, cohort: int, bound_keys: bool) -> tuple[np.ndarray, SumContext]:
        """One step of a noisy sum (``privacy.noise-on = sum``): the checks of :mod:`fedpersona.client.sumdp`, then the
        clipped gradient sum, the ledger step and its persistence. ``bound_keys``: whether the device's secure
        aggregation holds against a malicious server (:func:`fedpersona.client.secagg.malicious_secure`).

        Returns (the clipped per-example gradient sum as a float64 vector in the shared tensors' sorted-name
        order, no noise yet: the ClientApp quantizes it and adds the discrete Gaussian share while masking; the
        step's context). Raises :class:`~fedpersona.client.policy.PolicyViolation` (a refusal naming the setting),
        :class:`BudgetExhausted` (a decline) or :class:`~fedpersona.client.sumdp.StepRefused`; nothing is recorded then.
        """
        cfg = self.cfg
        if cfg.privacy.noise_on != "sum":
            raise PolicyViolation("privacy.noise-on", cfg.privacy.noise_on,
                                  "this run's config puts the noise on each device: no step of a noisy sum")
        ctx = check_context(cfg, claimed, server_round=server_round, step=step, cohort=cohort, shared=shared)
        settings = self.policy.check(cfg, train_examples=len(self.data.train), noise_multiplier=ctx.noise_multiplier)
        settings.update(self.policy.check_sum(cfg, ctx, train_examples=len(self.data.train), bound_keys=bound_keys))
        log = StepLog(self.store)
        opens = log.check(run_id, server_round, step, steps=ctx.steps, rounds=cfg.server.num_rounds)
        ledger = self.load_ledger()
        participation = self._participation()
        cap = self.policy.participations(cfg)
        if opens:
            if cfg.privacy.enabled and math.isinf(self.epsilon(ledger)):
                raise BudgetExhausted(f"{self.user_id}: this device already released without DP noise (epsilon = "
                                      "infinity): no DP round can be claimed from it any more; declining")
            if self._taken(participation, run_id) >= cap:
                raise BudgetExhausted(f"{self.user_id}: {self._taken(participation, run_id)} participation(s) taken in this "
                                      f"run, the cap is {cap} "
                                      "(client.max-participations / policy.max-participations); declining")
            self._grow_training_set(server_round, ledger)
            if cfg.privacy.enabled:
                eps_next = self.spent(ledger).epsilon_if(
                    noise_multiplier=ctx.noise_multiplier, sample_rate=self.sample_rate,
                    num_steps=ctx.steps * self.budget_passes, delta=cfg.privacy.delta, on_sum=True)
                if eps_next > cfg.privacy.target_epsilon * (1 + 1e-9):
                    raise BudgetExhausted(f"{self.user_id}: a round of {ctx.steps} steps would bring epsilon to "
                                          f"{eps_next:.3f} > budget {cfg.privacy.target_epsilon}"
                                          f"{' (with the local-only baseline)' if self.budget_passes > 1 else ''}; "
                                          "declining")
            participation.append({"round": int(server_round), "steps": 0, "head-steps": 0, "mode": "sum", "run": int(run_id)})
        elif not participation or participation[-1].get("round") != server_round:
            raise StepRefused(f"round {server_round}: this device holds no participation of it")
        self.model.load_shared_state(shared)  # the step's weights, as every device of the sum
        g = clipped_grad_sum(self.trainer, self.data.train, sample_rate=self.sample_rate, max_grad_norm=ctx.clip,
                             noise_source=self.noise_source)
        q = self.sample_rate
        ledger.step_on_sum(noise_multiplier=ctx.noise_multiplier, sample_rate=q, honest=ctx.honest)
        participation[-1]["steps"] = int(participation[-1]["steps"]) + 1
        if cfg.privacy.enabled:
            ledger.set_plan(participations=cap, steps=cap * ctx.steps, noise_multiplier=ctx.noise_multiplier,
                            sample_rate=q, delta=cfg.privacy.delta, noise_on="sum")
        ledger.record_round(round=server_round, steps=participation[-1]["steps"],
                            noise_multiplier=ctx.noise_multiplier, sample_rate=q, delta=cfg.privacy.delta,
                            settings=settings, update=True)
        # Persisted before the reply leaves: a lost reply never hands back budget; a repeat is refused.
        self.store.save_text(LEDGER, ledger.to_json())
        self.store.save_text(PARTICIPATION, json.dumps(participation))
        log.record(run_id, server_round, step)
        if opens:
            self.store.save_text(RECEIVED_CONFIG, json.dumps(cfg.to_flat(), sort_keys=True))
        eps = self.epsilon(ledger)
        logger.info("%s round %d step %d/%d: batch %d (%d clipped) loss %.3f, sigma %.3f t %d q %.3f, epsilon %.3f "
                    "in %.2fs", self.user_id, server_round, step, ctx.steps, g.batch, g.clipped, g.mean_loss,
                    ctx.noise_multiplier, ctx.honest, q, eps, g.seconds)
        return flatten(g.grads), ctx

    def personalize(self, shared: dict[str, torch.Tensor], *, run_id: int, server_round: int) -> int:
        """After a round of noisy sums: the head on top of the round's final shared adapter; the steps taken.

        Only for a round this device answered at least one step of (in this run), once per round
        (:class:`~fedpersona.client.sumdp.StepRefused` otherwise). With ``client.head-at = end``: once a run,
        after the last round (:meth:`_personalize_at_end`).
        """
        cfg = self.cfg
        if cfg.client.head_at == "end":
            return self._personalize_at_end(shared, run_id=run_id, server_round=server_round)
        log = StepLog(self.store)
        last = log.last(run_id)
        participation = self._participation()
        if last["round"] != server_round or last["personalized"] == server_round or not participation \
                or participation[-1].get("round") != server_round:
            raise StepRefused(f"round {server_round}: not a round this device answered steps of, or already "
                              "personalized")
        head = self._head_on(shared, server_round)
        participation[-1]["head-steps"] = head.steps if head else 0
        self.store.save_text(PARTICIPATION, json.dumps(participation))
        log.record_personalized(run_id, server_round)
        logger.info("%s round %d: head %s, on the round's final shared adapter", self.user_id, server_round,
                    f"{head.steps} steps loss {head.mean_loss:.3f}" if head else "not trained")
        return head.steps if head else 0

    def _personalize_at_end(self, shared: dict[str, torch.Tensor], *, run_id: int, server_round: int) -> int:
        """``client.head-at = end``: the head, once a run, on top of the run's final shared adapter (round
        ``server.num-rounds + 1``), from where it stands (a fresh head on a device's first run); the steps taken.
        Any other round, or a second time in the run: :class:`~fedpersona.client.sumdp.StepRefused`."""
        cfg = self.cfg
        if server_round != cfg.server.num_rounds + 1:
            raise StepRefused(f"round {server_round}: with client.head-at = end the head is trained only after the "
                              f"last round (round {cfg.server.num_rounds + 1})")
        done = self._head_at_end()
        if done is not None and done.get("run") == int(run_id):
            raise StepRefused(f"the head was already trained at the end of run {run_id}")
        head = self._head_on(shared, server_round)
        self.store.save_text(HEAD_AT_END, json.dumps({"run": int(run_id), "round": int(server_round),
                                                      "steps": head.steps if head else 0}))
        logger.info("%s: head %s, on the run's final shared adapter", self.user_id,
                    f"{head.steps} steps loss {head.mean_loss:.3f}" if head else "not trained")
        return head.steps if head else 0

    def _head_on(self, shared: dict[str, torch.Tensor], server_round: int) -> TrainResult | None:
        """The head pass on top of ``shared`` (its batches those of ``server_round``), the head, its ledger and
        ``shared`` (for `fedpersona chat` on the device) saved; None when no step is taken."""
        self.model.load_shared_state(shared)
        self.model.load_personal_state(self._personal())
        head_ledger = self.load_ledger(HEAD_LEDGER) if self.head_dp else None
        steps = self._head_steps(head_ledger)
        head = self._head_pass(head_ledger, steps, server_round) if steps else None
        if head is not None and head_ledger is not None:
            head_ledger.record_round(round=server_round, steps=head.steps, noise_multiplier=self.head_noise_multiplier,
                                     sample_rate=self.head_sample_rate, delta=self.cfg.privacy.delta)
            self.store.save_text(HEAD_LEDGER, head_ledger.to_json())
        self.store.save_tensors(HEAD_FILE, self.model.personal_state())
        self.store.save_tensors(RECEIVED_SHARED, shared)
        return head

    def _head_at_end(self) -> dict | None:
        text = self.store.load_text(HEAD_AT_END)
        return json.loads(text) if text else None

    def offer_evaluation(self, shared_digest: str, personal_digest: str, figures: dict[str, dict[str, float]]) -> None:
        """Held-out figures computed elsewhere (the cohort engine's batched passes) for the shared adapter and
        head of these digests: ``{"base" | "shared" | "personal": {"loss", "accuracy", "tokens"}}``, as
        :func:`fedpersona.client.train.evaluate` gives them. :meth:`final_evaluation` uses them only for exactly that
        shared adapter, that head and this device's held-out split; otherwise it evaluates here."""
        self._offered_evaluation = ((shared_digest, personal_digest, len(self.data.held_out)), figures)

    def final_evaluation(self, shared: dict[str, torch.Tensor], *, run_id: int = 0) -> dict[str, float]:
        """Base, shared only, personalized and (simulation) local-only on the held-out split.

        The row is written to the device's own store (``evaluation``, with the user id); only its
        bounded figures are sent, with noise (:mod:`fedpersona.privacy.secagg.eval_figures`).
        """
        cfg = self.cfg
        personal = self._personal()
        offered, self._offered_evaluation = self._offered_evaluation, None
        figures = None
        if offered is not None:
            if offered[0] == (state_digest(shared), state_digest(personal), len(self.data.held_out)):
                figures = offered[1]
            else:
                logger.warning("%s: the evaluation offered was computed for another shared adapter or head; "
                               "evaluating here", self.user_id)
        self.model.load_shared_state(shared)
        self.model.load_personal_state(personal)
        out: dict[str, float] = {}
        if figures is None:
            with self.model.adapters_disabled():
                base = self._heldout()
            with self.model.personal_zeroed():
                alone = self._heldout()
            figures = {"base": base, "shared": alone, "personal": self._heldout()}
        for model in ("base", "shared", "personal"):
            r = figures[model]
            out[f"{model}-loss"], out[f"{model}-accuracy"] = r["loss"], r["accuracy"]
            out[f"{model}-tokens"] = float(r["tokens"])
        ledger = self.load_ledger()
        eps = self.epsilon(ledger)
        out["epsilon"] = out["epsilon-federated"] = eps if math.isfinite(eps) else -1.0
        plan = ledger.plan
        if plan is not None:  # what the device planned beside what it spent
            out["planned-participations"] = float(plan["participations"])
            out["planned-epsilon"] = plan["epsilon"] if math.isfinite(plan["epsilon"]) else -1.0
        if self.head_dp:
            head_eps = self.epsilon(self.load_ledger(HEAD_LEDGER))
            out["head-epsilon"] = head_eps if math.isfinite(head_eps) else -1.0
        participation = self._participation()
        out["rounds"] = float(len(participation))
        out["steps"] = float(sum(r["steps"] for r in participation))
        end = self._head_at_end()
        out["head-steps"] = float(sum(r["head-steps"] for r in participation) + (end["steps"] if end else 0))
        out["held-out-examples"] = float(len(self.data.held_out))
        out["train-examples"] = float(len(self.data.train))
        if cfg.eval.local_baseline:
            if self.simulated:
                out.update(self._local_baseline(shared, participation))
                # One budget per user: "epsilon" is the federated ledger and the baseline's, composed.
                total = self.epsilon(composed([ledger, self.load_ledger(BASELINE_LEDGER)]))
                out["epsilon"] = total if math.isfinite(total) else -1.0
                if self.head_dp:
                    head_total = self.epsilon(composed([self.load_ledger(HEAD_LEDGER),
                                                        self.load_ledger(BASELINE_HEAD_LEDGER)]))
                    out["head-epsilon"] = head_total if math.isfinite(head_total) else -1.0
            else:
                logger.warning("eval.local-baseline = true refused: the local-only baseline trains a second DP model "
                               "of this user's data and runs in simulations only")
        row = {"run_id": int(run_id), "user": self.user_id,
               **{k: (v if math.isfinite(v) else None) for k, v in out.items()}}
        self.store.save_text(EVALUATION, json.dumps(row, sort_keys=True))
        return out

    def _local_baseline(self, shared: dict[str, torch.Tensor], participation: list[dict]) -> dict[str, float]:
        """Local-only model: exactly what this device trained for itself, without federation.

        From the public initialisation of the shared adapter and a fresh head, it replays the
        device's rounds: each round the same shared-adapter steps under the same DP (head
        switched off; its own ledger, hence the same epsilon), then the same head steps. The
        only difference from the federated model is that no other device's update is ever
        averaged in, so personalized vs local-only isolates what federation adds.
        """
        cfg = self.cfg
        end = self._head_at_end()
        key = hashlib.sha256(json.dumps([participation, end], sort_keys=True).encode()).hexdigest()[:16]
        baseline = self.store.load_tensors(BASELINE)
        if baseline is None or self.store.load_text(BASELINE + "-key") != key:
            self.model.load_personal_state(self.model.fresh_personal_state())
            # The shared adapter starts from the same public initialisation the server used.
            self.model.load_shared_state(self.model.initial_shared_state())
            ledger = PrivacyLedger(accountant=cfg.privacy.accountant)
            head_ledger = PrivacyLedger(accountant=cfg.privacy.accountant) if self.head_dp else None
            opt = local_optimizer(cfg)  # noise on the sum: the server's optimizer, on this device's own sums
            for r in participation:
                if r.get("mode") == "sum":
                    local_replay_round(self, int(r["steps"]), ledger, opt)
                else:
                    self._shared_pass(int(r["steps"]), ledger if cfg.privacy.enabled else None)
                head_steps = self._head_steps(head_ledger) if r["head-steps"] else 0
                if head_steps:
                    head = self._head_pass(head_ledger, head_steps, int(r["round"]))
                    if head_ledger is not None:
                        head_ledger.record_round(
                            round=int(r["round"]), steps=head.steps, noise_multiplier=self.head_noise_multiplier,
                            sample_rate=self.head_sample_rate, delta=cfg.privacy.delta,
                        )
            if end and end["steps"]:  # the head trained once at the end: as many steps, its batches, on this adapter
                head = self._head_pass(head_ledger, self._head_steps(head_ledger), int(end["round"]))
                if head_ledger is not None:
                    head_ledger.record_round(round=int(end["round"]), steps=head.steps,
                                             noise_multiplier=self.head_noise_multiplier,
                                             sample_rate=self.head_sample_rate, delta=cfg.privacy.delta)
            baseline = {f"shared::{k}": v for k, v in self.model.shared_state().items()}
            baseline.update({f"personal::{k}": v for k, v in self.model.personal_state().items()})
            self.store.save_tensors(BASELINE, baseline)
            self.store.save_text(BASELINE_LEDGER, ledger.to_json())
            if head_ledger is not None:
                self.store.save_text(BASELINE_HEAD_LEDGER, head_ledger.to_json())
            self.store.save_text(BASELINE + "-key", key)
        self.model.load_shared_state({k[8:]: v for k, v in baseline.items() if k.startswith("shared::")})
        self.model.load_personal_state({k[10:]: v for k, v in baseline.items() if k.startswith("personal::")})
        r = self._heldout()
        eps_text = self.store.load_text(BASELINE_LEDGER)
        eps = PrivacyLedger.from_json(eps_text).epsilon(cfg.privacy.delta) if eps_text else 0.0
        if not cfg.privacy.enabled and participation:
            eps = math.inf  # trained without DP
        # Leave the federated state loaded again.
        self.model.load_shared_state(shared)
        self.model.load_personal_state(self._personal())
        return {"local-loss": r["loss"], "local-accuracy": r["accuracy"], "local-tokens": float(r["tokens"]),
                "local-epsilon": eps if math.isfinite(eps) else -1.0}
