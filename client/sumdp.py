"""The device's side of noise on the sum (``privacy.noise-on = sum``; the mechanism: :mod:`fedpersona.privacy.sumdp`).

Per round the server sends each device of the cohort one ``train.dp_step`` message per DP-SGD step
(the shared weights, the round, the step index, the noisy-sum context and the masked-input request),
then one ``train.personalize`` message with the round's final shared weights. For a step the device
(:meth:`fedpersona.client.device.Device.sum_step`):

1. derives the step's parameters itself (:func:`fedpersona.privacy.sumdp.sum_context`: sigma, t, C, the scale, the
   sum bound, the batch of the normalizer, the dimension, the weights' digest) and refuses a request that
   names others (:class:`~fedpersona.client.policy.PolicyViolation` naming the first setting that differs);
2. checks them against its policy (:meth:`~fedpersona.client.policy.DevicePolicy.check` and
   :meth:`~fedpersona.client.policy.DevicePolicy.check_sum`: secure aggregation on, t between its floor and its
   share of the announced cohort, sigma enough for its own budget at its own q over the participations it
   plans);
3. checks the order (:class:`StepLog`, per run, in its encrypted store): the round within the run's
   rounds and not older than the last one it answered, the step index within ``client.local-steps`` and
   after the last one it answered in that round: a repeated, rolled-back or skipped-back step is refused
   (:class:`StepRefused`), so it never answers the same step twice;
4. at the first step of a round: the participation cap (``client.max-participations``, lowered by
   ``policy.max-participations``) and the budget for the round's steps (else :class:`BudgetExhausted`: a
   decline, no vector);
5. computes its clipped per-example gradient sum on a fresh Poisson sample (:func:`fedpersona.client.train.clipped_grad_sum`),
   steps its ledger (:meth:`~fedpersona.privacy.ledger.PrivacyLedger.step_on_sum`), its participation and the step
   log, and persists all of it; only then does the ClientApp quantize, add the discrete Gaussian share
   and mask the vector (:mod:`fedpersona.client.secagg`).

:meth:`~fedpersona.client.device.Device.personalize` trains the personal head on top of the round's final shared adapter (the device
answered at least one step of that round), once per round. :func:`local_replay_round` is the local-only
baseline of a simulation: the device's own rounds as a federation of one (its own sums with t = 1, the
whole noise ``sigma^2 C^2`` from the CSPRNG, the normalizer ``1 * client.batch-size``, the server's optimizer).
"""

from __future__ import annotations

import json
import logging

import torch

from fedpersona.client.policy import PolicyViolation
from fedpersona.client.secagg import Refused
from fedpersona.client.train import clipped_grad_sum
from fedpersona.config import Config
from fedpersona.optim import ServerOptimizer
from fedpersona.privacy import dpstep
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.sumdp import SumContext, sum_context, sum_noise_multiplier

__all__ = ["STEP_LOG", "StepLog", "StepRefused", "check_context", "local_optimizer", "local_replay_round"]

logger = logging.getLogger(__name__)

STEP_LOG = "sum-steps"

#: Which config key a context field comes from (a refusal names it).
_FIELD_KEYS = {"round": "server-round", "step": "step", "steps": "client.local-steps", "cohort": "secagg cohort",
               "noise_multiplier": "privacy.noise-multiplier", "honest": "privacy.honest-contributors",
               "clip": "privacy.max-grad-norm", "scale": "secagg.scale", "sum_bound": "data.max-examples",
               "batch_size": "client.batch-size", "dim": "shared weights", "weights": "shared weights"}


class StepRefused(Refused):
    public_reason = ("refused: the step does not follow this device's plan (a repeated, out-of-order or "
                     "out-of-range step, or a round it cannot personalize)")


