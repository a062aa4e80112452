"""The device side of secure aggregation: its long-term keys, and what it sends in each exchange.

The device's two long-term X25519 key pairs live in its encrypted store under ``secagg-keys``
(created by its first key advertisement, reused in every later round and run; never in a
message). Per round (:mod:`fedpersona.server.secagg` drives the exchanges):

* :func:`advertise`, once per run: its public keys and, bound to them, its identity: the
  certificate of the operator's trust root and the identity's signature over (run, node id, keys)
  (:mod:`fedpersona.identity`; the identity file is the node config's ``identity`` or
  ``<state-dir>/identity.json``). A device without an identity refuses
  (:class:`UnboundKeysRefused`) unless its own policy allows unbound keys
  (``policy.allow-unbound-keys``: then it warns at every use and records it);
* :func:`check_request`, *before* training: the masked-input request is addressed to this
  node, is for a vector of the shared adapter's length, names the public keys this device
  holds, carries the context the caller expects, and its graph (degree, threshold for this
  cohort's size) passes the device policy (:meth:`fedpersona.client.policy.DevicePolicy.check_graph`); it is
  not a round setup this device already masked for or declined; a request that would fail costs no
  privacy budget. The masking itself checks every neighbour's keys against the trust root;
* :func:`masked_input`, after training: the update ``new - old`` (weight 1 for every device),
  flattened in sorted-name order, clipped to ``secagg.clip-norm``, quantized (plus the device's
  distributed-DP noise share when ``secagg.ddp`` is on) and masked, with ``trained`` (1) as the
  only masked extra: no example count, loss, epsilon or timing;
* :func:`decline`: a device that does not train (privacy budget spent, or it refuses the round)
  takes no part in masking: it says so in stage 1 (no vector, no shares) and the server treats it
  as dropped before masking, so a sum never counts a device that did not train;
* :func:`consistency`: the device signs (round digest, survivor set), once per round digest and
  only for the round of its latest masked input; the set it signed is in :class:`RevealLog` before
  the reply leaves;
* :func:`unmask`: the shares the server needs for the survivors' sum, under the device's own rules:
  never for fewer survivors than its floor (:func:`min_contributors_floor`), only for the very set it
  signed and only with enough valid signatures of certified devices over that set (the consistency
  check of Bonawitz et al.), at most once per round digest, and only for the round of its latest
  masked input (:class:`RevealLog`, kept in the encrypted store, so a restart forgets nothing);
  a sender whose shares do not open is skipped and named;
* :func:`malicious_secure`: whether this device runs the protections against a malicious server
  (bound keys and the consistency check), for callers that depend on them;
* :func:`eval_masked_input`: the final evaluation's figures as one masked vector of sums with the
  device's share of the evaluation noise (:mod:`fedpersona.privacy.secagg.eval_figures`), through the same protocol.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedpersona.client.policy import DevicePolicy
from fedpersona.client.store import DeviceStore
from fedpersona.config import Config
from fedpersona.identity import DeviceIdentity, IdentityError, identity_path, load_device_identity
from fedpersona.secagg_wire import SELF_ENC_PK, SELF_MASK_PK, SELF_SIGN_PK, flatten
from fedpersona.privacy.secagg import ClientKeys, SecAggClient, SecAggInputError, SecAggParams
from fedpersona.privacy.secagg.eval_figures import encode as encode_evaluation
from fedpersona.privacy.secagg.eval_figures import eval_params
from fedpersona.privacy.secagg.settings import extras_specs, record_ddp, secagg_params
from fedpersona.privacy.secagg.spec import request_digest

__all__ = ["KEYS", "REVEALS", "DEFAULT_MIN_CONTRIBUTORS", "FLOOR_KEY", "ConsistencyRefused", "Refused",
           "ReplayRefused", "RevealLog", "SmallSumRefused", "UnboundKeysRefused", "advertise", "check_request",
           "consistency", "decline", "device_identity", "device_keys", "eval_masked_input", "malicious_secure",
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


class ConsistencyRefused(Refused):
    public_reason = ("refused: this device signs one survivor set per round and reveals shares only for that set, "
                     "certified by enough signatures")


class UnboundKeysRefused(Refused):
    public_reason = ("refused: this device holds no identity certified by a trust root, and its policy does not "
                     "allow unbound keys")


def min_contributors_floor(node_config: Mapping[str, Any], *, state_dir=None) -> int:
    """The device's own floor: its privacy policy's ``policy.min-contributors`` (node config and
    ``policy.toml`` in its state folder, the stricter wins; default 3, at least 2: :mod:`fedpersona.client.policy`)."""
    from fedpersona.client.policy import DevicePolicy

    return DevicePolicy.load(node_config, state_dir=state_dir).min_contributors


class RevealLog:
    """What this device revealed, per run: its latest masked input and every unmask it answered.

    Stored in the device's encrypted store (blob ``secagg-reveals``) *before* each reply, as
    ``{"runs": {run_id: {"latest": {"digest", "round", "kind"}, "declined": [digest, ...],
    "signed": {digest: {"round", "survivors"}}, "unmasked": {digest: {"round", "survivors",
    "dropped"}}, "unbound-keys": true}}}``. Only round digests, rounds and client ids: facts the
    server already holds (``unbound-keys``: this device took part in the run without an identity).
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
        run = self.doc["runs"].setdefault(str(int(run_id)), {"latest": None, "unmasked": {}})
        run.setdefault("signed", {})
        run.setdefault("declined", [])
        return run

    def _save(self) -> None:
        self.store.save_text(REVEALS, json.dumps(self.doc, sort_keys=True))

    def signed(self, run_id: int, digest: bytes) -> list[int] | None:
        """The survivor set this device signed for a round digest (None if none)."""
        entry = self._run(run_id)["signed"].get(digest.hex())
        return None if entry is None else list(entry["survivors"])

    def record_signed(self, run_id: int, round: int, digest: bytes, survivors: list[int]) -> None:
        self._run(run_id)["signed"][digest.hex()] = {"round": int(round), "survivors": sorted(survivors)}
        self._save()

    def declined(self, run_id: int, digest: bytes) -> bool:
        return digest.hex() in self._run(run_id)["declined"]

    def record_declined(self, run_id: int, digest: bytes) -> None:
        self._run(run_id)["declined"].append(digest.hex())
        self._save()

    def record_unbound(self, run_id: int) -> None:
        run = self._run(run_id)
        if not run.get("unbound-keys"):
            run["unbound-keys"] = True
            self._save()

    def latest(self, run_id: int) -> dict | None:
        return self._run(run_id)["latest"]

    def answered(self, run_id: int, digest: bytes) -> dict | None:
        return self._run(run_id)["unmasked"].get(digest.hex())

    def record_masked(self, run_id: int, round: int, digest: bytes, kind: str) -> None:
        self._run(run_id)["latest"] = {"digest": digest.hex(), "round": int(round), "kind": kind}
        self._save()

    def record_unmask(self, run_id: int, round: int, digest: bytes, survivors: list[int], dropped: list[int]) -> None:
        self._run(run_id)["unmasked"][digest.hex()] = {"round": int(round), "survivors": sorted(survivors),
                                                       "dropped": sorted(dropped)}
        self._save()


