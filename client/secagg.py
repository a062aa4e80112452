"""The device side of secure aggregation: its long-term keys, and what it sends in each exchange.

The device's two long-term X25519 key pairs live in its encrypted store under ``secagg-keys``
(created by its first key advertisement, reused in every later round and run; never in a
message). Per round (:mod:`server.secagg` drives the exchanges):

* :func:`check_request`, *before* training: the masked-input request is addressed to this
  node, is for a vector of the shared adapter's length, and names the public keys this device
  holds; a request that would fail costs no privacy budget;
* :func:`masked_input`, after training: the update ``weight * (new - old)`` with
  ``weight = n / data.max-examples``, flattened in sorted-name order, clipped to
  ``secagg.clip-norm``, quantized (plus the device's distributed-DP noise share when
  ``secagg.ddp`` is on) and masked, with the example count and the metrics as masked extras;
* :func:`decline`: a device that does not train (privacy budget spent, or it refuses the round)
  takes no part in masking: it says so in stage 1 (no vector, no shares) and the server treats it
  as dropped before masking, so a sum never counts a device that did not train;
* :func:`unmask`: the shares the server needs for the survivors' sum, under the device's own rules:
  never for fewer survivors than its floor (:func:`min_contributors_floor`), at most once per
  round digest, and only for the round of its latest masked input (:class:`RevealLog`, kept in
  the encrypted store, so a restart forgets nothing);
* :func:`eval_masked_input`: the final evaluation's figures as one masked vector of sums
  (:mod:`privacy.secagg.eval_figures`), through the same protocol.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from client.store import DeviceStore
from fedpersona.config import Config
from fedpersona.secagg_wire import SELF_ENC_PK, SELF_MASK_PK, flatten
from privacy.secagg import ClientKeys, SecAggClient, SecAggInputError, SecAggParams
from privacy.secagg.eval_figures import encode as encode_evaluation
from privacy.secagg.eval_figures import eval_params
from privacy.secagg.settings import extras_specs, record_ddp, secagg_params
from privacy.secagg.spec import request_digest

__all__ = ["KEYS", "REVEALS", "DEFAULT_MIN_CONTRIBUTORS", "FLOOR_KEY", "Refused", "ReplayRefused", "RevealLog",
           "SmallSumRefused", "advertise", "check_request", "decline", "device_keys", "eval_masked_input",
           "masked_input", "masked_step_input", "min_contributors_floor", "unmask"]

logger = logging.getLogger(__name__)

KEYS = "secagg-keys"
REVEALS = "secagg-reveals"
#: The device's floor on the number of trained contributors in any sum it helps unmask (node config).
FLOOR_KEY = "policy.min-contributors"
DEFAULT_MIN_CONTRIBUTORS = 3
#: Kinds of masked input a device sends (each selects the protocol settings of its unmask).
TRAIN, EVALUATE, DP_STEP = "train", "evaluate", "dp-step"


class Refused(RuntimeError):
    """The device refuses a request; ``public_reason`` (fixed text) is all its error reply says."""

    public_reason = "refused by the device's own rules"


class SmallSumRefused(Refused):
    public_reason = "refused: the sum would hold fewer contributors than this device's floor"


class ReplayRefused(Refused):
    public_reason = ("refused: this device already answered an unmask request for this round, or the request is "
                     "not for the round of its latest masked input")


def min_contributors_floor(node_config: Mapping[str, Any], *, state_dir=None) -> int:
    """The device's own floor: its privacy policy's ``policy.min-contributors`` (node config and
    ``policy.toml`` in its state folder, the stricter wins; default 3, at least 2: :mod:`client.policy`)."""
    from client.policy import DevicePolicy

    return DevicePolicy.load(node_config, state_dir=state_dir).min_contributors


class RevealLog:
    """What this device revealed, per run: its latest masked input and every unmask it answered.

    Stored in the device's encrypted store (blob ``secagg-reveals``) *before* each reply, as
    ``{"runs": {run_id: {"latest": {"digest", "round", "kind"}, "unmasked": {digest: {"round",
    "survivors", "dropped"}}}}}``. Only round digests, rounds and client ids: facts the server
    already holds.
    """

    def __init__(self, store: DeviceStore) -> None:
        self.store = store
        text = store.load_text(REVEALS)
        try:
            self.doc = json.loads(text) if text else {"version": 1, "runs": {}}
            if not isinstance(self.doc.get("runs"), dict):
                raise ValueError("no runs")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"the device's reveal log ({REVEALS}) is unreadable: {type(exc).__name__}") from None

    def _run(self, run_id: int) -> dict:
        return self.doc["runs"].setdefault(str(int(run_id)), {"latest": None, "unmasked": {}})

    def latest(self, run_id: int) -> dict | None:
        return self._run(run_id)["latest"]

    def answered(self, run_id: int, digest: bytes) -> dict | None:
        return self._run(run_id)["unmasked"].get(digest.hex())

    def record_masked(self, run_id: int, round: int, digest: bytes, kind: str) -> None:
        self._run(run_id)["latest"] = {"digest": digest.hex(), "round": int(round), "kind": kind}
        self.store.save_text(REVEALS, json.dumps(self.doc, sort_keys=True))

    def record_unmask(self, run_id: int, round: int, digest: bytes, survivors: list[int], dropped: list[int]) -> None:
        self._run(run_id)["unmasked"][digest.hex()] = {"round": int(round), "survivors": sorted(survivors),
                                                       "dropped": sorted(dropped)}
        self.store.save_text(REVEALS, json.dumps(self.doc, sort_keys=True))


def device_keys(store: DeviceStore, *, create: bool = False) -> ClientKeys:
    """The device's long-term keys; created and persisted if ``create`` and absent."""
    text = store.load_text(KEYS)
    if text is not None:
        try:
            return ClientKeys.from_bytes(bytes.fromhex(text))
        except ValueError as exc:
            raise ValueError(f"the device's secure-aggregation keys ({KEYS}) are unreadable: {exc}") from None
    if not create:
        raise SecAggInputError("this device holds no secure-aggregation keys: it was never asked to advertise them")
    keys = ClientKeys()
    store.save_text(KEYS, keys.to_bytes().hex())
    logger.info("created the secure-aggregation keys of the device in %s", store.state_dir)
    return keys


