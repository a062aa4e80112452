"""The device's privacy ledger: every DP-SGD step the device ever took, and what it cost.

A small stateful accountant in the style of Opacus's ``IAccountant``: ``step`` records
steps, ``epsilon(delta)`` reports the budget spent, ``state_dict``/``load_state_dict``
(and ``to_json``/``from_json``) persist it so that epsilon composes over every round the
device took part in and over restarts. The history is kept as merged
``(noise_multiplier, sample_rate, num_steps)`` entries, exactly Opacus's format, and
epsilon is Opacus's RDP accountant's (its per-step RDP memoized per noise and sample rate, the same
arithmetic, computed only at the orders that can hold the minimum: the same number) or its PRV accountant's.
:mod:`fedpersona.privacy.rdp` is an independent implementation of the RDP analysis used to cross-check
it (and to guide the noise calibration's search, whose answer Opacus's accountant then checks).

Opacus's GDP accountant is refused: on these settings it is off by a factor of about
two from RDP and PRV (and from Google's dp_accounting).

Noise on the sum (``privacy.noise-on = sum``, :mod:`fedpersona.privacy.sumdp`): :meth:`PrivacyLedger.step_on_sum`
records a step whose noise is the sum of the discrete Gaussian shares of at least ``honest`` devices.
Such a ledger is accounted at integer RDP orders only (:data:`INTEGER_ORDERS`), where the Poisson-sampled
discrete Gaussian with an integer shift has exactly the Gaussian's Renyi divergence (the proof and the
bound on the sum of discrete Gaussians: :mod:`fedpersona.privacy.sumdp`); it also keeps ``(sigma, q, t, steps)``
of those steps, so :meth:`PrivacyLedger.collusion` gives the epsilon that holds when ``j`` of the ``t``
devices collude with the server (noise multiplier ``sigma sqrt((t - j) / t)``), down to the device's own
share alone (``sigma / sqrt(t)``). :meth:`PrivacyLedger.set_plan` records what the device planned
(participations, steps, noise, the epsilon of the whole plan) beside what it spent.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import warnings
from datetime import datetime, timezone
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedpersona.privacy.rdp import rdp_subsampled_gaussian

__all__ = ["PrivacyLedger", "LedgerError", "calibrate_noise", "ACCOUNTANTS", "INTEGER_ORDERS"]

logger = logging.getLogger(__name__)

#: Accountants the ledger accepts.
ACCOUNTANTS = ("rdp", "prv")
STATE_VERSION = 1
_MAX_SIGMA = 1e6

#: RDP orders of a ledger with steps on a noisy sum: integers only (see the module docstring).
INTEGER_ORDERS: tuple[int, ...] = tuple(range(2, 64)) + (80, 96, 128, 192, 256)
_ORDERS = ("all", "integer")
_PLAN_KEYS = {"participations", "steps", "noise_multiplier", "sample_rate", "delta", "epsilon", "noise_on"}

_ROUND_KEYS = {"round", "steps", "noise_multiplier", "sample_rate", "epsilon", "time"}
#: Optional fields of a round entry (ledgers written before they existed stay valid).
_ROUND_OPTIONAL = {"settings"}
_USER_LEVEL_KEYS = {"round", "epsilon", "delta", "mechanism", "time"}


class LedgerError(ValueError):
    """A ledger state that cannot be trusted: wrong version, missing fields, bad values."""


# ------------------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_accountant(accountant: Any) -> str:
    if accountant == "gdp":
        raise ValueError(
            "accountant='gdp' is not allowed: Opacus's GDP accountant is off by a factor of ~2 on the "
            "settings used here (it is only valid asymptotically). Use 'rdp' or 'prv'."
        )
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}. You passed: accountant={accountant!r}")
    return accountant


def _check_step_args(noise_multiplier: Any, sample_rate: Any, num_steps: Any) -> tuple[float, float, int]:
    if not _is_real(noise_multiplier) or not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0. You passed: noise_multiplier={noise_multiplier!r}")
    if not _is_real(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]. You passed: sample_rate={sample_rate!r}")
    if not _is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1. You passed: num_steps={num_steps!r}")
    return float(noise_multiplier), float(sample_rate), int(num_steps)


def _check_delta(delta: Any) -> float:
    if not _is_real(delta) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). You passed: delta={delta!r}")
    return float(delta)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _merge(history: list[list], noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
    """Append steps to a history in place, merging with the last entry if it has the same settings."""
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        history[-1][2] += num_steps
    else:
        history.append([noise_multiplier, sample_rate, num_steps])


def _epsilon_of(history: list[list], delta: float, accountant: str, orders: str = "all") -> float:
    """Epsilon of a (merged) history under Opacus's accountant (``orders = integer``: RDP at integer orders)."""
    return _epsilon_memo(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), accountant, orders)


@functools.lru_cache(maxsize=4096)
def _epsilon_memo(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str,
                  orders: str = "all") -> float:
    """A pure function of its arguments, memoized: the devices of a simulation share their histories,
    and each round asks for the same epsilon several times (plan, budget check, report)."""
    if not history:
        return 0.0  # Opacus's PRV accountant fails on an empty history, RDP returns the int 0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        if orders == "integer":
            if accountant != "rdp":
                raise ValueError(f"integer RDP orders need accountant 'rdp'. You passed: {accountant!r}")
            acc = RDPAccountant()
            acc.history = list(history)
            eps = float(acc.get_epsilon(delta=delta, alphas=list(INTEGER_ORDERS)))
        elif accountant == "rdp":
            eps = _rdp_epsilon(history, delta)
        else:
            acc = PRVAccountant()
            # Opacus's accountants keep their whole state in ``history``: a list of
            # (noise_multiplier, sample_rate, num_steps) tuples, one per run of identical steps.
            acc.history = list(history)
            eps = float(acc.get_epsilon(delta=delta))
    for w in caught:
        # e.g. "Optimal order is the largest alpha": the bound is still valid, only looser.
        logger.debug("opacus %s accountant: %s", accountant, w.message)
    if math.isnan(eps):
        return math.inf
    # Far below the budget (a huge noise multiplier) Opacus's RDP-to-(epsilon, delta) conversion can
    # return a tiny negative number (-0.0085 for sigma 8952, q 0.44, 2 steps, delta 1e-2): every
    # mechanism is (0, delta)-DP when it is (epsilon < 0, delta)-DP, and a ledger never holds a
    # negative epsilon (it could not load it again).
    return max(0.0, eps)