#: The keys read from a store, by the tag of the blob they were read from: a device's messages (3 or 4 a
#: participation) parse them once.
_KEYS: dict[str, ClientKeys] = {}


def device_keys(store: DeviceStore, *, create: bool = False) -> ClientKeys:
    """The device's long-term keys; created and persisted if ``create`` and absent.

    Keys saved before devices had a signing key get one (saved at once, so it is the same afterwards).
    """
    tag = store.tag(KEYS)
    if tag is not None and (hit := _KEYS.get(tag)) is not None:
        return hit  # the very blob these keys were read from (the tag changes whenever it is written)
    text = store.load_text(KEYS)
    if text is not None:
        try:
            raw = bytes.fromhex(text)
            keys = ClientKeys.from_bytes(raw)
        except ValueError as exc:
            raise ValueError(f"the device's secure-aggregation keys ({KEYS}) are unreadable: {exc}") from None
        if len(raw) != len(keys.to_bytes()):
            store.save_text(KEYS, keys.to_bytes().hex())
            logger.info("added a signing key to the secure-aggregation keys of the device in %s", store.state_dir)
        elif tag is not None:
            if len(_KEYS) >= 4096:
                _KEYS.clear()
            _KEYS[tag] = keys
        return keys
    if not create:
        raise SecAggInputError("this device holds no secure-aggregation keys: it was never asked to advertise them")
    keys = ClientKeys()
    store.save_text(KEYS, keys.to_bytes().hex())
    logger.info("created the secure-aggregation keys of the device in %s", store.state_dir)
    return keys


def device_identity(store: DeviceStore, node_config: Mapping[str, Any] | None = None) -> DeviceIdentity | None:
    """The device's identity (node config ``identity``, else ``<state-dir>/identity.json``), or None if it has none."""
    return load_device_identity(store.state_dir, node_config)


