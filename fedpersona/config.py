"""One namespaced configuration, parsed once into frozen, validated dataclasses.

Keys are kebab-case and dotted by scope (``privacy.target-epsilon``), exactly as
they appear in ``[tool.flwr.app.config]`` of ``pyproject.toml`` and in the
scenario files under ``simulations/conf/``. ``load_config`` is the only place
that reads raw configuration: it rejects unknown keys, coerces types and
validates every value, raising ``ValueError`` that names the field and value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: Environment variable holding a JSON object of config overrides. The console
#: script uses it to hand a scenario to the ServerApp and the ClientApps of a
#: simulation (Ray workers inherit the environment); ``flwr run`` does not set it.
CONFIG_ENV = "FEDPERSONA_RUN_CONFIG"

SPLITS = ("ffa", "fedsa", "fedper")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
#: Where the DP-SGD noise of the shared adapter goes (``privacy.noise-on``).
NOISE_PLACEMENTS = ("device", "sum")
SAMPLINGS = ("uniform", "balanced")
HEAD_AT = ("round", "end")
CLIENT_OPTIMIZERS = ("sgd", "adam")
ACCOUNTANTS = ("rdp", "prv")
PERSONAL_HEADS = ("local", "dp")
HEADS = ("lora", "prompt")
MODEL_DTYPES = ("float32", "bfloat16")
SHAKESPEARE = "shakespeare"
#: Deprecated config keys -> the keys that replaced them (accepted with a warning).
RENAMED_KEYS = {"data.min-speeches": "data.min-examples"}
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Upper bounds on values that no run needs: a round config is written by the server, and a value
#: past these is a weapon (ten million head steps; a billion planned rounds), not a setting. A
#: device's own, tighter caps are its policy (``client/policy.py``: ``policy.max-*``).
MAX_ROUNDS = 100_000
MAX_STEPS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_SEQ_LEN = 32_768


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"Invalid config value for '{key}': {why}. You passed: {value!r}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"
    seed: int = 0
    results_dir: str = "results"
    state_dir: str = "state"

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise _bad("run.name", self.name, "must be a non-empty name without slashes or spaces")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2"
    seq_len: int = 64
    cue_tokens: int = 24
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise _bad("model.device", self.device, "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.dtype not in MODEL_DTYPES:
            raise _bad("model.dtype", self.dtype, f"must be one of {MODEL_DTYPES} (the frozen base; adapters stay float32)")
        if not self.path:
            raise _bad("model.path", self.path, "must be 'smollm2' or a model folder")
        if not 16 <= self.seq_len <= MAX_SEQ_LEN:
            raise _bad("model.seq-len", self.seq_len, f"must be in [16, {MAX_SEQ_LEN}]")
        if not 0 <= self.cue_tokens <= self.seq_len - 8:
            raise _bad("model.cue-tokens", self.cue_tokens, f"must be in [0, seq-len - 8 = {self.seq_len - 8}]")


@dataclass(frozen=True)
class DataConfig:
    """Where a simulation's users come from and how many examples each keeps (``docs/data.md``).

    ``source``: ``shakespeare`` (the built-in corpus), a ``*.jsonl`` / ``*.json`` / ``*.csv`` /
    ``*.parquet`` file or a Hugging Face ``save_to_disk`` folder (read by
    :mod:`fedpersona.simulations.sources`); ``*_column``: the columns of such a source. Deployed devices read
    their own folders (``client/data.py``) and ignore these keys.
    """

    source: str = SHAKESPEARE
    user_column: str = "user"
    cue_column: str = "cue"
    reply_column: str = "reply"
    text_column: str = ""
    order_column: str = ""
    thread_column: str = ""
    min_examples: int = 40
    max_users: int = 20
    max_examples: int = 48
    eval_fraction: float = 0.25

    @property
    def min_speeches(self) -> int:
        """The former name of :attr:`min_examples` (config key ``data.min-speeches``, deprecated)."""
        return self.min_examples

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise _bad("data.source", self.source, f"must be '{SHAKESPEARE}', a data file or a saved dataset folder")
        if not self.user_column:
            raise _bad("data.user-column", self.user_column, "must name the column holding each row's user")
        if not self.text_column and not self.reply_column:
            raise _bad("data.reply-column", self.reply_column, "must name a column (or set data.text-column)")
        for key, value in (("data.order-column", self.order_column), ("data.thread-column", self.thread_column)):
            if value and not self.text_column:
                raise _bad(key, value, "applies to chat logs only: set data.text-column too")
        named = [c for c in (self.user_column, self.text_column or self.reply_column,
                             "" if self.text_column else self.cue_column) if c]
        if len(set(named)) != len(named):
            raise _bad("data.user-column", self.user_column,
                       f"the user, cue and reply (or text) columns must differ; they are {named}")
        if self.min_examples < 2:
            raise _bad("data.min-examples", self.min_examples, "must be at least 2 (train and held-out)")
        if self.max_users < 1:
            raise _bad("data.max-users", self.max_users, "must be at least 1")
        if self.max_examples < 2:
            raise _bad("data.max-examples", self.max_examples, "must be at least 2")
        if not 0.0 < self.eval_fraction < 1.0:
            raise _bad("data.eval-fraction", self.eval_fraction, "must be in (0, 1)")


@dataclass(frozen=True)
class AdapterConfig:
    split: str = "ffa"
    rank: int = 8
    alpha: float = 16.0
    layers: int = 2
    personal_layers: int = 1
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj")
    #: ``lora``: a personal LoRA adapter on the top ``personal_layers`` blocks; ``prompt``: a per-user
    #: soft prompt of ``prompt_tokens`` vectors prepended to the hidden states entering the first adapted block.
    head: str = "lora"
    prompt_tokens: int = 8

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise _bad("adapter.split", self.split, f"must be one of {SPLITS}")
        if self.head not in HEADS:
            raise _bad("adapter.head", self.head, f"must be one of {HEADS} (lora: a personal LoRA adapter on the top "
                       "adapter.personal-layers blocks; prompt: a per-user soft prompt at the cached lower blocks' output)")
        if self.prompt_tokens < 1:
            raise _bad("adapter.prompt-tokens", self.prompt_tokens, "must be at least 1 (the soft prompt's length)")
        if self.head == "prompt" and self.split == "fedsa":
            raise _bad("adapter.head", self.head,
                       "adapter.split = 'fedsa' keeps the personal part (B) inside the shared adapter, so it has no "
                       "separate head to replace by a prompt: use adapter.split = 'ffa' or 'fedper' with a prompt head")
        if self.rank < 1:
            raise _bad("adapter.rank", self.rank, "must be at least 1")
        if self.alpha <= 0:
            raise _bad("adapter.alpha", self.alpha, "must be positive")
        if self.layers < 1:
            raise _bad("adapter.layers", self.layers, "must be at least 1")
        if self.personal_layers < 1:
            raise _bad("adapter.personal-layers", self.personal_layers, "must be at least 1")
        if self.head == "lora" and self.split == "fedper" and self.personal_layers >= self.layers:
            raise _bad(
                "adapter.personal-layers",
                self.personal_layers,
                f"with split 'fedper' the personal top blocks must be fewer than adapter.layers={self.layers}",
            )
        if self.head == "lora" and self.split != "fedsa" and self.personal_layers > self.layers:
            raise _bad("adapter.personal-layers", self.personal_layers, f"must be at most adapter.layers={self.layers}")
        if not self.targets:
            raise _bad("adapter.targets", self.targets, "must name at least one module")
        for t in self.targets:
            if t not in LINEAR_TARGETS:
                raise _bad("adapter.targets", ",".join(self.targets), f"'{t}' is not one of {LINEAR_TARGETS}")


@dataclass(frozen=True)
class ClientConfig:
    local_steps: int = 6
    batch_size: int = 8
    lr: float = 0.02
    optimizer: str = "adam"
    head_steps: int = 12
    head_batch_size: int = 8
    head_lr: float = 0.005
    #: When the head is trained: ``round`` (after each of the device's participations, on that round's shared
    #: adapter) or ``end`` (once, after the last round, on the run's final shared adapter, for every device).
    head_at: str = "round"
    max_new_examples: int = 0  # device policy: new chat-feedback examples a round may add (0 = no cap)
    cache_activations: bool = True  # keep the frozen lower blocks' outputs in the encrypted store
    #: Participations (rounds) a device plans its noise for and accepts (0: privacy.planned-rounds /
    #: server.num-rounds; ``fedpersona run`` fills in the scenario's expected participations).
    max_participations: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.head_steps <= MAX_STEPS:
            raise _bad("client.head-steps", self.head_steps, f"must be in [0, {MAX_STEPS}] (0: the head is not trained)")
        if not 1 <= self.head_batch_size <= MAX_BATCH_SIZE:
            raise _bad("client.head-batch-size", self.head_batch_size, f"must be in [1, {MAX_BATCH_SIZE}]")
        if not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            raise _bad("client.head-lr", self.head_lr, "must be a positive finite number")
        if self.head_at not in HEAD_AT:
            raise _bad("client.head-at", self.head_at, f"must be one of {HEAD_AT} (round: after each participation, on "
                       "that round's shared adapter; end: once, on the run's final shared adapter)")
        if self.max_new_examples < 0:
            raise _bad("client.max-new-examples", self.max_new_examples, "must be >= 0 (0 = no cap)")
        if self.max_participations < 0:
            raise _bad("client.max-participations", self.max_participations,
                       "must be >= 0 (0: every planned round, privacy.planned-rounds or server.num-rounds)")
        if not 1 <= self.local_steps <= MAX_STEPS:
            raise _bad("client.local-steps", self.local_steps, f"must be in [1, {MAX_STEPS}]")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise _bad("client.batch-size", self.batch_size, f"must be in [1, {MAX_BATCH_SIZE}]")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise _bad("client.lr", self.lr, "must be a positive finite number")
        if self.optimizer not in CLIENT_OPTIMIZERS:
            raise _bad("client.optimizer", self.optimizer, f"must be one of {CLIENT_OPTIMIZERS}")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-3
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    planned_rounds: int = 0
    accountant: str = "rdp"
    personal_head: str = "local"
    #: ``device``: every device noises its own DP-SGD steps; ``sum``: one DP-SGD step of the shared adapter is
    #: one secure sum over the cohort, each device adding noise of variance sigma^2 C^2 / t (privacy/sumdp.py).
    noise_on: str = "device"
    #: t, the honest contributors a device counts on in each noisy sum (0: half of the round's announced cohort).
    honest_contributors: int = 0

    def __post_init__(self) -> None:
        if self.noise_on not in NOISE_PLACEMENTS:
            raise _bad("privacy.noise-on", self.noise_on,
                       f"must be one of {NOISE_PLACEMENTS} (device: each device noises its own DP-SGD steps; sum: "
                       "the noise is added once to the cohort's secure sum of clipped gradients)")
        if self.honest_contributors < 0 or self.honest_contributors == 1:
            raise _bad("privacy.honest-contributors", self.honest_contributors,
                       "must be 0 (half of the round's announced cohort) or >= 2")
        if self.personal_head not in PERSONAL_HEADS:
            raise _bad(
                "privacy.personal-head",
                self.personal_head,
                f"must be one of {PERSONAL_HEADS} (local: the head never leaves the device and is trained without "
                "noise; dp: DP-SGD for the head too, with its own ledger)",
            )
        if not self.target_epsilon > 0 or not math.isfinite(self.target_epsilon):
            raise _bad("privacy.target-epsilon", self.target_epsilon, "must be a positive finite number")
        if not 0.0 < self.delta < 1.0:
            raise _bad("privacy.delta", self.delta, "must be in (0, 1)")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise _bad("privacy.max-grad-norm", self.max_grad_norm, "must be a positive finite number")
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise _bad(
                "privacy.noise-multiplier",
                self.noise_multiplier,
                "must be >= 0 (0 means: calibrate from privacy.target-epsilon)",
            )
        if not 0 <= self.planned_rounds <= MAX_ROUNDS:
            raise _bad("privacy.planned-rounds", self.planned_rounds,
                       f"must be in [0, {MAX_ROUNDS}] (0 means: server.num-rounds)")
        if self.accountant not in ACCOUNTANTS:
            raise _bad(
                "privacy.accountant",
                self.accountant,
                f"must be one of {ACCOUNTANTS} (Opacus's GDP accountant is off by about 2x here)",
            )


@dataclass(frozen=True)
class ServerConfig:
    num_rounds: int = 5
    clients_per_round: int = 8
    min_clients: int = 2
    optimizer: str = "fedavg"
    lr: float = 1.0
    round_timeout: float = 0.0
    sampling: str = "uniform"
    momentum: float = 0.9  # fedavgm's heavy-ball momentum

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise _bad("server.momentum", self.momentum, "must be in [0, 1) (fedavgm's momentum)")
        if self.sampling not in SAMPLINGS:
            raise _bad("server.sampling", self.sampling, f"must be one of {SAMPLINGS}")
        if not 1 <= self.num_rounds <= MAX_ROUNDS:
            raise _bad("server.num-rounds", self.num_rounds, f"must be in [1, {MAX_ROUNDS}]")
        if self.clients_per_round < 1:
            raise _bad("server.clients-per-round", self.clients_per_round, "the cohort cannot be empty")
        if self.min_clients < 1 or self.min_clients > self.clients_per_round:
            raise _bad(
                "server.min-clients",
                self.min_clients,
                f"must be in [1, server.clients-per-round={self.clients_per_round}]",
            )
        if self.optimizer not in SERVER_OPTIMIZERS:
            raise _bad("server.optimizer", self.optimizer, f"must be one of {SERVER_OPTIMIZERS}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise _bad("server.lr", self.lr, "must be a positive finite number")
        if self.round_timeout < 0:
            raise _bad("server.round-timeout", self.round_timeout, "must be >= 0 (0 waits without limit)")


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation of the shared updates (SecAgg+, :mod:`fedpersona.privacy.secagg`), and distributed DP on top.

    ``clip_norm`` bounds the L2 norm of what a client adds to the sum: its update (weight 1 for every
    client; the demo's updates measure ~2.15, and the demo sets 3.0). ``scale``: quantized
    units per unit of update (the rounding error of the summed update is < cohort/scale per
    coordinate); 0 picks 2^20, or with ``ddp`` the largest power of two <= 2^20 that keeps each
    client's noise stddev <= 2^16 units. ``degree`` / ``threshold``: 0 picks SecAgg+'s defaults (degree
    ``2 ceil(1.5 log2 n)``, threshold a strict majority of a client's k + 1 share holders).
    ``ddp``: each client adds discrete Gaussian noise before masking so the released sum has
    noise stddev ``ddp_noise_multiplier * clip_norm`` whenever at least ``ddp_min_clients``
    (0: ``server.min-clients``) clients are in it; the round is refused with fewer.
    ``min_contributors``: the fewest devices that actually trained whose masked inputs must survive
    before the server asks anyone to unmask (a device that declines takes no part in masking); a
    round with fewer aborts before any share is requested, and a device refuses to unmask a sum of
    fewer survivors than its own floor (node config ``policy.min-contributors``, default 3).
    """

    enabled: bool = True
    clip_norm: float = 2.0
    scale: float = 0.0
    degree: int = 0
    threshold: int = 0
    ddp: bool = False
    ddp_noise_multiplier: float = 1.0
    ddp_min_clients: int = 0
    ddp_delta: float = 1e-5
    min_contributors: int = 3

    def __post_init__(self) -> None:
        if self.min_contributors < 2:
            raise _bad("secagg.min-contributors", self.min_contributors,
                       "must be >= 2 (a sum of one device is that device's update)")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise _bad("secagg.clip-norm", self.clip_norm, "must be a positive finite number")
        if not (math.isfinite(self.scale) and (self.scale >= 1 or self.scale == 0)):
            raise _bad("secagg.scale", self.scale, "must be 0 (auto) or a finite number >= 1 (quantized units per unit)")
        if self.degree < 0:
            raise _bad("secagg.degree", self.degree, "must be >= 0 (0 picks 2 ceil(1.5 log2 n))")
        if self.threshold < 0:
            raise _bad("secagg.threshold", self.threshold, "must be >= 0 (0 picks a strict majority)")
        if not (math.isfinite(self.ddp_noise_multiplier) and self.ddp_noise_multiplier > 0):
            raise _bad("secagg.ddp-noise-multiplier", self.ddp_noise_multiplier, "must be a positive finite number")
        if self.ddp_min_clients < 0 or self.ddp_min_clients == 1:
            raise _bad("secagg.ddp-min-clients", self.ddp_min_clients, "must be 0 (server.min-clients) or >= 2")
        if not 0.0 < self.ddp_delta < 1.0:
            raise _bad("secagg.ddp-delta", self.ddp_delta, "must be in (0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """``final``: every device evaluates at the end; the server gets only the noised secure sum of its figures
    (:mod:`fedpersona.privacy.secagg.eval_figures`), whose noise has standard deviation ``noise_multiplier`` x the figures'
    L2 sensitivity (user-level DP, recorded in each device's ledger). ``per_round``: each device also evaluates
    on its held-out split before every round, for its own log only (nothing of it is sent).
    ``local_baseline``: simulations only, see :meth:`fedpersona.client.device.Device.final_evaluation`."""

    final: bool = True
    local_baseline: bool = True
    per_round: bool = False
    noise_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and 0.5 <= self.noise_multiplier <= 50):
            raise _bad("eval.noise-multiplier", self.noise_multiplier,
                       "must be in [0.5, 50] (the final evaluation's figures are always noised)")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)

    @property
    def planned_rounds(self) -> int:
        """Rounds a client plans its privacy budget for (a client may be sampled in each)."""
        return self.privacy.planned_rounds or self.server.num_rounds

    @property
    def planned_participations(self) -> int:
        """Participations the server suggests a device plans its noise for (and takes at most):
        ``client.max-participations``, never more than the planned rounds; 0 means every planned round."""
        cap = self.client.max_participations
        return min(cap, self.planned_rounds) if cap > 0 else self.planned_rounds

    def to_flat(self) -> dict[str, Any]:
        """The config as flat kebab-case keys (the inverse of ``load_config``)."""
        out: dict[str, Any] = {}
        for sf in fields(self):
            section = getattr(self, sf.name)
            for f in fields(section):
                value = getattr(section, f.name)
                if isinstance(value, tuple):
                    value = ",".join(value)
                out[f"{sf.name}.{f.name.replace('_', '-')}"] = value
        return out


def _section_types() -> dict[str, dict[str, dataclasses.Field]]:
    out = {}
    for sf in fields(Config):
        out[sf.name] = {f.name: f for f in fields(sf.default_factory)}  # type: ignore[arg-type]
    return out


def known_keys() -> list[str]:
    return [f"{s}.{n.replace('_', '-')}" for s, fs in _section_types().items() for n in fs]


def suggest_key(key: str) -> str | None:
    """The known key a mistyped ``key`` most likely meant (``privacy.target_epsilon``, ``privcy.delta``,
    ``target-epsilon``), or None when no key is close."""
    keys = known_keys()
    fixed = key.strip().lower().replace("_", "-")
    if fixed in keys:
        return fixed
    if "." not in fixed:  # a key without its section: the one section that has it
        owners = [k for k in keys if k.split(".", 1)[1] == fixed]
        if len(owners) == 1:
            return owners[0]
    close = difflib.get_close_matches(fixed, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    section, _, name = fixed.partition(".")
    sections = sorted({k.split(".", 1)[0] for k in keys})
    near = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
    if near and name:
        in_section = [k for k in keys if k.startswith(near[0] + ".")]
        close = difflib.get_close_matches(f"{near[0]}.{name}", in_section, n=1, cutoff=0.6)
        if close:
            return close[0]
    return None


def unknown_keys_message(unknown: list[str]) -> str:
    """The error for unknown config keys: for each, the key it most likely meant, or the keys of its section."""
    keys = known_keys()
    sections = sorted({k.split(".", 1)[0] for k in keys})
    hints = []
    for key in sorted(unknown):
        guess = suggest_key(key)
        if guess is not None:
            hints.append(f"'{key}': did you mean '{guess}'?")
            continue
        section = key.partition(".")[0]
        if section in sections:
            names = ", ".join(k.split(".", 1)[1] for k in keys if k.startswith(section + "."))
            hints.append(f"'{key}': [{section}] has {names}.")
        else:
            hints.append(f"'{key}': no section '{section}' (sections: {', '.join(sections)}).")
    return (f"Unknown config key(s): {', '.join(sorted(unknown))}. " + " ".join(hints)
            + " Every key: docs/configuration.md.")


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _bad(key, value, "must be true or false")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _bad(key, value, "must be an integer")
        try:
            f = float(value)
        except ValueError:
            raise _bad(key, value, "must be an integer") from None
        if not f.is_integer():
            raise _bad(key, value, "must be an integer")
        return int(f)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise _bad(key, value, "must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _bad(key, value, "must be a number") from None
    if isinstance(default, tuple):
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        raise _bad(key, value, "must be a comma-separated list")
    if not isinstance(value, str):
        raise _bad(key, value, "must be a string")
    return value


def load_config(raw: Mapping[str, Any] | None = None, *, env: bool = True) -> Config:
    """Parse flat kebab-case keys into a validated :class:`Config`.

    Layers, later wins: dataclass defaults, ``raw`` (a Flower ``run_config`` or a
    scenario file), then the JSON overrides in ``$FEDPERSONA_RUN_CONFIG`` when
    ``env`` is true.
    """
    merged: dict[str, Any] = dict(raw or {})
    if env and os.environ.get(CONFIG_ENV):
        try:
            overlay = json.loads(os.environ[CONFIG_ENV])
        except json.JSONDecodeError as exc:
            raise ValueError(f"${CONFIG_ENV} is not a JSON object: {exc}") from None
        if not isinstance(overlay, dict):
            raise ValueError(f"${CONFIG_ENV} must hold a JSON object of config keys")
        merged.update(overlay)
    for old, new in RENAMED_KEYS.items():
        if old in merged:
            value = merged.pop(old)
            warnings.warn(f"The config key '{old}' is deprecated: use '{new}' (the value {value!r} is used).",
                          FutureWarning, stacklevel=2)
            merged[new] = value
    types = _section_types()
    values: dict[str, dict[str, Any]] = {s: {} for s in types}
    unknown = []
    for key, value in merged.items():
        section, _, name = key.partition(".")
        attr = name.replace("-", "_")
        if section not in types or attr not in types[section] or "_" in name:
            unknown.append(key)
            continue
        f = types[section][attr]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        values[section][attr] = _coerce(key, value, default)
    if unknown:
        raise ValueError(unknown_keys_message(unknown))
    sections = {}
    for sf in fields(Config):
        sections[sf.name] = sf.default_factory(**values[sf.name])  # type: ignore[misc]
    cfg = Config(**sections)
    _check_personal_head(cfg)
    _check_secagg(cfg)
    _check_noise_on(cfg)
    if not cfg.secagg.enabled:
        warnings.warn(
            "secagg.enabled = false: plain aggregation; the server sees each client's update in the clear "
            "(and its evaluation figures, noised by the client alone).",
            stacklevel=2,
        )
    if not cfg.privacy.enabled:
        warnings.warn(
            "privacy.enabled = false: clients train WITHOUT differential privacy; "
            "their updates carry no privacy guarantee.",
            stacklevel=2,
        )
    return cfg


def _check_personal_head(cfg: Config) -> None:
    """``fedsa`` keeps B personal inside the shared adapter: the released pass depends on it, so it needs DP."""
    if cfg.adapter.split == "fedsa" and cfg.privacy.enabled and cfg.privacy.personal_head != "dp":
        raise _bad(
            "privacy.personal-head",
            cfg.privacy.personal_head,
            "with adapter.split = 'fedsa' the personal B is part of the shared adapter, so the released update "
            "depends on it: set privacy.personal-head = 'dp' (A and B are then trained together under DP-SGD, "
            "counted in the one ledger)",
        )


def _check_secagg(cfg: Config) -> None:
    """Cross-section ranges of ``secagg.*``; whether the protocol can meet them (graph, modulus, noise) is
    :func:`fedpersona.privacy.secagg.settings.secagg_params`, which every run path calls before it starts."""
    s, n = cfg.secagg, cfg.server.clients_per_round
    if s.ddp and s.ddp_min_clients > n:
        raise _bad("secagg.ddp-min-clients", s.ddp_min_clients, f"must be at most server.clients-per-round={n}")
    if s.threshold > n:
        raise _bad("secagg.threshold", s.threshold, f"must be at most server.clients-per-round={n}")
    if s.enabled and s.min_contributors > n:
        raise _bad("secagg.min-contributors", s.min_contributors, f"must be at most server.clients-per-round={n}")


def _check_noise_on(cfg: Config) -> None:
    """Noise on the sum (``privacy.noise-on = sum``) is only as safe as the secure sum it is added to."""
    p, n = cfg.privacy, cfg.server.clients_per_round
    if p.honest_contributors > n:
        raise _bad("privacy.honest-contributors", p.honest_contributors,
                   f"must be at most server.clients-per-round={n}")
    if p.noise_on != "sum":
        return
    if not cfg.secagg.enabled:
        raise _bad("privacy.noise-on", p.noise_on, "noise on the sum needs secure aggregation (secagg.enabled = true): "
                   "without it the server sees each device's gradient sum with a t-th of the noise")
    if cfg.secagg.ddp:
        raise _bad("privacy.noise-on", p.noise_on, "secagg.ddp (user-level noise on the whole update) is another "
                   "mechanism: set secagg.ddp = false with noise on the sum")
    if p.accountant != "rdp":
        raise _bad("privacy.accountant", p.accountant, "noise on the sum is accounted with RDP at integer orders "
                   "(where the discrete Gaussian's loss equals the Gaussian's): use 'rdp'")
    if cfg.adapter.split == "fedsa":
        raise _bad("privacy.noise-on", p.noise_on, "adapter.split = 'fedsa' keeps the personal B inside the shared "
                   "adapter, so the released gradient would depend on it: use 'ffa' or 'fedper'")
    if n < 2:
        raise _bad("server.clients-per-round", n, "noise on the sum needs a cohort of at least 2")


def expected_participations(*, rounds: int, cohort: int, users: int, sampling: str) -> int:
    """Participations a device of a simulation can expect (``client.max-participations`` when left at 0).

    ``balanced`` sampling gives every user ``ceil(rounds * cohort / users)`` at most; ``uniform`` sampling
    the smallest m that a device exceeds with probability at most 10% (binomial, rounds draws of
    cohort / users). Never more than ``rounds``.
    """
    if min(rounds, cohort, users) < 1:
        raise ValueError(f"rounds, cohort and users must be >= 1. You passed: {rounds}, {cohort}, {users}")
    p = min(1.0, cohort / users)
    if sampling == "balanced" or p >= 1.0:
        return min(rounds, math.ceil(rounds * cohort / users))
    tail, m = 1.0, 0
    for m in range(rounds + 1):
        tail -= math.comb(rounds, m) * p**m * (1 - p) ** (rounds - m)
        if tail <= 0.1:
            break
    return max(1, min(rounds, m))


def read_scenario(path: str | Path) -> dict[str, Any]:
    """Read a scenario TOML file into flat config keys (``[privacy] target-epsilon = 4`` -> ``privacy.target-epsilon``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Scenario file not found: {p}")
    with p.open("rb") as fh:
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"Scenario file {p} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """``key=value`` strings (``--set``, repeatable) as a dict; a later key wins."""
    return dict(parse_override(text) for text in texts)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from the command line; the value is read as TOML when it can be."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"Override must look like key=value. You passed: {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed
