"""The fedpersona ClientApp (Flower Message API): thin; the work is in :mod:`fedpersona.client.device`.

Message types:

* ``train`` — in: ``shared`` (ArrayRecord, the current shared adapter) and
  ``config`` (``server-round``), and, under secure aggregation (``secagg.enabled``, the
  default), the masked-input request (``secagg`` / ``secagg-arrays``). Out: only the masked
  payload (``secagg`` / ``secagg-arrays``: the masked vector of the update, weight 1, with
  ``trained`` as its only extra, and encrypted shares). A device that does not train (budget
  spent) replies with a decline (``secagg``: ``declined``), no vector and no shares: it takes no
  part in the sum. With ``secagg.enabled = false``: ``update`` (ArrayRecord, the change of the
  shared tensors) and ``metrics`` (``weight`` 1 and ``trained`` 1), or a ``status``
  ConfigRecord when the device declines (privacy budget spent). A device with secure
  aggregation on refuses a train request without the masked-input request.
* ``train.dp_step`` — noise on the sum (``privacy.noise-on = sum``): in: ``shared``, ``config``
  (``server-round``, ``step``), ``sum-context`` (the step's parameters, :class:`fedpersona.privacy.sumdp.SumContext`)
  and the masked-input request. Out: only the masked payload of the device's clipped per-example gradient
  sum plus its discrete Gaussian share (and ``trained``); or a decline. A plain ``train`` request is
  refused in that mode (no local rounds with the sum's noise).
* ``train.personalize`` — in: ``shared`` (the round's final shared adapter) and ``config``; out:
  ``status`` (``personalized``: 1 or 0). The device trains its head on top, for a round it took steps of.
* ``query.advertise`` — out: ``secagg``: the device's long-term public keys and, bound to them, its
  identity (the trust root's certificate and the identity's signature over run, node id and keys;
  once per run). A device without an identity refuses unless its policy allows unbound keys.
* ``query.consistency`` — in: ``secagg`` / ``secagg-arrays`` (the round setup and the survivor set).
  Out: ``secagg``: the device's signature over (round digest, survivor set), one set per round.
* ``query.unmask`` — in: ``secagg`` / ``secagg-arrays`` (survivors, their signatures and signing
  keys' bindings, forwarded shares). Out: the shares the server needs to unmask the survivors' sum,
  and the senders whose shares did not open (:mod:`fedpersona.client.secagg`).
* ``evaluate`` — in: ``shared`` and, under secure aggregation, a masked-input request for the
  evaluation sum. Out: only the masked vector of the device's bounded evaluation figures with its
  share of the evaluation noise (:mod:`fedpersona.privacy.secagg.eval_figures`: per-model loss and accuracy,
  one-hot loss and gain histograms; no user id); its unmask follows as ``query.unmask``. With
  ``secagg.enabled = false``: the same figures with the device's whole noise (``evaluation``
  ArrayRecord ``figures``). Either way the device records the release's user-level epsilon in its
  ledger before replying, and refuses it when that epsilon would exceed its ``policy.max-epsilon``.
  The device keeps its own evaluation row in its store (``evaluation``), where a simulation on
  the same machine reads it.

:data:`fedpersona.privacy.audit.message_table.TABLE` lists every field of every reply and what covers it.

Error replies carry the error class and a fixed text (:func:`_error`), never the exception's
message: that can hold the user's data (a malformed line of their data, a path named after them).
Every handler answers any exception this way, whatever its class (only a policy refusal names the
setting, :func:`_refuse`). The device's own log has the details.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedpersona.client import secagg
from fedpersona.client.device import LEDGER, BudgetExhausted, Device, UserData, state_dir_for
from fedpersona.client.failures import failure_mod
from fedpersona.client.flow_log import inventory_mod
from fedpersona.client.freshness import freshness_mod
from fedpersona.client.policy import DevicePolicy, PolicyViolation
from fedpersona.client.store import DeviceStore
from fedpersona.client.sumdp import StepRefused, check_context
from fedpersona.config import Config, load_config
from fedpersona.secagg_wire import from_records, has_request, to_records
from fedpersona.wire import to_record, unpack_shared
from fedpersona.privacy.secagg.eval_figures import eval_epsilon, noised_plain, record_eval
from fedpersona.privacy.sumdp import SumContext, sum_secagg_params

logger = logging.getLogger(__name__)

_DEVICES: OrderedDict[tuple[int, int], Device] = OrderedDict()  # least recently used first
_MAX_DEVICES: int | None = None  # None: every device built stays cached (one per SuperNode in a deployment)
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def limit_cached_devices(maximum: int | None) -> None:
    """Keep at most ``maximum`` simulated devices in memory (least recently used go first; ``None``: no bound).

    An evicted device loses nothing: its head, ledgers, participation and keys are in its
    encrypted state folder; building it again only recomputes its lower-block activations.
    """
    global _MAX_DEVICES
    if maximum is not None and (isinstance(maximum, bool) or not isinstance(maximum, int) or maximum < 1):
        raise ValueError(f"the device cache bound must be a positive integer or None. You passed: {maximum!r}")
    _MAX_DEVICES = maximum
    _evict()


def _evict() -> None:
    while _MAX_DEVICES is not None and len(_DEVICES) > _MAX_DEVICES:
        key, _ = _DEVICES.popitem(last=False)
        logger.debug("device of node %s evicted from memory (its state stays in its store)", key[1])


def cached_device(context: Context, *, prepared: UserData | None = None) -> Device:
    """The node's :class:`~fedpersona.client.device.Device` as the handlers use it (built on first use, then cached).

    ``prepared``: the user's examples already through the lower blocks (:func:`~fedpersona.client.device.prepare_users`,
    a simulation building a cohort's devices together), used only when the device is built now."""
    return _device(context, prepared=prepared)