def malicious_secure(store: DeviceStore, node_config: Mapping[str, Any] | None = None) -> bool:
    """Whether this device's secure aggregation holds against a malicious server: its keys are bound to an
    identity certified by its trust root (so it can check its neighbours' and the signers' keys), and it runs
    the consistency check (always, in this protocol). False for a device on unbound keys."""
    try:
        return device_identity(store, node_config) is not None
    except (IdentityError, ValueError) as exc:
        logger.warning("the device's identity is unusable (%s): not protected against a malicious server", exc)
        return False


def _policy(policy: DevicePolicy | None, store: DeviceStore, node_config: Mapping[str, Any] | None) -> DevicePolicy:
    return policy if policy is not None else DevicePolicy.load(node_config or {}, state_dir=store.state_dir)


def _client(store: DeviceStore, cfg: Config, client_id: int, *, policy: DevicePolicy, node_config,
            floor: int | None, params: SecAggParams | None = None, create: bool = False,
            run_id: int | None = None) -> SecAggClient:
    """The protocol client with the device's keys, identity and trust root, or a refusal without an identity."""
    identity = device_identity(store, node_config)
    if identity is None:
        where = identity_path(store.state_dir, node_config)
        if not policy.allow_unbound_keys:
            logger.warning("node %s: no identity certified by a trust root (%s is missing): refusing secure aggregation "
                           "with keys the server could forge; give the device its identity file from `fedpersona "
                           "certs`, or set policy.allow-unbound-keys = true to accept the weaker protocol", client_id,
                           where)
            raise UnboundKeysRefused(f"node {client_id}: no identity at {where}")
        logger.warning("node %s: UNBOUND KEYS: no identity certified by a trust root (%s); policy.allow-unbound-keys = "
                       "true: this device masks against keys the server could have generated itself and counts "
                       "signatures it cannot attribute: secure aggregation holds only against an honest-but-curious "
                       "server", client_id, where)
        if run_id is not None:
            RevealLog(store).record_unbound(run_id)
    return SecAggClient(client_id, params or secagg_params(cfg), keys=device_keys(store, create=create),
                        identity=identity, colluders=policy.max_colluders,
                        floor=policy.min_contributors if floor is None else floor)


def advertise(store: DeviceStore, cfg: Config, client_id: int, *, run_id: int = 0,
              node_config: Mapping[str, Any] | None = None, policy: DevicePolicy | None = None) -> dict[str, Any]:
    """The key advertisement: public keys, and the identity's certificate and binding of them (no secret)."""
    policy = _policy(policy, store, node_config)
    client = _client(store, cfg, client_id, policy=policy, node_config=node_config, floor=None, create=True,
                     run_id=run_id)
    return client.advertise(run_id=run_id)


def check_request(store: DeviceStore, cfg: Config, client_id: int, request: dict[str, Any],
                  shared: Mapping[str, torch.Tensor] | None, *, floor: int | None = None,
                  params: SecAggParams | None = None, length: int | None = None,
                  context: bytes | Callable[[Mapping[str, Any]], bytes] = b"", policy: DevicePolicy | None = None,
                  node_config: Mapping[str, Any] | None = None) -> SecAggClient:
    """Validate what can be checked before training; pops the server's copy of this device's keys.

    A cohort smaller than the device's floor can never give a sum it would unmask: refused here,
    before any privacy budget is spent. ``context``: the bytes the request's ``context`` must equal
    (or a callable computing them from the request): what the round sums (default: nothing extra).
    A graph weaker than the device policy accepts for this cohort's size raises
    :class:`~fedpersona.client.policy.PolicyViolation`.
    """
    what = f"masked-input request to node {client_id}"
    policy = _policy(policy, store, node_config)
    floor = policy.min_contributors if floor is None else floor
    if request.get("client_id") != client_id:
        raise SecAggInputError(f"{what}: it is addressed to client {request.get('client_id')!r}")
    if length is None:
        length = sum(t.numel() for t in (shared or {}).values())
    if request.get("length") != length:
        raise SecAggInputError(f"{what}: vector length {request.get('length')!r}, the expected {length}")
    expected = context(request) if callable(context) else context
    if not isinstance(request.get("context"), bytes) or request["context"] != bytes(expected):
        raise SecAggInputError(f"{what}: the round's context is not the one this device computes for it")
    cohort = request.get("cohort")
    if not isinstance(cohort, np.ndarray) or cohort.size < floor:
        logger.warning("%s: a cohort of %s devices is below this device's floor of %d contributors; refused", what,
                       getattr(cohort, "size", "?"), floor)
        raise SmallSumRefused(f"{what}: cohort below the floor {floor}")
    degree, threshold = request.get("degree"), request.get("threshold")
    if not isinstance(degree, int) or not isinstance(threshold, int):
        raise SecAggInputError(f"{what}: degree and threshold must be integers")
    policy.check_graph(int(cohort.size), degree, threshold, degree_setting=cfg.secagg.degree,
                       threshold_setting=cfg.secagg.threshold)
    digest = request_digest(request, what=what)
    log = RevealLog(store)
    run_id = int(request["run_id"])
    latest = log.latest(run_id)
    if (latest is not None and latest["digest"] == digest.hex()) or log.declined(run_id, digest):
        logger.warning("%s: this device already answered this round setup (round %s); refused", what,
                       request.get("round"))
        raise ReplayRefused(f"{what}: round setup already answered")
    client = _client(store, cfg, client_id, policy=policy, node_config=node_config, floor=floor, params=params,
                     run_id=run_id)
    keys = client.keys
    registered = (request.pop(SELF_ENC_PK, None), request.pop(SELF_MASK_PK, None), request.pop(SELF_SIGN_PK, None))
    if registered != (keys.enc_public, keys.mask_public, keys.sign_public):
        raise SecAggInputError(f"{what}: the server registered other public keys for this device than it holds "
                               "(keys replaced since the advertisement?)")
    # Round parameters, graph, and every neighbour's keys bound to a certified identity: before training.
    client.check_masked_request(request)
    return client