class StepLog:
    """The last step this device answered, per run: ``{"runs": {run_id: {"round", "step", "personalized"}}}``."""

    def __init__(self, store) -> None:
        self.store = store
        text = store.load_text(STEP_LOG)
        try:
            self.doc = json.loads(text) if text else {"version": 1, "runs": {}}
            if not isinstance(self.doc.get("runs"), dict):
                raise ValueError("no runs")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"the device's step log ({STEP_LOG}) is unreadable: {type(exc).__name__}") from None

    def last(self, run_id: int) -> dict:
        return self.doc["runs"].get(str(int(run_id)), {"round": 0, "step": 0, "personalized": 0})

    def check(self, run_id: int, server_round: int, step: int, *, steps: int, rounds: int) -> bool:
        """Whether (round, step) follows the plan; True when it opens a new round for this device."""
        last = self.last(run_id)
        if not 1 <= server_round <= rounds:
            raise StepRefused(f"round {server_round} is outside the run's rounds 1..{rounds}")
        if not 1 <= step <= steps:
            raise StepRefused(f"step {step} of round {server_round} is outside 1..{steps} (client.local-steps)")
        if server_round < last["round"] or (server_round == last["round"] and step <= last["step"]):
            raise StepRefused(f"round {server_round} step {step} does not come after the last step this device "
                              f"answered (round {last['round']} step {last['step']})")
        return server_round > last["round"]

    def record(self, run_id: int, server_round: int, step: int) -> None:
        self.doc["runs"][str(int(run_id))] = {"round": int(server_round), "step": int(step), "personalized": 0}
        self.store.save_text(STEP_LOG, json.dumps(self.doc, sort_keys=True))

    def record_personalized(self, run_id: int, server_round: int) -> None:
        self.doc["runs"][str(int(run_id))]["personalized"] = int(server_round)
        self.store.save_text(STEP_LOG, json.dumps(self.doc, sort_keys=True))


def check_context(cfg: Config, claimed: SumContext, *, server_round: int, step: int, cohort: int,
                  shared: dict[str, torch.Tensor]) -> SumContext:
    """The device's own derivation of the step's parameters; PolicyViolation if the server's differ."""
    own = sum_context(cfg, round=server_round, step=step, cohort=cohort, weights=shared)
    diff = own.differences(claimed)
    if diff:
        name = sorted(diff)[0]
        own_value, server_value = diff[name]
        raise PolicyViolation(_FIELD_KEYS.get(name, name), server_value,
                              f"this device derives {own_value!r} for the noisy sum's {name} from the run config")
    return own


def local_replay_round(device, steps: int, ledger: PrivacyLedger, opt: ServerOptimizer) -> None:
    """One round of the local-only baseline with noise on the sum: a federation of this one device.

    ``steps`` steps from the shared adapter as loaded, each the device's own clipped gradient sum plus
    Gaussian noise of stddev ``sigma * C`` (t = 1: the whole noise, from the CSPRNG), divided by
    ``client.batch-size`` (the normalizer of a sum of one) and stepped with ``opt`` (the server's optimizer
    and learning rate, its state carried from round to round); ``ledger`` steps each with the same
    (sigma, q) as the federated ledger, so the epsilon is the same.
    """
    cfg = device.cfg
    sigma = sum_noise_multiplier(cfg)
    c = cfg.privacy.max_grad_norm
    for _ in range(int(steps)):
        g = clipped_grad_sum(device.trainer, device.data.train, sample_rate=device.sample_rate, max_grad_norm=c,
                             noise_source=device.noise_source)
        gen = dpstep.step_generator(device.noise_source)
        numel = sum(t.numel() for t in g.grads.values())
        noise = dpstep.flat_noise(device.noise_source, gen, numel, std=sigma * c)
        shared = device.model.shared_state()
        step, offset = {}, 0
        for name in device.model.shared_names:
            t = g.grads[name]
            step[name] = -(t + noise[offset:offset + t.numel()].view(t.shape)) / cfg.client.batch_size
            offset += t.numel()
        device.model.load_shared_state(opt.step(shared, step))
        if cfg.privacy.enabled:
            ledger.step_on_sum(noise_multiplier=sigma, sample_rate=device.sample_rate, honest=1)
        else:
            ledger.step(noise_multiplier=0.0, sample_rate=device.sample_rate)


def local_optimizer(cfg: Config) -> ServerOptimizer:
    """The optimizer a device's local-only baseline steps its own noisy sums with: the server's."""
    return ServerOptimizer(cfg.server.optimizer, cfg.server.lr, momentum=cfg.server.momentum)