def advertise(store: DeviceStore, cfg: Config, client_id: int) -> dict[str, Any]:
    """The key advertisement (public keys only)."""
    return SecAggClient(client_id, secagg_params(cfg), keys=device_keys(store, create=True)).advertise()


def check_request(store: DeviceStore, cfg: Config, client_id: int, request: dict[str, Any],
                  shared: Mapping[str, torch.Tensor] | None, *, floor: int = DEFAULT_MIN_CONTRIBUTORS,
                  params: SecAggParams | None = None, length: int | None = None) -> SecAggClient:
    """Validate what can be checked before training; pops the server's copy of this device's keys.

    A cohort smaller than the device's floor can never give a sum it would unmask: refused here,
    before any privacy budget is spent.
    """
    what = f"masked-input request to node {client_id}"
    if request.get("client_id") != client_id:
        raise SecAggInputError(f"{what}: it is addressed to client {request.get('client_id')!r}")
    if length is None:
        length = sum(t.numel() for t in (shared or {}).values())
    if request.get("length") != length:
        raise SecAggInputError(f"{what}: vector length {request.get('length')!r}, the expected {length}")
    cohort = request.get("cohort")
    if not isinstance(cohort, np.ndarray) or cohort.size < floor:
        logger.warning("%s: a cohort of %s devices is below this device's floor of %d contributors; refused", what,
                       getattr(cohort, "size", "?"), floor)
        raise SmallSumRefused(f"{what}: cohort below the floor {floor}")
    keys = device_keys(store)
    registered = (request.pop(SELF_ENC_PK, None), request.pop(SELF_MASK_PK, None))
    if registered != (keys.enc_public, keys.mask_public):
        raise SecAggInputError(f"{what}: the server registered other public keys for this device than it holds "
                               "(keys replaced since the advertisement?)")
    return SecAggClient(client_id, params or secagg_params(cfg), keys=keys)


def decline(client_id: int, request: Mapping[str, Any]) -> dict[str, Any]:
    """Stage-1 reply of a device that takes no part in this round's masking: no vector, no shares."""
    return {"client_id": int(client_id), "run_id": int(request["run_id"]), "round": int(request["round"]),
            "declined": 1}


def _send_masked(client: SecAggClient, store: DeviceStore, request: Mapping[str, Any], vec: np.ndarray,
                 extras: Mapping[str, float], kind: str) -> dict[str, Any]:
    payload = client.masked_input(request, vec, extras)
    # Remembered before the reply leaves: an unmask request is answered only for this round digest.
    RevealLog(store).record_masked(int(request["run_id"]), int(request["round"]), request_digest(request), kind)
    return payload