def decline(client: SecAggClient, request: Mapping[str, Any], *, store: DeviceStore) -> dict[str, Any]:
    """Stage-1 reply of a device that takes no part in this round's masking: no vector, no shares, signed.

    The device remembers the round setup it declined: it never masks for it nor signs its survivor set.
    """
    reply = client.decline(request)
    RevealLog(store).record_declined(int(request["run_id"]), request_digest(request))
    return reply


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
    vec = flatten(update)  # weight 1: the server divides the sum by the number of survivors
    norm = float(np.linalg.norm(vec))
    if norm > cfg.secagg.clip_norm:  # the device's own log only: the flag is not sent
        logger.info("update norm %.4f > secagg.clip-norm %g: clipped", norm, cfg.secagg.clip_norm)
    m = dict(metrics or {})
    extras = {e.name: float(m.get(e.name, 0.0)) for e in specs}
    dropped = sorted(set(m) - set(extras))
    if dropped:
        logger.debug("metrics not in the secure sum: %s", dropped)
    return _send_masked(client, store, request, vec, extras, TRAIN)


def masked_step_input(client: SecAggClient, request: dict[str, Any], vec: np.ndarray, *,
                      store: DeviceStore) -> dict[str, Any]:
    """The masked reply to a step of a noisy sum (``privacy.noise-on = sum``): the clipped gradient sum,
    quantized, plus the device's discrete Gaussian share (``client``'s settings:
    :func:`fedpersona.privacy.sumdp.sum_secagg_params`); only ``trained`` rides beside it."""
    return _send_masked(client, store, request, vec, {"trained": 1.0}, DP_STEP)