def cached_devices(run_id: int) -> dict[int, Device]:
    """The devices of a run now in memory, by node id."""
    return {nid: d for (rid, nid), d in _DEVICES.items() if rid == run_id}


def release_devices(run_id: int) -> int:
    """Drop a finished run's devices from memory (their state stays in their stores); returns how many."""
    keys = [k for k in _DEVICES if k[0] == run_id]
    for k in keys:
        del _DEVICES[k]
    return len(keys)


def _device(context: Context, *, prepared: UserData | None = None) -> Device:
    key = (context.run_id, context.node_id)
    if key in _DEVICES:
        _DEVICES.move_to_end(key)
    else:
        threads = int(os.environ.get("FEDPERSONA_TORCH_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        cfg = load_config(context.run_config)
        if not cfg.secagg.enabled:
            logger.warning("secagg.enabled = false: this device's update and its noised evaluation figures go to the "
                           "server in the clear (plain aggregation)")
        node_config = dict(context.node_config)
        _DEVICES[key] = Device(cfg, node_config) if prepared is None else Device(cfg, node_config, prepared=prepared)
        _DEVICES[key].run_id = int(context.run_id)
        _evict()
    return _DEVICES[key]


def _store(context: Context) -> tuple[Config, DeviceStore]:
    """Config and state folder, without loading the model and data when the device is not loaded yet."""
    device = _DEVICES.get((context.run_id, context.node_id))
    if device is not None:
        return device.cfg, device.store
    cfg = load_config(context.run_config)
    return cfg, DeviceStore(state_dir_for(cfg, dict(context.node_config)))


#: What an error reply says besides the error class: fixed text (see the module docstring).
ERROR_TEXT = "the device could not answer this {kind} request; the details are in the device's own log"


def _error(message: Message, exc: BaseException) -> Message:
    kind = message.metadata.message_type
    public = getattr(type(exc), "public_reason", None)  # fixed text of the class, never of the instance
    if not isinstance(public, str) or not public:
        public = ERROR_TEXT.format(kind=kind)
    logger.error("node %s: %s request failed: %s: %s", message.metadata.dst_node_id, kind, type(exc).__name__, exc)
    return Message(Error(code=CLIENT_ERROR, reason=f"{type(exc).__name__}: {public}"), reply_to=message)


def _policy(context: Context) -> DevicePolicy:
    """The device's own policy (its floor, the colluders it assumes, whether it allows unbound keys)."""
    policy = getattr(_DEVICES.get((context.run_id, context.node_id)), "policy", None)
    if policy is not None:
        return policy
    _, store = _store(context)
    return DevicePolicy.load(dict(context.node_config), state_dir=store.state_dir)


def _floor(context: Context) -> int:
    """The device policy's floor on the contributors of any sum this device helps unmask."""
    return _policy(context).min_contributors


def _refuse(message: Message, exc: PolicyViolation) -> Message:
    """A round the device's privacy policy refuses: fixed text naming the setting, the server's value, the floor."""
    reason = f"{type(exc).__name__}: {exc}"
    logger.warning("node %s refused a %s request: %s", message.metadata.dst_node_id, message.metadata.message_type,
                   reason)
    return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=message)


def train(message: Message, context: Context) -> Message:
    try:
        device = _device(context)
        shared = unpack_shared(message.content)
        server_round = int(message.content["config"]["server-round"])
        if has_request(message.content):
            return _secure_train(message, context, device, shared, server_round)
        if device.cfg.secagg.enabled:
            raise ValueError("secagg.enabled = true but the train request carries no secure-aggregation request; "
                             "refusing to send a plain update")
        try:
            update, metrics = device.train_round(shared, server_round=server_round)
        except BudgetExhausted as exc:
            logger.info("%s", exc)
            status = ConfigRecord({"status": "budget-exhausted", "detail": "privacy budget spent; not training"})
            return Message(RecordDict({"status": status, "metrics": MetricRecord({"weight": 0.0, "trained": 0.0})}), reply_to=message)
    except PolicyViolation as exc:  # before training: nothing trained, nothing sent but the refusal
        return _refuse(message, exc)
    except Exception as exc:  # any other class too: the fixed text, never the exception's message
        return _error(message, exc)
    content = RecordDict({"update": to_record(update), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


def _secure_train(message: Message, context: Context, device: Device, shared: dict, server_round: int) -> Message:
    """Train, then reply with only the masked payload; a declining device says so and masks nothing."""
    request = from_records(message.content)
    client = secagg.check_request(device.store, device.cfg, context.node_id, request, shared, policy=_policy(context),
                                  node_config=context.node_config)
    try:
        update, metrics = device.train_round(shared, server_round=server_round)
    except BudgetExhausted as exc:
        logger.info("%s (declining: this device takes no part in this round's sum)", exc)
        reply = secagg.decline(client, request, store=device.store)
        return Message(RecordDict(to_records(reply)), reply_to=message)
    payload = secagg.masked_input(client, device.cfg, request, update, metrics, store=device.store)
    if device.cfg.secagg.ddp:
        ledger = device.load_ledger()
        entry = secagg.record_user_level(ledger, device.cfg, dim=int(request["length"]), server_round=server_round)
        device.store.save_text(LEDGER, ledger.to_json())  # before replying, like the DP-SGD ledger
        logger.info("%s round %d: distributed-DP user-level epsilon %.3f (delta %g)", device.user_id, server_round,
                    entry["epsilon"], entry["delta"])
    return Message(RecordDict(to_records(payload)), reply_to=message)


#: Message types of noise on the sum (``privacy.noise-on = sum``; :mod:`fedpersona.server.sumdp`).
DP_STEP, PERSONALIZE = "train.dp_step", "train.personalize"


def dp_step(message: Message, context: Context) -> Message:
    """One step of a noisy sum: the clipped gradient sum, quantized, plus this device's discrete Gaussian
    share, masked (:meth:`fedpersona.client.device.Device.sum_step`); a decline when the budget or the participation
    cap is reached; a refusal naming the setting when the step's parameters or order do not hold."""
    try:
        device = _device(context)
        if device.cfg.privacy.noise_on != "sum":
            raise PolicyViolation("privacy.noise-on", device.cfg.privacy.noise_on,
                                  "this run's config puts the noise on each device: no step of a noisy sum")
        shared = unpack_shared(message.content)
        config = message.content["config"]
        server_round, step = int(config["server-round"]), int(config["step"])
        claimed = SumContext.from_record(dict(message.content["sum-context"]))
        if not has_request(message.content):
            raise PolicyViolation("secagg.enabled", False, "a step of a noisy sum is answered only under secure "
                                  "aggregation: the request carries no masked-input request")
        request = from_records(message.content)
        cohort = request.get("cohort")
        size = int(getattr(cohort, "size", 0))
        # The device's own derivation of the step's parameters; a forged one is refused by name, first.
        own = check_context(device.cfg, claimed, server_round=server_round, step=step, cohort=max(1, size),
                            shared=shared)
        if int(request.get("round", -1)) != own.secagg_round:
            raise secagg.ReplayRefused(f"masked-input request for secure-aggregation round {request.get('round')!r}, "
                                       f"not the round {own.secagg_round} of round {server_round} step {step}")
        params = sum_secagg_params(device.cfg, cohort=size, dim=own.dim)
        client = secagg.check_request(device.store, device.cfg, context.node_id, request, shared,
                                      floor=_floor(context), params=params, length=own.dim, context=own.digest())
        try:
            vec, _ = device.sum_step(shared, claimed, run_id=context.run_id, server_round=server_round, step=step,
                                     cohort=size,
                                     bound_keys=secagg.malicious_secure(device.store, context.node_config))
        except BudgetExhausted as exc:
            logger.info("%s (declining: this device takes no part in this step's sum)", exc)
            return Message(RecordDict(to_records(secagg.decline(client, request, store=device.store))), reply_to=message)
        payload = secagg.masked_step_input(client, request, vec, store=device.store)
    except PolicyViolation as exc:
        return _refuse(message, exc)
    except Exception as exc:  # any class: the fixed text, never the message
        return _error(message, exc)
    return Message(RecordDict(to_records(payload)), reply_to=message)


def personalize(message: Message, context: Context) -> Message:
    """Train the head on top of the shared adapter sent: after a round of noisy sums, that round's final one
    (``client.head-at = round``); after the last round, the run's final one (``end``, once a run).

    The reply carries nothing but ``personalized`` (1: trained, 0: not a round whose head this device trains)."""
    try:
        device = _device(context)
        shared = unpack_shared(message.content)
        server_round = int(message.content["config"]["server-round"])
        try:
            device.personalize(shared, run_id=context.run_id, server_round=server_round)
            done = 1
        except StepRefused as exc:
            logger.info("node %s: %s", context.node_id, exc)
            done = 0
    except Exception as exc:  # any class: the fixed text, never the message
        return _error(message, exc)
    return Message(RecordDict({"status": ConfigRecord({"personalized": done})}), reply_to=message)


def advertise(message: Message, context: Context) -> Message:
    """The device's long-term secure-aggregation public keys (created on the first call), bound to its identity."""
    try:
        cfg, store = _store(context)
        payload = secagg.advertise(store, cfg, context.node_id, run_id=context.run_id, policy=_policy(context),
                                   node_config=context.node_config)
    except Exception as exc:  # any class: the fixed text, never the message
        return _error(message, exc)
    return Message(RecordDict(to_records(payload)), reply_to=message)


def consistency(message: Message, context: Context) -> Message:
    """The consistency check: the device's signature over the round's survivor set (one set per round)."""
    try:
        cfg, store = _store(context)
        payload = secagg.consistency(store, cfg, context.node_id, from_records(message.content),
                                     policy=_policy(context), node_config=context.node_config)
    except Exception as exc:  # any class: the fixed text, never the message
        return _error(message, exc)
    return Message(RecordDict(to_records(payload)), reply_to=message)


def unmask(message: Message, context: Context) -> Message:
    """Second stage of secure aggregation: the shares for the survivors' sum."""
    try:
        cfg, store = _store(context)
        payload = secagg.unmask(store, cfg, context.node_id, from_records(message.content), policy=_policy(context),
                                node_config=context.node_config)
    except Exception as exc:  # any class: the fixed text, never the message
        return _error(message, exc)
    return Message(RecordDict(to_records(payload)), reply_to=message)


def _record_evaluation(device: Device, message: Message, *, min_clients: int | None = None) -> None:
    """The evaluation release's user-level entry in the device's ledger, saved before the reply leaves."""
    group = message.metadata.group_id
    ledger = device.load_ledger()
    entry = record_eval(ledger, device.cfg, round=int(group) if group.isdigit() else 0, min_clients=min_clients)
    device.store.save_text(LEDGER, ledger.to_json())
    logger.info("%s: final evaluation sent with noise: user-level epsilon %.3f (delta %g)", device.user_id,
                entry["epsilon"], entry["delta"])


def _check_evaluation_noise(device: Device, *, min_clients: int | None = None) -> None:
    """The device's own bound: no release, the evaluation's included, beyond its ``policy.max-epsilon``."""
    eps = eval_epsilon(device.cfg, min_clients=min_clients)
    if eps > device.policy.max_epsilon:
        raise PolicyViolation("eval.noise-multiplier", device.cfg.eval.noise_multiplier,
                              f"the evaluation's user-level epsilon {eps:.3g} would exceed policy.max-epsilon "
                              f"{device.policy.max_epsilon:g}")


def evaluate(message: Message, context: Context) -> Message:
    """Evaluate on the held-out split; reply with the noised figures as a masked vector of sums (no user id)."""
    try:
        device = _device(context)
        secure = has_request(message.content)
        if not secure and device.cfg.secagg.enabled:
            raise ValueError("secagg.enabled = true but the evaluate request carries no secure-aggregation request; "
                             "refusing to send evaluation figures outside a secure sum")
        _check_evaluation_noise(device, min_clients=None if secure else 1)
        row = device.final_evaluation(unpack_shared(message.content), run_id=context.run_id)
        if secure:
            payload = secagg.eval_masked_input(device.store, device.cfg, context.node_id,
                                               from_records(message.content), row, floor=_floor(context),
                                               policy=_policy(context), node_config=context.node_config)
            _record_evaluation(device, message)
            return Message(RecordDict(to_records(payload)), reply_to=message)
        vec = noised_plain(device.cfg, row)  # no sum to hide in: the device's whole noise (local DP)
        _record_evaluation(device, message, min_clients=1)
        content = RecordDict({"evaluation": ArrayRecord({"figures": Array(vec)})})
    except PolicyViolation as exc:
        return _refuse(message, exc)
    except Exception as exc:  # any class: the fixed text, never the message
        return _error(message, exc)
    return Message(content, reply_to=message)


def build_app(*, mods: Sequence[Mod] = (), outer: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp: the flow log outermost (it records each reply as it leaves), then the device's own
    failure log, then ``mods``, then the store's one commit per message (:mod:`fedpersona.client.freshness`), then
    the handlers. ``outer``: mods before the flow log (they may hand it another context, never another
    reply)."""
    client_app = ClientApp(mods=[*outer, inventory_mod, failure_mod, *mods, freshness_mod])
    client_app.train()(train)
    client_app.train("dp_step")(dp_step)
    client_app.train("personalize")(personalize)
    client_app.query("advertise")(advertise)
    client_app.query("consistency")(consistency)
    client_app.query("unmask")(unmask)
    client_app.evaluate()(evaluate)
    return client_app


app = build_app()