#: Opacus's RDP orders (``RDPAccountant.DEFAULT_ALPHAS``): every RDP epsilon here is the minimum over them.
_ALPHAS = tuple(RDPAccountant.DEFAULT_ALPHAS)


class _StepRdp:
    """One step's RDP of the sampled Gaussian at (sigma, q), order by order, each order computed by Opacus's
    ``compute_rdp`` (``steps=1``) the first time it is asked for and kept: the same numbers as Opacus's vector
    over :data:`_ALPHAS`, only never the orders that cannot decide an epsilon (:func:`_least_epsilon`)."""

    __slots__ = ("sigma", "q", "values", "known")

    def __init__(self, sigma: float, q: float) -> None:
        self.sigma, self.q = sigma, q
        self.values = np.zeros(len(_ALPHAS))
        self.known = np.zeros(len(_ALPHAS), dtype=bool)

    def at(self, indices: list[int]) -> np.ndarray:
        missing = [j for j in indices if not self.known[j]]
        if missing:
            self.values[missing] = rdp_analysis.compute_rdp(q=self.q, noise_multiplier=self.sigma, steps=1,
                                                            orders=[_ALPHAS[j] for j in missing])
            self.known[missing] = True
        return self.values[indices]


@functools.lru_cache(maxsize=4096)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> _StepRdp:
    """The per-step RDP of (sigma, q), shared by every history that holds it: every device of a simulation with
    that training-set size, and every later round's epsilon, reuse the orders already computed."""
    return _StepRdp(noise_multiplier, sample_rate)


#: Orders every RDP epsilon computes first (:func:`_least_epsilon`): every tenth of :data:`_ALPHAS`, and the last.
_ANCHORS = tuple(sorted(set(range(0, len(_ALPHAS), 10)) | {len(_ALPHAS) - 1}))


def _least_epsilon(rdp_at, delta: float) -> np.ndarray:
    """The RDP over :data:`_ALPHAS` (``inf`` at the orders left out) of a mechanism whose RDP at some orders
    ``rdp_at(indices)`` returns, computed at every order that can hold the minimum over all of them of
    ``rdp(a) - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a)`` (Opacus's conversion, term by term).

    RDP never decreases with the order (the Renyi divergence is nondecreasing in its order; a composition's,
    a sum of such terms, too) and is never negative: an order whose bound ``rdp(b) + conversion(a)``, with
    ``rdp(b)`` the largest RDP computed at an order below it, is not below the smallest epsilon found so far
    cannot beat it, and is left out. Every other order is computed, the most promising first, until none is
    left: the minimum is the minimum over all 151 orders, from typically 20 to 30 of them."""
    n = len(_ALPHAS)
    rdp = np.full(n, np.inf)
    known = np.zeros(n, dtype=bool)

    def compute(indices: list[int]) -> None:
        rdp[indices] = rdp_at(indices)
        known[indices] = True

    shift = (np.log(delta) + _LOG_ALPHAS) / (_ALPHAS_NP - 1)
    compute(list(_ANCHORS))
    with np.errstate(invalid="ignore"):
        while True:
            eps = np.where(known, rdp - shift + _LOG_RATIO, np.nan)
            best = np.nanmin(eps) if not np.isnan(eps).all() else np.inf
            below = np.where(known & ~np.isnan(rdp), np.maximum(rdp, 0.0), 0.0)
            floor = np.concatenate(([0.0], np.maximum.accumulate(below)[:-1]))
            bound = floor - shift + _LOG_RATIO
            open_ = ~known & ~(bound >= best)
            if not open_.any():
                return rdp
            compute([int(np.flatnonzero(open_)[np.argmin(bound[open_])])])