def eval_masked_input(store: DeviceStore, cfg: Config, client_id: int, request: dict[str, Any],
                      row: Mapping[str, float], *, floor: int | None = None, policy: DevicePolicy | None = None,
                      node_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The final evaluation's figures (:mod:`fedpersona.privacy.secagg.eval_figures`) as a masked vector of sums."""
    params = eval_params(cfg)
    vec, extras = encode_evaluation(cfg, row)
    client = check_request(store, cfg, client_id, request, None, floor=floor, params=params, length=vec.size,
                           policy=policy, node_config=node_config)
    return _send_masked(client, store, request, vec, extras, EVALUATE)


def record_user_level(ledger, cfg: Config, *, dim: int, server_round: int) -> dict:
    """The distributed-DP entry of a round this device sent its (noised) update in."""
    return record_ddp(ledger, cfg, dim=dim, round=server_round)


def _unmask_params(cfg: Config, kind: str | None, *, cohort: int, length: int) -> SecAggParams:
    """The protocol settings of the masked input being unmasked (by its kind)."""
    if kind == EVALUATE:
        return eval_params(cfg)
    if kind == DP_STEP:
        from fedpersona.privacy.sumdp import sum_secagg_params

        return sum_secagg_params(cfg, cohort=cohort, dim=length)
    return secagg_params(cfg)


def _latest_round(log: RevealLog, run_id: int, digest: bytes, rnd: int, what: str) -> dict:
    latest = log.latest(run_id)
    if latest is None or latest["digest"] != digest.hex():
        logger.warning("%s: round %d is not the round of this device's latest masked input (%s); refused", what, rnd,
                       "none" if latest is None else f"round {latest['round']}")
        raise ReplayRefused(f"{what}: not the latest masked input")
    return latest


def consistency(store: DeviceStore, cfg: Config, client_id: int, request: Mapping[str, Any], *,
                floor: int | None = None, policy: DevicePolicy | None = None,
                node_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The device's signature over (round digest, survivor set): one set per round digest, remembered first.

    Refused (:class:`ReplayRefused`) unless the request is for the round of the device's latest
    masked input, and (:class:`ConsistencyRefused`) when the device already signed another set for
    it; the library refuses a set that lacks this device, is below its floor (plus the colluders its
    policy assumes) or the round's minimum, cannot reach the signature quorum, or is disconnected.
    The same set again gets the same signature.
    """
    what = f"consistency request to node {client_id}"
    policy = _policy(policy, store, node_config)
    digest = request_digest(request, what=what)
    run_id, rnd = int(request["run_id"]), int(request["round"])
    log = RevealLog(store)
    latest = _latest_round(log, run_id, digest, rnd, what)
    survivors = sorted(int(x) for x in np.asarray(request.get("survivors", np.zeros(0, np.uint64))).ravel())
    before = log.signed(run_id, digest)
    if before is not None and before != survivors:
        logger.warning("%s: round %d: this device already signed a DIFFERENT survivor set (%d members, now %d); "
                       "refused", what, rnd, len(before), len(survivors))
        raise ConsistencyRefused(f"{what}: another survivor set already signed")
    cohort = [int(x) for x in np.asarray(request["cohort"]).ravel()]
    params = _unmask_params(cfg, latest.get("kind"), cohort=len(cohort), length=int(request["length"]))
    client = _client(store, cfg, client_id, policy=policy, node_config=node_config, floor=floor, params=params)
    reply = client.consistency(request, signed=before)
    if before is None:
        log.record_signed(run_id, rnd, digest, survivors)  # before the reply leaves
    return reply


def unmask(store: DeviceStore, cfg: Config, client_id: int, request: Mapping[str, Any], *,
           floor: int | None = None, policy: DevicePolicy | None = None,
           node_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The unmask reply (shares of survivors' self-masks and of dropped neighbours' pair seeds).

    Refused (:class:`SmallSumRefused`, :class:`ReplayRefused`, :class:`ConsistencyRefused`) when the
    survivors are fewer than the device's floor, when the request is not for the round digest of the
    device's latest masked input, when the device already answered an unmask request for that digest
    (with the same survivor and dropout sets or not): a second answer would hand the server more shares
    of the same round (with another claimed dropout set, a survivor's self-mask *and* its pair seeds),
    and when its survivor set is not the one the device signed in the consistency check; the library
    then refuses unless enough valid signatures of certified devices over that set come with it.
    """
    what = f"unmask request to node {client_id}"
    policy = _policy(policy, store, node_config)
    floor = policy.min_contributors if floor is None else floor
    digest = request_digest(request, what=what)
    run_id, rnd = int(request["run_id"]), int(request["round"])
    survivors = [int(x) for x in np.asarray(request.get("survivors", np.zeros(0, np.uint64))).ravel()]
    cohort = [int(x) for x in np.asarray(request["cohort"]).ravel()]
    if len(set(survivors)) < floor:
        logger.warning("%s: %d survivors, below this device's floor of %d contributors; refused", what,
                       len(set(survivors)), floor)
        raise SmallSumRefused(f"{what}: {len(set(survivors))} survivors < floor {floor}")
    log = RevealLog(store)
    latest = _latest_round(log, run_id, digest, rnd, what)
    first = log.answered(run_id, digest)
    if first is not None:
        same = first["survivors"] == sorted(survivors)
        logger.warning("%s: round %d already unmasked (survivor sets %s the first); refused", what, rnd,
                       "equal to" if same else "DIFFERENT from")
        raise ReplayRefused(f"{what}: round already unmasked")
    signed = log.signed(run_id, digest)
    if signed != sorted(survivors):
        logger.warning("%s: round %d: the survivor set is %s; refused", what, rnd,
                       "not signed by this device" if signed is None else "NOT the one this device signed")
        raise ConsistencyRefused(f"{what}: survivor set not the one signed")
    params = _unmask_params(cfg, latest.get("kind"), cohort=len(cohort), length=int(request["length"]))
    client = _client(store, cfg, client_id, policy=policy, node_config=node_config, floor=floor, params=params)
    reply = client.unmask(request, signed=signed)
    dropped = sorted(set(cohort) - set(survivors))
    log.record_unmask(run_id, rnd, digest, survivors, dropped)  # before the reply leaves
    return reply
