"""The device's own privacy policy: floors that no server setting can lower.

The run config comes from the server. A dishonest or misconfigured server could set
``privacy.enabled = false``, ``privacy.target-epsilon = 1000``, ``privacy.noise-multiplier =
0.01``, ``secagg.enabled = false`` or ``secagg.threshold = 1``; a device that simply obeyed would
release its user's data without the guarantee its owner expects. So each device holds a
:class:`DevicePolicy` of its own, and before it trains a round it checks the server's settings
against it (:meth:`DevicePolicy.check`). A round whose settings would weaken the policy is
refused: the device replies with an error naming the setting, the server's value and the floor
(:class:`PolicyViolation`; never anything of the user's data) and logs a warning. The settings it
accepted are written into its privacy ledger with the round.

Where the policy comes from (keys, defaults):

====================================  =========  ==================================================
key                                   default    meaning
====================================  =========  ==================================================
``policy.allow-no-dp``                ``false``  accept rounds with ``privacy.enabled = false``
                                                 (warns loudly; the release is recorded in the
                                                 ledger as epsilon = infinity, for good)
``policy.max-epsilon``                ``8.0``    largest ``privacy.target-epsilon`` accepted: the
                                                 device's lifetime budget; a round whose noise alone
                                                 would spend more is refused too
``policy.max-delta``                  ``0``      largest ``privacy.delta`` (``0``: no floor but the
                                                 rule that always holds: below 1/n, n the device's
                                                 training examples)
``policy.min-noise-multiplier``       ``0``      smallest noise multiplier accepted (``0``: unset)
``policy.allow-no-secagg``            ``false``  accept ``secagg.enabled = false`` (plain
                                                 aggregation: the update in the clear; warns)
``policy.min-threshold-fraction``     ``0.5``    the Shamir threshold t must exceed this fraction of
                                                 the k + 1 share holders (0.5: a strict majority)
``policy.min-contributors``           ``3``      fewest trained contributors in any sum this device
                                                 helps unmask (enforced by the secure-aggregation
                                                 unmask stage); with noise on the sum also the
                                                 fewest honest contributors t it accepts
``policy.max-honest-fraction``        ``0.5``    with noise on the sum: the largest t it accepts, as
                                                 a fraction of the announced cohort
``policy.max-participations``         ``0``      rounds it takes part in and plans its noise for at
                                                 most (``0``: the server's ``client.max-participations``)
``policy.max-colluders``              ``0``      devices of a cohort this device assumes may collude
                                                 with the server: the consistency check needs more
                                                 than (K + c) / 2 signatures, a sum at least
                                                 ``min-contributors + c`` survivors, and (c > 0) the
                                                 threshold at least ``min-contributors + c``
``policy.allow-unbound-keys``         ``false``  take part in secure aggregation without an identity
                                                 certified by a trust root (keys the server could
                                                 forge; warns loudly and is recorded)
``policy.max-local-steps``            ``100``    most ``client.local-steps`` (DP-SGD steps of the
                                                 shared adapter) in a round
``policy.max-head-steps``             ``100``    most ``client.head-steps`` in a round
``policy.max-batch-size``             ``128``    largest ``client.batch-size`` and
                                                 ``client.head-batch-size``
``policy.max-seq-len``                ``512``    largest ``model.seq-len`` (tokens per example)
``policy.max-round-seconds``          ``1800``   wall-time budget of one training round, enforced
                                                 while it trains (below)
====================================  =========  ==================================================

The last five are the device's **cost** caps: the server chooses how much work a round is, the
device decides how much it will do. A round above a cap is refused before anything is computed,
like a weakened privacy setting (:meth:`DevicePolicy.check_cost`). The wall-time budget is enforced
between training steps, from the moment the device starts the round: a DP pass stopped by it
releases nothing (the round fails with a fixed-text error), and the steps it did take stay in the
privacy ledger (they were computed on the user's data; an update is released only when every one
of its steps is accounted); a head pass stopped by it keeps the steps it took, and the round's
shared update, fully trained and accounted, is sent. The defaults fit every shipped scenario
(``simulations/conf/*.toml``: at most 15 local and 12 head steps, batches of 8, 64 tokens) with
room to spare; a simulation with more passes ``--device-policy max-local-steps=...``. A result
trained by a simulation's cohort engine (one pass for many devices) is checked against the step,
batch and length caps, not the wall time.

The secure-aggregation graph is checked too (:meth:`DevicePolicy.check_graph`, for the largest
cohort here and for each request's own cohort in :mod:`fedpersona.client.secagg`): a degree below
:func:`required_degree` for the cohort size, or a threshold below the rules above, is refused
naming ``secagg.degree`` / ``secagg.threshold`` and why.

Two sources, both on the device: the node config (``flower-supernode --node-config
"policy.max-epsilon=4"``, or the ``nodes`` of an in-process federation) and ``policy.toml`` in
the device's state folder (``max-epsilon = 4``, top level or under ``[policy]``). When both set
a key, **the stricter value wins** (the smaller maximum, the larger minimum, ``false`` over
``true`` for the ``allow-*`` keys): neither source can loosen what the other asks for. Unknown
``policy.*`` keys and bad values raise ``ValueError`` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpersona.config import Config
from fedpersona.privacy.ledger import calibrate_noise
from fedpersona.privacy.secagg.graph import default_degree
from fedpersona.privacy.secagg.settings import secagg_params

__all__ = ["DevicePolicy", "PolicyViolation", "POLICY_FILE", "PREFIX", "required_degree"]

logger = logging.getLogger(__name__)

PREFIX = "policy."
POLICY_FILE = "policy.toml"

# How two sources combine, per field: the stricter value wins.
_STRICTER = {
    "allow_no_dp": lambda a, b: a and b,
    "max_epsilon": min,
    "max_delta": lambda a, b: min(x for x in (a, b) if x > 0) if (a > 0 or b > 0) else 0.0,
    "min_noise_multiplier": max,
    "allow_no_secagg": lambda a, b: a and b,
    "min_threshold_fraction": max,
    "min_contributors": max,
    "max_honest_fraction": min,
    "max_participations": lambda a, b: min(x for x in (a, b) if x > 0) if (a > 0 or b > 0) else 0,
    "max_colluders": max,
    "allow_unbound_keys": lambda a, b: a and b,
    "max_local_steps": min,
    "max_head_steps": min,
    "max_batch_size": min,
    "max_seq_len": min,
    "max_round_seconds": min,
}


def required_degree(n: int) -> int:
    """The smallest SecAgg+ graph degree a device accepts for a cohort of ``n``: ``2 ceil(1.5 log2 n)``, at most n - 1.

    SecAgg+ (Bell et al., CCS 2020) replaces the complete graph by one of degree O(log n). On the random
    ring graph (:mod:`fedpersona.privacy.secagg.graph`) the honest survivors are cut apart only by k/2 consecutive
    removed (dropped or colluding) devices; with a fraction r of the cohort removed at random that
    happens with probability at most ``n r^(k/2)``, which at this degree and r = 1/3 is ``n^-1.38``
    (7e-5 at n = 1000). (Whether each device keeps t live holders is the round's dropout tolerance, not
    a privacy matter: a round without them aborts.)
    """
    return default_degree(n)


class PolicyViolation(ValueError):
    """The server's settings would weaken this device's privacy policy; the round is refused.

    The message names the setting, the server's value and the floor; it never carries the
    user's data (not even the number of training examples).
    """

    def __init__(self, setting: str, value: Any, requirement: str) -> None:
        self.setting, self.value, self.requirement = setting, value, requirement
        super().__init__(f"the device's privacy policy refuses {setting} = {value!r}: {requirement}")


def _key(attr: str) -> str:
    return PREFIX + attr.replace("_", "-")


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"Invalid device policy value for {key!r}: {why}. You passed: {value!r}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(key, value, "must be true or false")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _bad(key, value, "must be a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _bad(key, value, "must be a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, value, "must be a finite number")
    return float(value)


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _bad(key, value, "must be an integer")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise _bad(key, value, "must be an integer") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise _bad(key, value, "must be an integer")
    return value


@functools.lru_cache(maxsize=64)
def _one_round_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str,
                       on_sum: bool = False) -> float:
    from fedpersona.privacy.ledger import PrivacyLedger

    return PrivacyLedger(accountant=accountant).epsilon_if(noise_multiplier=sigma, sample_rate=q, num_steps=steps,
                                                           delta=delta, on_sum=on_sum)


def _malicious_secure_ok(cfg: Config, *, bound_keys: bool) -> tuple[bool, str]:
    """Whether the secure sum is safe enough to carry noise added once for the whole cohort.

    Noise on the sum (``privacy.noise-on = sum``) gives each device's records their guarantee only if the
    server learns nothing but sums of at least t devices' shares. Against a server that deviates from the
    protocol that needs secure aggregation itself (``secagg.enabled``), with every party checking what it
    signs (the consistency check: one survivor set and, bound into the round digest, the step's
    parameters, one view for all) and neighbour keys bound to identities the server cannot forge
    (``bound_keys``: :func:`fedpersona.client.secagg.malicious_secure`, the device holds an identity certified by
    its trust root). ``(False, why)`` otherwise; the device then refuses noise on the sum by name.
    """
    if not cfg.secagg.enabled:
        return False, "noise on the sum needs secure aggregation (secagg.enabled = true)"
    if not bound_keys:
        return False, ("noise on the sum needs secure aggregation that holds against a malicious server: this device "
                       "has no identity certified by a trust root (keys the server could forge; policy.allow-unbound-"
                       "keys does not extend to noise on the sum)")
    return True, ""


@dataclass(frozen=True)
class DevicePolicy:
    """A device's privacy floors (safe defaults); see the module docstring for the keys."""

    allow_no_dp: bool = False
    max_epsilon: float = 8.0
    max_delta: float = 0.0
    min_noise_multiplier: float = 0.0
    allow_no_secagg: bool = False
    min_threshold_fraction: float = 0.5
    min_contributors: int = 3
    max_honest_fraction: float = 0.5
    max_participations: int = 0
    max_colluders: int = 0
    allow_unbound_keys: bool = False
    max_local_steps: int = 100
    max_head_steps: int = 100
    max_batch_size: int = 128
    max_seq_len: int = 512
    max_round_seconds: float = 1800.0
    #: where the values came from (for the log and the audit), not part of the policy itself
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        for attr in ("allow_no_dp", "allow_no_secagg", "allow_unbound_keys"):
            if not isinstance(getattr(self, attr), bool):
                raise _bad(_key(attr), getattr(self, attr), "must be true or false")
        e = self.max_epsilon
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not (0 < e < math.inf):
            raise _bad(_key("max_epsilon"), e, "must be a finite number > 0")
        d = self.max_delta
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise _bad(_key("max_delta"), d, "must be in [0, 1) (0: only the below-1/n rule)")
        s = self.min_noise_multiplier
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < math.inf:
            raise _bad(_key("min_noise_multiplier"), s, "must be a finite number >= 0 (0: unset)")
        f = self.min_threshold_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.5 <= f < 1:
            raise _bad(_key("min_threshold_fraction"), f,
                       "must be in [0.5, 1): at least a strict majority of the share holders")
        c = self.min_contributors
        if isinstance(c, bool) or not isinstance(c, int) or c < 2:
            raise _bad(_key("min_contributors"), c,
                       "must be an integer >= 2 (a sum of one contributor is that contributor's update)")
        h = self.max_honest_fraction
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 < h <= 1:
            raise _bad(_key("max_honest_fraction"), h, "must be in (0, 1] (the largest t / announced cohort)")
        m = self.max_participations
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise _bad(_key("max_participations"), m, "must be an integer >= 0 (0: the server's suggestion)")
        m = self.max_colluders
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise _bad(_key("max_colluders"), m, "must be an integer >= 0")
        for attr in ("max_local_steps", "max_head_steps", "max_batch_size", "max_seq_len"):
            v = getattr(self, attr)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(_key(attr), v, "must be an integer >= 1")
        w = self.max_round_seconds
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
            raise _bad(_key("max_round_seconds"), w, "must be a finite number of seconds > 0")

    # ------------------------------------------------------------------ reading
    @classmethod
    def keys(cls) -> list[str]:
        return [_key(f.name) for f in dataclasses.fields(cls) if f.name != "source"]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "node config") -> "DevicePolicy":
        """A policy from ``policy.*`` keys (other keys are ignored: the node config holds more)."""
        return cls(source=source, **cls._parse(values, where=source))

    @classmethod
    def _parse(cls, values: Mapping[str, Any], *, where: str) -> dict[str, Any]:
        types = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "source"}
        out: dict[str, Any] = {}
        for key, value in values.items():
            if not str(key).startswith(PREFIX):
                continue
            attr = str(key)[len(PREFIX):].replace("-", "_")
            if attr not in types or "_" in str(key)[len(PREFIX):]:
                raise ValueError(f"Unknown device policy key {key!r} in {where}. Known keys: {', '.join(cls.keys())}")
            kind = types[attr]
            if kind == "bool":
                out[attr] = _as_bool(key, value)
            elif kind == "int":
                out[attr] = _as_int(key, value)
            else:
                out[attr] = _as_float(key, value)
        return out

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The ``policy.*`` keys of a ``policy.toml`` (top-level keys or a ``[policy]`` table)."""
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"Device policy file {p} is not valid TOML: {exc}") from None
        flat: dict[str, Any] = {}
        for key, value in doc.items():
            if key == "policy" and isinstance(value, dict):
                flat.update({PREFIX + k: v for k, v in value.items()})
            elif isinstance(value, dict):
                raise ValueError(f"Unknown table [{key}] in device policy file {p}: only [policy] or top-level keys")
            else:
                flat[PREFIX + key] = value
        return flat

    @classmethod
    def load(cls, node_config: Mapping[str, Any], *, state_dir: str | Path | None = None) -> "DevicePolicy":
        """The device's policy: defaults, its node config and ``<state_dir>/policy.toml``, the stricter wins."""
        sources = []
        parsed = []
        node = cls._parse(node_config, where="node config")
        if node:
            sources.append("node config")
            parsed.append(node)
        path = Path(state_dir) / POLICY_FILE if state_dir is not None else None
        if path is not None and path.is_file():
            fvals = cls._parse(cls.read_file(path), where=str(path))
            sources.append(str(path))
            parsed.append(fvals)
        merged: dict[str, Any] = {}
        for values in parsed:
            for attr, v in values.items():
                merged[attr] = _STRICTER[attr](merged[attr], v) if attr in merged else v
        policy = cls(source=" + ".join(sources) or "defaults", **merged)
        if policy.allow_no_dp:
            logger.warning("device policy (%s): policy.allow-no-dp = true: this device will train and release "
                           "WITHOUT differential privacy when the server asks; such a release is recorded as "
                           "epsilon = infinity and no DP claim holds for this device afterwards", policy.source)
        if policy.allow_no_secagg:
            logger.warning("device policy (%s): policy.allow-no-secagg = true: this device will send its update in "
                           "the clear when the server turns secure aggregation off", policy.source)
        if policy.allow_unbound_keys:
            logger.warning("device policy (%s): policy.allow-unbound-keys = true: without an identity certificate "
                           "this device will mask against keys the server could have generated itself (secure "
                           "aggregation against an honest-but-curious server only)", policy.source)
        return policy

    def as_dict(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}

    # ------------------------------------------------------------------ checking
    def check(self, cfg: Config, *, train_examples: int, noise_multiplier: float | None = None) -> dict[str, Any]:
        """The settings of a round the device accepts, or :class:`PolicyViolation` naming the first bad one.

        ``noise_multiplier``: the one the device will train with (``None``: ``privacy.noise-multiplier``,
        or, when that is 0, the one calibrated from the target over the planned rounds).
        """
        if isinstance(train_examples, bool) or not isinstance(train_examples, int) or train_examples < 1:
            raise ValueError(f"train_examples must be an integer >= 1. You passed: {train_examples!r}")
        p, s = cfg.privacy, cfg.secagg
        settings: dict[str, Any] = {"privacy.enabled": bool(p.enabled)}
        settings.update(self.check_cost(cfg))
        if not p.enabled:
            if not self.allow_no_dp:
                raise PolicyViolation("privacy.enabled", False,
                                      "this device trains only with differential privacy (policy.allow-no-dp = false)")
            logger.warning("privacy.enabled = false accepted (policy.allow-no-dp = true): this round is released "
                           "WITHOUT DP noise; the ledger records epsilon = infinity")
        else:
            if p.target_epsilon > self.max_epsilon:
                raise PolicyViolation("privacy.target-epsilon", p.target_epsilon,
                                      f"above this device's lifetime budget policy.max-epsilon = {self.max_epsilon:g}")
            if p.delta >= 1.0 / train_examples:
                raise PolicyViolation("privacy.delta", p.delta, "must be below 1/(this device's training examples)")
            if self.max_delta > 0 and p.delta > self.max_delta:
                raise PolicyViolation("privacy.delta", p.delta, f"above policy.max-delta = {self.max_delta:g}")
            q = min(1.0, cfg.client.batch_size / train_examples)
            sigma = noise_multiplier if noise_multiplier is not None else self._noise(cfg, q)
            explicit = p.noise_multiplier > 0
            if self.min_noise_multiplier > 0 and sigma < self.min_noise_multiplier:
                raise PolicyViolation("privacy.noise-multiplier", p.noise_multiplier if explicit else sigma,
                                      f"below policy.min-noise-multiplier = {self.min_noise_multiplier:g}")
            one_round = _one_round_epsilon(float(sigma), q, cfg.client.local_steps, p.delta, p.accountant)
            if not one_round <= self.max_epsilon:
                setting = "privacy.noise-multiplier" if explicit else "privacy.target-epsilon"
                raise PolicyViolation(setting, p.noise_multiplier if explicit else p.target_epsilon,
                                      f"one round of client.local-steps = {cfg.client.local_steps} at this noise "
                                      f"would spend more than policy.max-epsilon = {self.max_epsilon:g}")
            settings.update({"privacy.target-epsilon": p.target_epsilon, "privacy.delta": p.delta,
                             "privacy.noise-multiplier": float(sigma), "privacy.sample-rate": q,
                             "privacy.accountant": p.accountant, "privacy.max-grad-norm": p.max_grad_norm})
        settings["client.local-steps"] = cfg.client.local_steps
        settings["secagg.enabled"] = bool(s.enabled)
        if not s.enabled:
            if not self.allow_no_secagg:
                raise PolicyViolation("secagg.enabled", False, "this device sends its update only under secure "
                                      "aggregation (policy.allow-no-secagg = false)")
            logger.warning("secagg.enabled = false accepted (policy.allow-no-secagg = true): this round's update "
                           "goes to the server in the clear")
        else:
            n = max(2, cfg.server.clients_per_round)
            k, t = self._graph(cfg)
            self.check_graph(n, k, t, degree_setting=s.degree, threshold_setting=s.threshold)
            settings.update({"secagg.degree": k, "secagg.threshold": t, "secagg.ddp": bool(s.ddp)})
        settings.update({k: v for k, v in self.as_dict().items()})
        return settings

    def participations(self, cfg: Config) -> int:
        """Participations the device plans its noise for and takes at most: the server's suggestion
        (:attr:`~fedpersona.config.Config.planned_participations`), lowered by ``policy.max-participations``."""
        own = self.max_participations
        return min(cfg.planned_participations, own) if own > 0 else cfg.planned_participations

    def check_graph(self, n: int, k: int, t: int, *, degree_setting: int = 0, threshold_setting: int = 0) -> None:
        """:class:`PolicyViolation` naming ``secagg.degree`` or ``secagg.threshold`` when a cohort of ``n`` with
        degree ``k`` and threshold ``t`` is weaker than this device accepts, saying why."""
        need_k = required_degree(n)
        if k < need_k:
            raise PolicyViolation(
                "secagg.degree", degree_setting if degree_setting else f"0 (k = {k})",
                f"a cohort of {n} needs a graph degree of at least {need_k} (2 ceil(1.5 log2 n), at most n - 1): SecAgg+ (Bell et al. "
                f"2020) needs k of order log n so that dropped or colluding devices cannot cut the honest survivors "
                f"apart and every device keeps t live share holders; with k = {k} a few removed devices isolate one")
        shown_t = threshold_setting if threshold_setting else f"0 (t = {t})"
        need = math.floor(self.min_threshold_fraction * (k + 1)) + 1
        if t < need:
            raise PolicyViolation("secagg.threshold", shown_t,
                                  f"with k + 1 = {k + 1} share holders (secagg.degree = {degree_setting or 'auto'}) "
                                  f"the threshold must be at least {need} (more than "
                                  f"policy.min-threshold-fraction = {self.min_threshold_fraction:g} of them)")
        c = self.max_colluders
        if (n + c) // 2 + 1 > n:
            raise PolicyViolation("server.clients-per-round", n,
                                  f"with policy.max-colluders = {c} no survivor set of a cohort of {n} can be "
                                  "certified by more than (K + c) / 2 signatures")
        if c and t < self.min_contributors + c:
            raise PolicyViolation("secagg.threshold", shown_t,
                                  f"with policy.max-colluders = {c} the threshold must be at least policy.min-contributors "
                                  f"+ {c} = {self.min_contributors + c}: a server whose colluders hold shares could "
                                  "otherwise cut out and unmask a group of fewer honest devices than the floor")
    def check_cost(self, cfg: Config) -> dict[str, Any]:
        """The round's cost settings if within this device's caps, or :class:`PolicyViolation` naming the first
        above one. Checked before the device computes anything for a run (and again with every round)."""
        c, m = cfg.client, cfg.model
        for setting, value, attr, what in (
            ("client.local-steps", c.local_steps, "max_local_steps", "DP-SGD steps a round"),
            ("client.head-steps", c.head_steps, "max_head_steps", "personal-head steps a round"),
            ("client.batch-size", c.batch_size, "max_batch_size", "examples a batch"),
            ("client.head-batch-size", c.head_batch_size, "max_batch_size", "examples a batch"),
            ("model.seq-len", m.seq_len, "max_seq_len", "tokens an example"),
        ):
            cap = getattr(self, attr)
            if value > cap:
                raise PolicyViolation(setting, value, f"above this device's cap {_key(attr)} = {cap} ({what})")
        return {"client.local-steps": c.local_steps, "client.head-steps": c.head_steps,
                "client.batch-size": c.batch_size, "client.head-batch-size": c.head_batch_size,
                "model.seq-len": m.seq_len}

    def _noise(self, cfg: Config, q: float) -> float:
        p = cfg.privacy
        if p.noise_multiplier > 0:
            return float(p.noise_multiplier)
        return calibrate_noise(target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=q,
                               steps=self.participations(cfg) * cfg.client.local_steps, accountant=p.accountant)

    def check_sum(self, cfg: Config, ctx, *, train_examples: int, bound_keys: bool) -> dict[str, Any]:
        """The checks of a step on a noisy sum (``privacy.noise-on = sum``), on top of :meth:`check`.

        ``ctx``: the step's :class:`fedpersona.privacy.sumdp.SumContext`, as the device derived it itself. Refused
        (:class:`PolicyViolation` naming the setting) without secure aggregation safe against the server
        (:func:`_malicious_secure_ok`), when t is below ``policy.min-contributors`` or above
        ``policy.max-honest-fraction`` of the announced cohort, or when sigma at this device's own q over the
        participations it plans would spend more than its budget. Returns the settings it accepted.
        """
        ok, why = _malicious_secure_ok(cfg, bound_keys=bound_keys)
        if not ok:
            raise PolicyViolation("privacy.noise-on", cfg.privacy.noise_on, why)
        t, k = ctx.honest, ctx.cohort
        if t < self.min_contributors:
            raise PolicyViolation("privacy.honest-contributors", t,
                                  f"below this device's floor policy.min-contributors = {self.min_contributors}")
        if t > self.max_honest_fraction * k:
            raise PolicyViolation("privacy.honest-contributors", t,
                                  f"more than policy.max-honest-fraction = {self.max_honest_fraction:g} of the "
                                  f"announced cohort of {k}")
        settings: dict[str, Any] = {"privacy.noise-on": "sum", "privacy.honest-contributors": t, "sum.cohort": k,
                                    "sum.scale": ctx.scale, "sum.bound": ctx.sum_bound}
        if cfg.privacy.enabled:
            sigma = ctx.noise_multiplier
            q = min(1.0, cfg.client.batch_size / train_examples)
            if self.min_noise_multiplier > 0 and sigma < self.min_noise_multiplier:
                raise PolicyViolation("privacy.noise-multiplier", sigma,
                                      f"below policy.min-noise-multiplier = {self.min_noise_multiplier:g}")
            budget = min(cfg.privacy.target_epsilon, self.max_epsilon)
            from fedpersona.privacy.sumdp import budget_passes

            m, passes = self.participations(cfg), budget_passes(cfg)
            planned = _one_round_epsilon(float(sigma), q, m * cfg.client.local_steps * passes, cfg.privacy.delta,
                                         cfg.privacy.accountant, True)
            if not planned <= budget * (1 + 1e-9):
                raise PolicyViolation("privacy.noise-multiplier", sigma,
                                      f"at this device's sample rate, {m} participation(s) of "
                                      f"{cfg.client.local_steps} steps{' (twice: the local-only baseline)' if passes > 1 else ''} "
                                      f"would spend epsilon {planned:.3f}, more than its budget {budget:g}")
            settings["sum.planned-epsilon"] = planned
        settings["policy.max-honest-fraction"] = self.max_honest_fraction
        settings["policy.max-participations"] = self.max_participations
        return settings

    @staticmethod
    def _graph(cfg: Config) -> tuple[int, int]:
        """(k, t) of the largest cohort the config allows: the weakest threshold relative to k + 1."""
        n = max(2, cfg.server.clients_per_round)
        k, t, _ = secagg_params(cfg).round_params(n)
        return k, t