def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus's RDP epsilon of ``history`` at ``delta``: ``rdp(a) = sum(steps * step_rdp(a))`` at the orders of
    :data:`_ALPHAS`, the very arithmetic of Opacus's ``RDPAccountant``, and its ``get_privacy_spent``; only at
    the orders that can hold the minimum (:func:`_least_epsilon`; the same number as over all of them,
    ``tests/privacy/test_calibration.py``)."""
    steps_rdp = [(_step_rdp(sigma, q), steps) for sigma, q, steps in history]
    rdp = _least_epsilon(lambda idx: sum([s.at(idx) * steps for s, steps in steps_rdp]), delta)
    with np.errstate(invalid="ignore"):
        value, _ = rdp_analysis.get_privacy_spent(orders=list(_ALPHAS), rdp=rdp, delta=delta)
    return float(value)


_ALPHAS_NP = np.asarray(_ALPHAS, dtype=np.float64)
_LOG_ALPHAS = np.log(_ALPHAS_NP)
_LOG_RATIO = np.log((_ALPHAS_NP - 1) / _ALPHAS_NP)


# ----------------------------------------------------------------------------------- ledger
class PrivacyLedger:
    """Privacy ledger of one device: the full step history, per-round summaries, user-level entries.

    Args:
        accountant: ``"rdp"`` (default) or ``"prv"``, the Opacus accountant that turns the
            history into epsilon. ``"gdp"`` is refused.
    """

    def __init__(self, *, accountant: str = "rdp") -> None:
        self._accountant = _check_accountant(accountant)
        self._history: list[list] = []  # [noise_multiplier, sample_rate, num_steps]
        self._rounds: list[dict] = []
        self._user_level: list[dict] = []
        self._sum_steps: list[list] = []  # [noise_multiplier, sample_rate, honest t, num_steps] of noisy-sum steps
        self._plan: dict | None = None
        self._cache: tuple[Any, float] | None = None

    # ------------------------------------------------------------------ steps and epsilon
    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Merged ``(noise_multiplier, sample_rate, num_steps)`` entries (a copy)."""
        return [tuple(h) for h in self._history]

    @property
    def orders(self) -> str:
        """``integer`` once the ledger holds a step on a noisy sum (RDP at integer orders), else ``all``."""
        return "integer" if self._sum_steps else "all"

    @property
    def sum_steps(self) -> list[tuple[float, float, int, int]]:
        """Merged ``(noise_multiplier, sample_rate, honest, num_steps)`` of the steps on a noisy sum (a copy)."""
        return [tuple(h) for h in self._sum_steps]

    @property
    def plan(self) -> dict | None:
        """What the device planned (:meth:`set_plan`), or None (a copy)."""
        return dict(self._plan) if self._plan is not None else None

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self._history)

    @property
    def rounds(self) -> list[dict]:
        """Per-round summaries (a copy); ``epsilon`` is the total after that round."""
        return copy.deepcopy(self._rounds)

    @property
    def user_level_entries(self) -> list[dict]:
        """User-level (distributed DP) entries recorded by secure aggregation (a copy)."""
        return copy.deepcopy(self._user_level)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` DP-SGD steps with this noise multiplier and Poisson sample rate.

        A noise multiplier of 0 is recorded, and makes epsilon infinite from then on.
        """
        sigma, q, n = _check_step_args(noise_multiplier, sample_rate, num_steps)
        if sigma == 0.0:
            logger.warning("privacy ledger: %d step(s) with noise_multiplier=0: epsilon is now infinite", n)
        _merge(self._history, sigma, q, n)

    def step_on_sum(self, *, noise_multiplier: float, sample_rate: float, honest: int, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps on a noisy secure sum: this device's ``sample_rate``, and a noise multiplier
        ``noise_multiplier`` that holds as long as ``honest`` devices' noise shares are in the sum.

        From then on the ledger is accounted at integer RDP orders (:data:`INTEGER_ORDERS`).
        """
        sigma, q, n = _check_step_args(noise_multiplier, sample_rate, num_steps)
        if not _is_int(honest) or honest < 1:
            raise ValueError(f"honest must be an integer >= 1. You passed: honest={honest!r}")
        if self._accountant != "rdp":
            raise ValueError(f"steps on a noisy sum are accounted with RDP at integer orders; this ledger uses "
                             f"{self._accountant!r}")
        self.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        last = self._sum_steps[-1] if self._sum_steps else None
        if last is not None and (last[0], last[1], last[2]) == (sigma, q, honest):
            last[3] += n
        else:
            self._sum_steps.append([sigma, q, int(honest), n])
        self._cache = None

    def repeated(self, passes: int) -> "PrivacyLedger":
        """A copy holding every step ``passes`` times (steps on a noisy sum stay steps on a sum, at integer
        orders): what one budget counts when the same records are used in ``passes`` DP passes."""
        if not _is_int(passes) or passes < 1:
            raise ValueError(f"passes must be an integer >= 1. You passed: passes={passes!r}")
        out = PrivacyLedger(accountant=self._accountant)
        out._history = [[s, q, n * passes] for s, q, n in self._history]
        out._sum_steps = [[s, q, t, n * passes] for s, q, t, n in self._sum_steps]
        return out

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this ``delta``: 0.0 before any step, ``inf`` after a noiseless step."""
        delta = _check_delta(delta)
        key = (self._accountant, delta, self.orders, tuple(tuple(h) for h in self._history))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        eps = _epsilon_of(self._history, delta, self._accountant, self.orders)
        self._cache = (key, eps)
        return eps

    def epsilon_if(self, *, noise_multiplier: float, sample_rate: float, num_steps: int, delta: float,
                   on_sum: bool = False) -> float:
        """Epsilon that would be spent if these steps were added (``on_sum``: steps on a noisy sum, which
        switch the ledger to integer orders); the ledger is not changed."""
        sigma, q, n = _check_step_args(noise_multiplier, sample_rate, num_steps)
        delta = _check_delta(delta)
        history = [list(h) for h in self._history]
        _merge(history, sigma, q, n)
        orders = "integer" if on_sum or self._sum_steps else "all"
        return _epsilon_of(history, delta, self._accountant, orders)

    def collusion(self, delta: float) -> list[dict]:
        """Epsilon when ``j`` devices of each noisy sum's ``t`` collude with the server, ``j = 0 .. t - 1``.

        The noise that then remains guaranteed in a sum of ``t`` is ``t - j`` shares: noise multiplier
        ``sigma sqrt((t - j) / t)``; at ``j = t - 1`` only the device's own share, ``sigma / sqrt(t)``.
        Steps with the device's own noise (``privacy.noise-on = device``) keep their sigma. One row per ``j``
        (``t`` the largest of the ledger's sums; a sum with fewer honest devices than ``j + 1`` counts its
        device's own share alone): ``{"colluders", "noise_factor" (of the largest t), "epsilon"}``; [] without
        steps on a sum.
        """
        delta = _check_delta(delta)
        if not self._sum_steps:
            return []
        own = [list(h) for h in self._history]
        for sigma, q, _t, n in self._sum_steps:  # the sum steps, taken out of the history to be re-noised
            for h in own:
                if h[0] == sigma and h[1] == q and h[2] > 0:
                    take = min(h[2], n)
                    h[2] -= take
                    n -= take
                if n == 0:
                    break
        own = [h for h in own if h[2] > 0]
        t_max = max(t for _, _, t, _ in self._sum_steps)
        rows = []
        for j in range(t_max):
            history = [list(h) for h in own]
            for sigma, q, t, n in self._sum_steps:
                _merge(history, sigma * math.sqrt(max(t - j, 1) / t), q, n)
            rows.append({"colluders": j, "noise_factor": math.sqrt((t_max - j) / t_max),
                         "epsilon": _epsilon_of(history, delta, self._accountant, "integer")})
        return rows

    def set_plan(self, *, participations: int, steps: int, noise_multiplier: float, sample_rate: float,
                 delta: float, noise_on: str = "device") -> dict:
        """Record what the device plans: ``participations`` rounds of ``steps`` steps in all at this noise and
        sample rate; ``epsilon`` is what the whole plan spends from an empty ledger (:attr:`plan`)."""
        if not _is_int(participations) or participations < 1:
            raise ValueError(f"participations must be an integer >= 1. You passed: {participations!r}")
        sigma, q, n = _check_step_args(noise_multiplier, sample_rate, steps)
        delta = _check_delta(delta)
        if noise_on not in ("device", "sum"):
            raise ValueError(f"noise_on must be 'device' or 'sum'. You passed: {noise_on!r}")
        eps = _epsilon_of([[sigma, q, n]], delta, self._accountant, "integer" if noise_on == "sum" else "all")
        self._plan = {"participations": participations, "steps": n, "noise_multiplier": sigma, "sample_rate": q,
                      "delta": delta, "epsilon": eps, "noise_on": noise_on}
        return dict(self._plan)

    def record_round(self, *, round: int, steps: int, noise_multiplier: float, sample_rate: float, delta: float,
                     settings: dict[str, Any] | None = None, update: bool = False) -> dict:
        """Append a summary of a finished round (its steps already recorded with :meth:`step`).

        ``settings``: the round's settings the device accepted (its policy check's result), kept
        with the entry: flat keys to strings, booleans, integers or finite floats. ``update``: replace
        the last entry when it is of the same round (a round of noisy sums is summarized after each step).
        Returns the summary, whose ``epsilon`` is the total spent after the round (``inf`` from
        the first release without noise on: a noise multiplier of 0 is recorded, never skipped).
        """
        if not _is_int(round) or round < 0:
            raise ValueError(f"round must be an integer >= 0. You passed: round={round!r}")
        if not _is_int(steps) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0. You passed: steps={steps!r}")
        sigma, q, _ = _check_step_args(noise_multiplier, sample_rate, 1)
        eps = self.epsilon(delta)
        entry = {"round": round, "steps": steps, "noise_multiplier": sigma, "sample_rate": q, "epsilon": eps, "time": _now()}
        if settings is not None:
            entry["settings"] = _check_settings(settings, "settings")
        entry = _loadable(entry, "round", _ROUND_KEYS, _ROUND_OPTIONAL)
        if update and self._rounds and self._rounds[-1]["round"] == round:
            self._rounds[-1] = entry
        else:
            self._rounds.append(entry)
        logger.debug("privacy ledger: round %d, %d steps, sigma %.4f, q %.4f, epsilon %.4f", round, steps, sigma, q, eps)
        return dict(entry)

    def record_user_level(self, *, round: int, epsilon: float, delta: float, mechanism: str) -> dict:
        """Record a user-level guarantee (e.g. distributed DP noise added under secure aggregation)."""
        if not _is_int(round) or round < 0:
            raise ValueError(f"round must be an integer >= 0. You passed: round={round!r}")
        if not _is_real(epsilon) or not epsilon >= 0:
            raise ValueError(f"epsilon must be a number >= 0. You passed: epsilon={epsilon!r}")
        delta = _check_delta(delta)
        if not isinstance(mechanism, str) or not mechanism:
            raise ValueError(f"mechanism must be a non-empty string. You passed: mechanism={mechanism!r}")
        entry = {"round": round, "epsilon": float(epsilon), "delta": delta, "mechanism": mechanism, "time": _now()}
        entry = _loadable(entry, "user-level entry", _USER_LEVEL_KEYS)
        self._user_level.append(entry)
        return dict(entry)

    # ------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """JSON-serialisable state. An infinite epsilon is written as ``None``."""

        def enc(entry: dict) -> dict:
            out = dict(entry)
            if math.isinf(out["epsilon"]):
                out["epsilon"] = None
            return out

        state = {
            "version": STATE_VERSION,
            "accountant": self._accountant,
            "history": [[float(s), float(q), int(n)] for s, q, n in self._history],
            "rounds": [enc(r) for r in self._rounds],
            "user_level": [enc(u) for u in self._user_level],
        }
        # Optional fields (ledgers without them stay valid).
        if self._sum_steps:
            state["sum_steps"] = [[float(s), float(q), int(t), int(n)] for s, q, t, n in self._sum_steps]
        if self._plan is not None:
            state["plan"] = enc(self._plan)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Replace this ledger's state after validating ``state`` strictly (raises :class:`LedgerError`)."""
        accountant, history, rounds, user_level = _validate_state(state)
        if accountant != self._accountant:
            raise LedgerError(
                f"ledger state was kept with accountant {accountant!r}, this ledger uses {self._accountant!r}; "
                f"use PrivacyLedger.from_json / PrivacyLedger(accountant={accountant!r})"
            )
        sum_steps = _validate_sum_steps(state.get("sum_steps", []), history, accountant)
        plan = _validate_plan(state["plan"]) if "plan" in state else None
        self._history, self._rounds, self._user_level = history, rounds, user_level
        self._sum_steps, self._plan = sum_steps, plan
        self._cache = None

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), allow_nan=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        """Rebuild a ledger (with the accountant it was kept with) from :meth:`to_json` text."""
        try:
            state = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"ledger state is not valid JSON: {exc}") from None
        if not isinstance(state, dict):
            raise LedgerError(f"ledger state must be a JSON object, got {type(state).__name__}")
        accountant = state.get("accountant")
        if accountant not in ACCOUNTANTS:
            raise LedgerError(f"ledger state: 'accountant' must be one of {ACCOUNTANTS}, got {accountant!r}")
        ledger = cls(accountant=accountant)
        ledger.load_state_dict(state)
        return ledger

    def __repr__(self) -> str:
        return f"PrivacyLedger(accountant={self._accountant!r}, steps={self.total_steps}, rounds={len(self._rounds)})"


def _validate_state(state: Any) -> tuple[str, list[list], list[dict], list[dict]]:
    if not isinstance(state, dict):
        raise LedgerError(f"ledger state must be a dict, got {type(state).__name__}")
    expected = {"version", "accountant", "history", "rounds", "user_level"}
    missing = expected - state.keys()
    if missing:
        raise LedgerError(f"ledger state is missing field(s): {sorted(missing)}")
    extra = state.keys() - expected - {"sum_steps", "plan"}
    if extra:
        raise LedgerError(f"ledger state has unknown field(s): {sorted(extra)}")
    if not _is_int(state["version"]) or state["version"] != STATE_VERSION:
        raise LedgerError(f"ledger state has version {state['version']!r}; this code reads version {STATE_VERSION}")
    accountant = state["accountant"]
    if accountant not in ACCOUNTANTS:
        raise LedgerError(f"ledger state: 'accountant' must be one of {ACCOUNTANTS}, got {accountant!r}")

    if not isinstance(state["history"], list):
        raise LedgerError(f"ledger state: 'history' must be a list, got {type(state['history']).__name__}")
    history: list[list] = []
    for i, entry in enumerate(state["history"]):
        where = f"ledger state: history[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise LedgerError(f"{where} must be [noise_multiplier, sample_rate, num_steps], got {entry!r}")
        sigma, q, n = entry
        if not _is_real(sigma) or not (sigma >= 0 and math.isfinite(sigma)):
            raise LedgerError(f"{where}: noise_multiplier must be a finite number >= 0, got {sigma!r}")
        if not _is_real(q) or not 0 < q <= 1:
            raise LedgerError(f"{where}: sample_rate must be in (0, 1], got {q!r}")
        if not _is_int(n) or n < 1:
            raise LedgerError(f"{where}: num_steps must be an integer >= 1, got {n!r}")
        _merge(history, float(sigma), float(q), int(n))

    rounds = [_validate_entry(e, f"rounds[{i}]", _ROUND_KEYS, _ROUND_OPTIONAL) for i, e in enumerate(_as_list(state, "rounds"))]
    user_level = [_validate_entry(e, f"user_level[{i}]", _USER_LEVEL_KEYS) for i, e in enumerate(_as_list(state, "user_level"))]
    return accountant, history, rounds, user_level


def _validate_sum_steps(raw: Any, history: list[list], accountant: str) -> list[list]:
    """The noisy-sum steps: ``[sigma, q, t, n]`` entries, each covered by the history's ``(sigma, q)`` steps."""
    if not isinstance(raw, list):
        raise LedgerError(f"ledger state: 'sum_steps' must be a list, got {type(raw).__name__}")
    out: list[list] = []
    counted: dict[tuple[float, float], int] = {}
    for i, entry in enumerate(raw):
        where = f"ledger state: sum_steps[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise LedgerError(f"{where} must be [noise_multiplier, sample_rate, honest, num_steps], got {entry!r}")
        sigma, q, t, n = entry
        if not _is_real(sigma) or not (sigma >= 0 and math.isfinite(sigma)):
            raise LedgerError(f"{where}: noise_multiplier must be a finite number >= 0, got {sigma!r}")
        if not _is_real(q) or not 0 < q <= 1:
            raise LedgerError(f"{where}: sample_rate must be in (0, 1], got {q!r}")
        if not _is_int(t) or t < 1:
            raise LedgerError(f"{where}: honest must be an integer >= 1, got {t!r}")
        if not _is_int(n) or n < 1:
            raise LedgerError(f"{where}: num_steps must be an integer >= 1, got {n!r}")
        key = (float(sigma), float(q))
        counted[key] = counted.get(key, 0) + int(n)
        out.append([float(sigma), float(q), int(t), int(n)])
    if out and accountant != "rdp":
        raise LedgerError(f"ledger state: steps on a noisy sum need accountant 'rdp', got {accountant!r}")
    have: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        have[(sigma, q)] = have.get((sigma, q), 0) + n
    for key, n in counted.items():
        if have.get(key, 0) < n:
            raise LedgerError(f"ledger state: {n} steps on a noisy sum at (sigma, q) = {key}, but the history holds "
                              f"{have.get(key, 0)}")
    return out


def _validate_plan(raw: Any) -> dict:
    if not isinstance(raw, dict) or set(raw) != _PLAN_KEYS:
        raise LedgerError(f"ledger state: 'plan' must hold exactly {sorted(_PLAN_KEYS)}, got {raw!r}")
    if not _is_int(raw["participations"]) or raw["participations"] < 1 or not _is_int(raw["steps"]) or raw["steps"] < 1:
        raise LedgerError(f"ledger state: plan participations and steps must be integers >= 1, got {raw!r}")
    if not _is_real(raw["noise_multiplier"]) or not (raw["noise_multiplier"] >= 0 and math.isfinite(raw["noise_multiplier"])):
        raise LedgerError(f"ledger state: plan noise_multiplier must be a finite number >= 0, got {raw!r}")
    if not _is_real(raw["sample_rate"]) or not 0 < raw["sample_rate"] <= 1:
        raise LedgerError(f"ledger state: plan sample_rate must be in (0, 1], got {raw!r}")
    if not _is_real(raw["delta"]) or not 0 < raw["delta"] < 1:
        raise LedgerError(f"ledger state: plan delta must be in (0, 1), got {raw!r}")
    if raw["noise_on"] not in ("device", "sum"):
        raise LedgerError(f"ledger state: plan noise_on must be 'device' or 'sum', got {raw!r}")
    eps = raw["epsilon"]
    if eps is not None and (not _is_real(eps) or not eps >= 0):
        raise LedgerError(f"ledger state: plan epsilon must be a number >= 0 or null, got {raw!r}")
    return {**raw, "epsilon": math.inf if eps is None else float(eps)}


def _as_list(state: dict, key: str) -> list:
    if not isinstance(state[key], list):
        raise LedgerError(f"ledger state: {key!r} must be a list, got {type(state[key]).__name__}")
    return state[key]


def _check_settings(settings: Any, where: str, error: type[Exception] = ValueError) -> dict:
    """A round's accepted settings: a flat dict of str -> str | bool | int | finite float."""
    if not isinstance(settings, dict):
        raise error(f"{where} must be a dict of setting -> value. You passed: {settings!r}")
    out = {}
    for k, v in settings.items():
        ok = isinstance(k, str) and (isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v)))
        if not ok:
            raise error(f"{where}[{k!r}] must be a string, boolean, integer or finite float. You passed: {v!r}")
        out[k] = v
    return out


def _loadable(entry: dict, what: str, keys: set[str], optional: set[str] = frozenset()) -> dict:
    """``entry`` as it will be stored, checked with the very rule :meth:`PrivacyLedger.load_state_dict`
    applies: a ledger never saves what it would refuse to load (a device that did would be bricked)."""
    stored = dict(entry)
    if isinstance(stored.get("epsilon"), float) and math.isinf(stored["epsilon"]):
        stored["epsilon"] = None  # as state_dict writes it
    try:
        # through JSON, as the store keeps it: what does not survive the round trip is refused here
        _validate_entry(json.loads(json.dumps(stored, allow_nan=False)), what, keys, optional)
    except (LedgerError, TypeError, ValueError) as exc:
        raise ValueError(f"refusing to record a {what} the ledger could not load again: {exc}. "
                         f"You passed: {entry!r}") from None
    return entry


def _validate_entry(entry: Any, where: str, keys: set[str], optional: set[str] = frozenset()) -> dict:
    where = f"ledger state: {where}"
    if not isinstance(entry, dict):
        raise LedgerError(f"{where} must be a dict, got {type(entry).__name__}")
    if not keys <= entry.keys() <= keys | optional:
        raise LedgerError(
            f"{where} has the wrong fields: missing {sorted(keys - entry.keys())}, "
            f"unknown {sorted(entry.keys() - keys - optional)}"
        )
    out = dict(entry)
    if "settings" in entry:
        out["settings"] = _check_settings(entry["settings"], f"{where}: 'settings'", LedgerError)
    for key in ("round", "steps"):
        if key in keys and (not _is_int(entry[key]) or entry[key] < 0):
            raise LedgerError(f"{where}: {key!r} must be an integer >= 0, got {entry[key]!r}")
    if "noise_multiplier" in keys:
        v = entry["noise_multiplier"]
        if not _is_real(v) or not (v >= 0 and math.isfinite(v)):
            raise LedgerError(f"{where}: 'noise_multiplier' must be a finite number >= 0, got {v!r}")
    if "sample_rate" in keys:
        v = entry["sample_rate"]
        if not _is_real(v) or not 0 < v <= 1:
            raise LedgerError(f"{where}: 'sample_rate' must be in (0, 1], got {v!r}")
    if "delta" in keys:
        v = entry["delta"]
        if not _is_real(v) or not 0 < v < 1:
            raise LedgerError(f"{where}: 'delta' must be in (0, 1), got {v!r}")
    if "mechanism" in keys and (not isinstance(entry["mechanism"], str) or not entry["mechanism"]):
        raise LedgerError(f"{where}: 'mechanism' must be a non-empty string, got {entry['mechanism']!r}")
    eps = entry["epsilon"]
    if eps is None:
        out["epsilon"] = math.inf
    elif not _is_real(eps) or not eps >= 0:
        raise LedgerError(f"{where}: 'epsilon' must be a number >= 0 (or null for infinite), got {eps!r}")
    else:
        out["epsilon"] = float(eps)
    if not isinstance(entry["time"], str):
        raise LedgerError(f"{where}: 'time' must be an ISO 8601 string, got {entry['time']!r}")
    try:
        datetime.fromisoformat(entry["time"])
    except ValueError:
        raise LedgerError(f"{where}: 'time' must be an ISO 8601 string, got {entry['time']!r}") from None
    return out


# ------------------------------------------------------------------------------ calibration
#: Orders on each side of the last optimal one that a calibration step evaluates (:func:`_calibrate_rdp`).
_WINDOW = 4


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
    orders: str = "all",
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon after ``steps`` steps is <= target.

    ``orders = "integer"``: RDP at integer orders only (the accounting of steps on a noisy sum).

    Bisection on the noise multiplier with Opacus's accountant; the result always satisfies
    ``epsilon <= target_epsilon`` and ``epsilon > target_epsilon - epsilon_tolerance`` (unless the
    bisection reached the float resolution of the noise multiplier first).

    Solved once per process for each set of arguments (a simulation's devices differ only by
    their training-set size, hence their sample rate), each solve warm-started from the nearest
    sample rate already solved with the same budget (:func:`_calibrate_rdp`).
    """
    if not _is_real(target_epsilon) or not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0. You passed: target_epsilon={target_epsilon!r}")
    delta = _check_delta(delta)
    if not _is_real(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]. You passed: sample_rate={sample_rate!r}")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1. You passed: steps={steps!r}")
    if not _is_real(epsilon_tolerance) or not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0. You passed: epsilon_tolerance={epsilon_tolerance!r}")
    _check_accountant(accountant)
    if orders not in _ORDERS or (orders == "integer" and accountant != "rdp"):
        raise ValueError(f"orders must be one of {_ORDERS} ('integer' with accountant 'rdp'). You passed: {orders!r}")
    if orders == "integer":
        return _calibrate_integer(float(target_epsilon), delta, float(sample_rate), int(steps), float(epsilon_tolerance))
    return _calibrated(float(target_epsilon), delta, float(sample_rate), int(steps), accountant,
                       float(epsilon_tolerance))


@functools.lru_cache(maxsize=None)
def _calibrate_integer(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                       epsilon_tolerance: float) -> float:
    """Sigma for the RDP accountant at integer orders (steps on a noisy sum): doubling to a bracket, then the same
    search as :func:`_calibrate_rdp` (:func:`_bracket_search`) on Opacus's epsilon."""

    def eps(sigma: float) -> float:
        return _epsilon_of([[sigma, sample_rate, steps]], delta, "rdp", "integer")

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > _MAX_SIGMA:
            raise _too_small(target_epsilon, delta, steps, sample_rate)
        eps_high = eps(high)
    high, eps_high, _ = _bracket_search(eps, low, high, eps_high, target_epsilon, epsilon_tolerance)
    logger.info("calibrated noise multiplier %.4f: epsilon %.4f (target %.4g, delta %.3g) after %d steps at sample "
                "rate %.4g (rdp, integer orders)", high, eps_high, target_epsilon, delta, steps, sample_rate)
    return high


#: Solved calibrations by budget (target, delta, steps, tolerance): sample rate -> (sigma, index of the optimal order).
_SOLVED: dict[tuple[float, float, int, float], dict[float, tuple[float, int]]] = {}


@functools.lru_cache(maxsize=None)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                epsilon_tolerance: float) -> float:
    if accountant == "rdp":
        sigma, eps = _calibrate_rdp(target_epsilon, delta, sample_rate, steps, epsilon_tolerance)
    else:
        sigma, eps = _calibrate_prv(target_epsilon, delta, sample_rate, steps, epsilon_tolerance)
    logger.info(
        "calibrated noise multiplier %.4f: epsilon %.4f (target %.4g, delta %.3g) after %d steps at sample rate %.4g (%s)",
        sigma, eps, target_epsilon, delta, steps, sample_rate, accountant,
    )
    return sigma


def _too_small(target_epsilon: float, delta: float, steps: int, sample_rate: float) -> ValueError:
    return ValueError(
        f"no noise multiplier up to {_MAX_SIGMA:g} reaches epsilon {target_epsilon} at delta {delta} "
        f"after {steps} steps at sample rate {sample_rate}: the budget is too small"
    )


def _calibrate_rdp(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                   epsilon_tolerance: float) -> tuple[float, float]:
    """(sigma, its exact epsilon) for the RDP accountant.

    The search (regula falsi, :func:`_bracket_search`) evaluates the RDP of ``_WINDOW`` orders on
    each side of the last optimal order only (the optimal order moves slowly with sigma), not all
    151 of Opacus's, with :func:`_window_rdp`: the epsilon over a subset of the orders is an upper
    bound of the epsilon over all of them; an optimum at the window's edge re-centres it with the minimum
    over every order (:func:`_least_epsilon`). The answer is then checked with Opacus's own epsilon
    (:func:`_epsilon_of`, all orders, memoized: the device's ledger asks for the same sigma and
    sample rate next); should it exceed the target or miss the tolerance, the search over all
    orders with Opacus's epsilon decides.
    """
    budget = (target_epsilon, delta, steps, epsilon_tolerance)
    solved = _SOLVED.setdefault(budget, {})
    start, center = 1.0, None
    if solved:  # warm start: the nearest sample rate solved with the same budget
        near = min(solved, key=lambda q: abs(math.log(q) - math.log(sample_rate)))
        start, center = solved[near]
    state = {"center": center}
    alphas = np.asarray(_ALPHAS, dtype=np.float64)
    conversion = -(math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)

    def full(sigma: float) -> float:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            rdp = _least_epsilon(lambda idx: _window_rdp(sample_rate, sigma, steps, [float(alphas[j]) for j in idx]),
                                 delta)
            eps_vec = rdp + conversion
        if np.isnan(eps_vec).all():
            return math.inf
        i = int(np.nanargmin(eps_vec))
        state["center"] = i
        return float(eps_vec[i])

    def approx(sigma: float) -> float:
        c = state["center"]
        if c is None:
            return full(sigma)
        lo, hi = max(0, c - _WINDOW), min(len(alphas), c + _WINDOW + 1)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            rdp = _window_rdp(sample_rate, sigma, steps, [float(a) for a in alphas[lo:hi]])
        eps_vec = rdp + conversion[lo:hi]
        if np.isnan(eps_vec).all():
            return full(sigma)
        j = int(np.nanargmin(eps_vec))
        if (j == 0 and lo > 0) or (j == hi - lo - 1 and hi < len(alphas)):
            return full(sigma)  # the optimum may lie outside the window
        state["center"] = lo + j
        return float(eps_vec[j])

    def exact(sigma: float) -> float:
        return _epsilon_of([[sigma, sample_rate, steps]], delta, "rdp")

    for evaluate in (approx, exact):
        high = start
        eps_high = evaluate(high)
        if eps_high > target_epsilon:
            low = high
            while eps_high > target_epsilon:
                low, high = high, (1.25 if start != 1.0 else 2.0) * high  # small steps from a warm start
                if high > _MAX_SIGMA:
                    raise _too_small(target_epsilon, delta, steps, sample_rate)
                eps_high = evaluate(high)
        elif start != 1.0:
            low = 0.8 * high  # a warm start: find the bracket below it by small steps
            while (e := evaluate(low)) <= target_epsilon:
                high, eps_high, low = low, e, 0.8 * low
        else:
            low = 0.0
        if evaluate is approx:
            # The guide is cheap: it narrows the bracket well below the tolerance, and its answer moves up to the grid
            # (:func:`_on_grid`), so that the exact check below is the grid's first evaluation (memoized) and the
            # grid's answer lies a step or two below it.
            high, eps_high, low = _bracket_search(evaluate, low, high, eps_high, target_epsilon,
                                                  epsilon_tolerance * _GUIDE_TOLERANCE)
            high = math.exp(_grid_index(high) * _GRID)
        else:
            high, eps_high, low = _bracket_search(evaluate, low, high, eps_high, target_epsilon, epsilon_tolerance)
        eps = exact(high)
        if eps <= target_epsilon and (target_epsilon - eps <= epsilon_tolerance or high - low <= 1e-9 * high):
            break
        start = 1.0  # the windowed search missed (not expected): the bisection over every order decides
    solved[sample_rate] = (high, state["center"] if state["center"] is not None else len(_ALPHAS) // 2)
    return _on_grid(exact, high, target_epsilon)


#: The grid every calibrated sigma lies on: exp(k * _GRID) (a relative step of 1e-4).
_GRID = 1e-4
#: The guided search stops within this share of ``epsilon_tolerance`` of the target (one grid step moves epsilon by
#: about 1e-3 at a target of 8): the exact search on the grid then starts next to its answer.
_GUIDE_TOLERANCE = 1e-3


def _grid_index(sigma: float) -> int:
    """The smallest k with exp(k * _GRID) >= sigma (a sigma on the grid gives its own k despite float rounding)."""
    k = math.ceil(math.log(sigma) / _GRID)
    return k - 1 if math.exp((k - 1) * _GRID) >= sigma else k


def _on_grid(exact, sigma: float, target_epsilon: float) -> tuple[float, float]:
    """The smallest sigma of the grid ``exp(k * _GRID)`` whose exact epsilon is <= the target, from a
    ``sigma`` that meets it; returns (that sigma, its epsilon).

    Epsilon decreases in sigma, so that grid point is unique: the answer depends on the budget and the
    sample rate only, never on where a warm-started search happened to stop (a plan made in another
    process, or a device built after others, gets the very same sigma)."""
    k_hi = _grid_index(sigma)
    while exact(math.exp(k_hi * _GRID)) > target_epsilon:  # (float rounding at the edge)
        k_hi += 1
    step, k_lo = 1, k_hi - 1
    while exact(math.exp(k_lo * _GRID)) <= target_epsilon:
        k_hi, step = k_lo, 2 * step
        k_lo = k_hi - step
    while k_hi - k_lo > 1:
        mid = (k_hi + k_lo) // 2
        if exact(math.exp(mid * _GRID)) <= target_epsilon:
            k_hi = mid
        else:
            k_lo = mid
    best = math.exp(k_hi * _GRID)
    return best, exact(best)


def _window_rdp(sample_rate: float, sigma: float, steps: int, orders: list[float]) -> np.ndarray:
    """The RDP that guides the search, never the answer (that is checked with Opacus's accountant):
    :mod:`fedpersona.privacy.rdp`'s quadrature, which agrees with Opacus's series to ~1e-12 and is about ten times
    faster at the small fractional orders a calibration usually settles on."""
    return rdp_subsampled_gaussian(q=sample_rate, sigma=sigma, orders=orders, steps=steps)


def _bracket_search(evaluate, low: float, high: float, eps_high: float, target: float,
                    tolerance: float) -> tuple[float, float, float]:
    """Shrink ``[low, high]`` (``evaluate(low) > target >= evaluate(high) = eps_high``) until
    ``target - eps_high <= tolerance``: (high, eps_high, low).

    Regula falsi with the Illinois modification (epsilon is smooth and decreasing in sigma, so
    it converges in a few evaluations where halving needs about ten); a halving step while the
    low end's epsilon is not known finite, and whenever the interpolation would land within 1% of an end.
    """
    f_low, f_high = math.inf, eps_high - target  # the ends' weights in the interpolation
    side = 0  # which end the last step replaced (+1 low, -1 high)
    while target - eps_high > tolerance and high - low > 1e-9 * high:
        width = high - low
        mid = 0.5 * (low + high)
        if math.isfinite(f_low):
            guess = high - f_high * width / (f_high - f_low)
            if low + 0.01 * width < guess < high - 0.01 * width:
                mid = guess
        e = evaluate(mid)
        if e <= target:
            high, eps_high, f_high = mid, e, e - target
            if side == -1:
                f_low /= 2  # the low end stayed twice: halve its weight (Illinois)
            side = -1
        else:
            low, f_low = mid, e - target
            if side == 1:
                f_high /= 2
            side = 1
    return high, eps_high, low


def _calibrate_prv(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                   epsilon_tolerance: float) -> tuple[float, float]:
    """(sigma, epsilon) for the PRV accountant: a bisection below the RDP answer."""

    def eps(sigma: float) -> float:
        return _epsilon_of([[sigma, float(sample_rate), steps]], delta, "prv")

    # PRV is slow (and can take minutes) far below the answer: start from the RDP
    # answer, which is an upper bound up to PRV's discretisation error.
    high = _calibrated(target_epsilon, delta, sample_rate, steps, "rdp", epsilon_tolerance)
    low = 0.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        if high > _MAX_SIGMA:
            raise _too_small(target_epsilon, delta, steps, sample_rate)
        eps_high = eps(high)
    if low == 0.0:
        # Find a lower bracket by geometric steps rather than jumping towards 0.
        low = high
        while True:
            low *= 0.8
            if eps(low) > target_epsilon:
                break
            high = low
        eps_high = eps(high)
    while target_epsilon - eps_high > epsilon_tolerance and high - low > 1e-9 * high:
        mid = 0.5 * (low + high)
        e = eps(mid)
        if e <= target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high, eps_high