def masked_input(client: SecAggClient, cfg: Config, request: dict[str, Any],
                 update: Mapping[str, torch.Tensor], metrics: Mapping[str, float] | None, *,
                 store: DeviceStore) -> dict[str, Any]:
    """The masked reply to the train request (a device that trained; one that did not calls :func:`decline`)."""
    specs = extras_specs(cfg)
    # Device.train_round weights by n; the secure sum weights by n / max-examples (<= 1).
    vec = flatten(update) / cfg.data.max_examples
    norm = float(np.linalg.norm(vec))
    m = dict(metrics or {})
    m["examples"] = m.pop("weight", 0.0)
    m["clipped"] = 1.0 if norm > cfg.secagg.clip_norm else 0.0
    if m["clipped"]:
        logger.info("weighted update norm %.4f > secagg.clip-norm %g: clipped", norm, cfg.secagg.clip_norm)
    extras = {e.name: float(m.get(e.name, 0.0)) for e in specs}
    dropped = sorted(set(m) - set(extras))
    if dropped:
        logger.debug("metrics not in the secure sum: %s", dropped)
    return _send_masked(client, store, request, vec, extras, TRAIN)


def masked_step_input(client: SecAggClient, request: dict[str, Any], vec: np.ndarray, *,
                      store: DeviceStore) -> dict[str, Any]:
    """The masked reply to a step of a noisy sum (``privacy.noise-on = sum``): the clipped gradient sum,
    quantized, plus the device's discrete Gaussian share (``client``'s settings:
    :func:`privacy.sumdp.sum_secagg_params`); only ``trained`` rides beside it."""
    return _send_masked(client, store, request, vec, {"trained": 1.0}, DP_STEP)


def eval_masked_input(store: DeviceStore, cfg: Config, client_id: int, request: dict[str, Any],
                      row: Mapping[str, float], *, floor: int = DEFAULT_MIN_CONTRIBUTORS) -> dict[str, Any]:
    """The final evaluation's figures (:mod:`privacy.secagg.eval_figures`) as a masked vector of sums."""
    params = eval_params(cfg)
    vec, extras = encode_evaluation(cfg, row)
    client = check_request(store, cfg, client_id, request, None, floor=floor, params=params, length=vec.size)
    return _send_masked(client, store, request, vec, extras, EVALUATE)


def record_user_level(ledger, cfg: Config, *, dim: int, server_round: int) -> dict:
    """The distributed-DP entry of a round this device sent its (noised) update in."""
    return record_ddp(ledger, cfg, dim=dim, round=server_round)


def _unmask_params(cfg: Config, kind: str | None, *, cohort: int, length: int) -> SecAggParams:
    """The protocol settings of the masked input being unmasked (by its kind)."""
    if kind == EVALUATE:
        return eval_params(cfg)
    if kind == DP_STEP:
        from privacy.sumdp import sum_secagg_params

        return sum_secagg_params(cfg, cohort=cohort, dim=length)
    return secagg_params(cfg)


def unmask(store: DeviceStore, cfg: Config, client_id: int, request: Mapping[str, Any], *,
           floor: int = DEFAULT_MIN_CONTRIBUTORS) -> dict[str, Any]:
    """The unmask reply (shares of survivors' self-masks and of dropped neighbours' pair seeds).

    Refused (:class:`SmallSumRefused`, :class:`ReplayRefused`) when the survivors are fewer than
    the device's floor, when the request is not for the round digest of the device's latest
    masked input, or when the device already answered an unmask request for that digest (with
    the same survivor and dropout sets or not): a second answer would hand the server more shares
    of the same round (with another claimed dropout set, a survivor's self-mask *and* its pair seeds).
    """
    what = f"unmask request to node {client_id}"
    digest = request_digest(request, what=what)
    run_id, rnd = int(request["run_id"]), int(request["round"])
    survivors = [int(x) for x in np.asarray(request.get("survivors", np.zeros(0, np.uint64))).ravel()]
    cohort = [int(x) for x in np.asarray(request["cohort"]).ravel()]
    if len(set(survivors)) < floor:
        logger.warning("%s: %d survivors, below this device's floor of %d contributors; refused", what,
                       len(set(survivors)), floor)
        raise SmallSumRefused(f"{what}: {len(set(survivors))} survivors < floor {floor}")
    log = RevealLog(store)
    latest = log.latest(run_id)
    if latest is None or latest["digest"] != digest.hex():
        logger.warning("%s: round %d is not the round of this device's latest masked input (%s); refused", what, rnd,
                       "none" if latest is None else f"round {latest['round']}")
        raise ReplayRefused(f"{what}: not the latest masked input")
    first = log.answered(run_id, digest)
    if first is not None:
        same = first["survivors"] == sorted(survivors)
        logger.warning("%s: round %d already unmasked (survivor sets %s the first); refused", what, rnd,
                       "equal to" if same else "DIFFERENT from")
        raise ReplayRefused(f"{what}: round already unmasked")
    params = _unmask_params(cfg, latest.get("kind"), cohort=len(cohort), length=int(request["length"]))
    reply = SecAggClient(client_id, params, keys=device_keys(store)).unmask(request)
    dropped = sorted(set(cohort) - set(survivors))
    log.record_unmask(run_id, rnd, digest, survivors, dropped)  # before the reply leaves
    return reply
