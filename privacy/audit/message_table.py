"""What leaves a device: every field of every reply it sends, and what covers it. One table, as data.

:data:`TABLE` lists each field of each reply a device sends (train, evaluate, the secure-aggregation
queries, error replies), including what is hidden inside a masked vector (the update, the masked
extras, the evaluation's figures), with what it is and the mechanism that covers it in the default
configuration (``when``: the setting under which the row applies when it is not the default).
``tests/privacy/test_message_table.py`` walks the real replies of an in-process federation (tiny
model, secure aggregation on and off, every message type, declines and error replies) and fails on
any field this table does not list, naming the reply and the field. :func:`render_markdown` writes
the table into ``docs/audit.md`` (a test checks the copy there is current) and the audit report.

Adding a field to a reply: add its :class:`Row` here (in the group of its reply). A field is

* ``part = "config"`` / ``"array"`` / ``"metric"``: an entry of a ConfigRecord / ArrayRecord /
  MetricRecord of the reply, ``record`` the record's name, ``name`` the entry's key;
* ``part = "masked-vector"``: a named part of a vector masked by secure aggregation (``record``:
  ``update`` for the train vector, ``figures`` for the evaluation's);
* ``part = "masked-extra"``: a scalar masked together with that vector (``record`` ``extras``);
* ``part = "error"``: the code and the reason of an error reply (``message`` ``*``: any type).

``record`` and ``name`` are :mod:`fnmatch` patterns (``*`` matches any name: the update's tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

__all__ = ["HEAD_EXCHANGE", "PARTS", "PLAIN", "SUM_STEP", "Row", "TABLE", "field_label", "lookup", "render_markdown", "unlisted"]

PARTS = ("config", "array", "metric", "masked-vector", "masked-extra", "error")

# The guarantees the rows refer to (one wording each).
_SUM = ("SecAgg+ (docs/secagg.md): the server learns this only inside the sum over at least "
        "max(secagg.min-contributors, server.min-clients) devices, and the device refuses to unmask a sum of fewer "
        "than its own policy.min-contributors (default 3)")
_DPSGD = ("record-level DP-SGD: the user's epsilon in its ledger (Poisson sampling, per-example clipping, Gaussian "
          "noise from an AES-256-CTR CSPRNG keyed from os.urandom)")
_EVAL_DP = ("user-level DP: every device adds discrete Gaussian noise before masking, so a sum of at least "
            "max(secagg.min-contributors, server.min-clients) devices carries noise of standard deviation "
            "eval.noise-multiplier x sqrt(20) (the vector's L2 bound) on each coordinate; the device records the "
            "epsilon (at secagg.ddp-delta) in its ledger (secagg-eval-ddg) before replying, and refuses when it "
            "would exceed its policy.max-epsilon")
_IDS = "nothing about the user: identifiers the server assigned (node id, run id, round)"
_CIPHER = ("encryption: AES-GCM under a key agreed with each share holder (X25519); the server cannot read it, "
           "and fewer than the threshold shares reveal nothing")
_SIGNED = ("a signature under the device's per-run signing key: it says which message the device sent, nothing about "
           "the user")
_KEY = "a public key: nothing about the user"
SUM_STEP = _SUM_STEP = "privacy.noise-on = sum (docs/sumdp.md)"
#: The personalize exchange: after each noisy-sum round, or once after the last round (``client.head-at = end``).
HEAD_EXCHANGE = "privacy.noise-on = sum (docs/sumdp.md), or `client.head-at = end` in either placement"
PLAIN = _PLAIN = "secagg.enabled = false (only on a device whose policy.allow-no-secagg allows it)"


@dataclass(frozen=True)
class Row:
    message: str  # the message type of the reply ("*": any)
    part: str  # one of PARTS
    record: str  # record name (pattern)
    name: str  # field name (pattern)
    what: str
    covered_by: str
    when: str = ""  # "" = the default configuration

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"Row.part must be one of {PARTS}. You passed: {self.part!r}")
        for key in ("message", "record", "name", "what", "covered_by"):
            if not getattr(self, key):
                raise ValueError(f"Row.{key} must be non-empty. You passed: {asdict(self)!r}")

    def matches(self, message: str, part: str, record: str, name: str) -> bool:
        return (part == self.part and fnmatchcase(message, self.message) and fnmatchcase(record, self.record)
                and fnmatchcase(name, self.name))


def _secagg_stage1(message: str, when: str = "") -> list[Row]:
    """The fields of a masked-input reply (train or evaluate), besides what the vector holds."""
    return [Row(r.message, r.part, r.record, r.name, r.what, r.covered_by, when) for r in [
        Row(message, "config", "secagg", "client_id", "this node's id", _IDS),
        Row(message, "config", "secagg", "run_id", "the run's id", _IDS),
        Row(message, "config", "secagg", "round", "the round number", _IDS),
        Row(message, "array", "secagg-arrays", "masked",
            "the masked vector (uint8, b-bit packed): the quantized vector below plus pairwise and self masks",
            "uniformly random without the masks; " + _SUM),
        Row(message, "array", "secagg-arrays", "share_holders", "the ids of the neighbours holding this device's shares",
            "public: the graph the server drew"),
        Row(message, "config", "secagg", "ciphertexts", "this device's Shamir shares of its mask seeds, one per holder",
            _CIPHER),
        Row(message, "config", "secagg", "signature",
            "the device's Ed25519 signature over (round digest, its id, SHA-256 of the masked vector and of the "
            "ciphertexts), or over the round digest in a decline",
            _SIGNED),
    ]]


_EVAL_FIGURES = [
    ("users", "1 (a device that evaluated)"),
    ("*-users", "1 if the device has this model's figures (base, shared, personal; local: simulations only)"),
    ("*-loss", "the model's per-user mean held-out loss, clipped to [0, 10] nats and divided by 10"),
    ("*-accuracy", "the model's per-user next-token accuracy on the held-out split"),
    ("*-loss histogram", "one-hot: the bin of the model's per-user loss (0.1-nat bins up to 10)"),
    ("*-gain histogram", "one-hot: the bin of base-loss - model-loss (0.02-nat bins in [-1, 1))"),
]

#: Every field of every reply a device sends, and what covers it (see the module docstring).
TABLE: tuple[Row, ...] = tuple(
    # ---- train, under secure aggregation (the default)
    _secagg_stage1("train")
    + [
        Row("train", "masked-vector", "update", "shared-adapter update",
            "the change of the shared adapter's tensors in this round (weight 1 for every device), clipped to "
            "secagg.clip-norm and quantized",
            _DPSGD + "; clipping and quantization are post-processing; " + _SUM
            + ". With secagg.ddp = true also user-level distributed DP (the ledger's secagg-ddg entries)"),
        Row("train", "masked-extra", "extras", "trained", "1 for every device that sends a masked input",
            "a constant: its total is the number of survivors, which the server knows"),
        Row("train", "config", "secagg", "declined",
            "1: the device takes no part in this round (its budget is spent, or it refuses the round)",
            "not noised: that this node declined is visible to the server, as its silence would be"),
        # ---- train, plain aggregation
        Row("train", "array", "update", "*", "the change of each shared-adapter tensor (weight 1)",
            _DPSGD + "; the server sees this device's update alone", _PLAIN),
        Row("train", "metric", "metrics", "weight", "1.0, the same for every device (0.0 in a decline)", "a constant",
            _PLAIN),
        Row("train", "metric", "metrics", "trained", "1.0 (0.0 in a decline)", "a constant", _PLAIN),
        Row("train", "config", "status", "status", "'budget-exhausted': the device declines", "fixed text", _PLAIN),
        Row("train", "config", "status", "detail", "a fixed sentence saying why", "fixed text", _PLAIN),
        # ---- key advertisement (once per run)
        Row("query.advertise", "config", "secagg", "client_id", "this node's id", _IDS),
        Row("query.advertise", "config", "secagg", "enc_pk", "the device's long-term X25519 public key for shares",
            "a public key: nothing about the user"),
        Row("query.advertise", "config", "secagg", "mask_pk", "the device's long-term X25519 public key for masks",
            "a public key: nothing about the user"),
        Row("query.advertise", "config", "secagg", "sign_pk", "the device's Ed25519 public key for this protocol's "
            "signatures", _KEY),
        Row("query.advertise", "config", "secagg", "identity", "the device's identity public key (Ed25519, from "
            "`fedpersona certs` or the simulation's root)", _KEY),
        Row("query.advertise", "config", "secagg", "certificate", "the trust root's signature over that identity",
            "public: issued by the operator's trust root, the same for every run"),
        Row("query.advertise", "config", "secagg", "binding",
            "the identity's signature over (run id, node id, the three public keys)", _SIGNED),
        # ---- consistency check (between the two stages of every secure sum)
        Row("query.consistency", "config", "secagg", "client_id", "this node's id", _IDS),
        Row("query.consistency", "config", "secagg", "run_id", "the run's id", _IDS),
        Row("query.consistency", "config", "secagg", "round", "the round number", _IDS),
        Row("query.consistency", "config", "secagg", "signature",
            "the device's signature over (round digest, survivor set): one set per round", _SIGNED),
        # ---- unmask (second stage of every secure sum)
        Row("query.unmask", "config", "secagg", "client_id", "this node's id", _IDS),
        Row("query.unmask", "config", "secagg", "run_id", "the run's id", _IDS),
        Row("query.unmask", "config", "secagg", "round", "the round number", _IDS),
        Row("query.unmask", "array", "secagg-arrays", "b_owners", "whose self-mask shares follow (survivors' ids)", _IDS),
        Row("query.unmask", "array", "secagg-arrays", "pair_owners", "whose pair-seed shares follow (ids)", _IDS),
        Row("query.unmask", "array", "secagg-arrays", "pair_peers", "the dropped neighbours of those pairs (ids)", _IDS),
        Row("query.unmask", "config", "secagg", "b_shares", "this device's shares of the survivors' self-mask seeds",
            "SecAgg+: they remove exactly the masks that hide the sum; given at most once per round, only for the "
            "round of the device's latest masked input and for at least its policy.min-contributors survivors"),
        Row("query.unmask", "array", "secagg-arrays", "undecryptable",
            "the senders whose shares addressed to this device did not open (ids)", _IDS),
        Row("query.unmask", "config", "secagg", "pair_shares",
            "this device's shares of the dropped neighbours' pair seeds (never a survivor-survivor seed)",
            "as b_shares: they let the server cancel the masks of devices that dropped before masking"),
    ]
    # ---- final evaluation, under secure aggregation (the default)
    + _secagg_stage1("evaluate")
    + [Row("evaluate", "masked-vector", "figures", name, what, _EVAL_DP + "; " + _SUM) for name, what in _EVAL_FIGURES]
    + [
        Row("evaluate", "array", "evaluation", "figures",
            "the evaluation vector (the figures above) with the device's whole noise (no sum to hide it in)",
            _EVAL_DP.replace("a sum of at least max(secagg.min-contributors, server.min-clients) devices carries",
                             "the device's vector carries") + "; the server sees this device's noised figures alone",
            _PLAIN),
        # ---- one step of a noisy sum, and the head after the round (privacy.noise-on = sum)
        *_secagg_stage1("train.dp_step", _SUM_STEP),
        Row("train.dp_step", "masked-vector", "update", "clipped gradient sum",
            "the sum of the step's clipped per-example gradients of the shared adapter, quantized, plus the "
            "device's discrete Gaussian share of the step's noise",
            "record-level DP on the sum: the noise of at least privacy.honest-contributors devices in every "
            "released sum (the ledger's sum steps, and the collusion table); " + _SUM, _SUM_STEP),
        Row("train.dp_step", "masked-extra", "extras", "trained", "1 for every device that sends a masked input",
            "a constant: its total is the number of survivors, which the server knows", _SUM_STEP),
        Row("train.dp_step", "config", "secagg", "declined",
            "1: the device takes no part in this step's sum (its budget or participation cap is reached)",
            "not noised: that this node declined is visible to the server, as its silence would be", _SUM_STEP),
        Row("train.personalize", "config", "status", "personalized",
            "1: the device trained its head on the round's final shared adapter (0: it took no step of the round); "
            "with `client.head-at = end`, after the last round: 1 when it trained its head on the run's final "
            "shared adapter (0: already done in this run, or not that round)",
            "whether the device took part in the round, which the server knows from the steps; at the end, only "
            "that the device answered (every node is asked)",
            HEAD_EXCHANGE),
        # ---- every reply: the store's freshness receipt
        Row("*", "config", "freshness", "receipt",
            "the device store's (store id, generation, chain digest), encrypted and authenticated under the "
            "device key with a fresh nonce (84 bytes)",
            "encryption: opaque to the server, which keeps it and sends it back so a restored older copy of the "
            "device's state is detected (docs/audit.md section 4)"),
        # ---- error replies, to any request
        Row("*", "error", "error", "code", "Flower's error code (2: the ClientApp raised)", "a constant"),
        Row("*", "error", "error", "reason",
            "the error class and a fixed text, or a policy refusal naming the setting, the server's value and "
            "the device's floor",
            "fixed text: never the exception's message (it can hold the user's data); the details stay in the "
            "device's own log"),
    ]
)


def lookup(message: str, part: str, record: str, name: str, table: Iterable[Row] = TABLE) -> Row | None:
    """The row that covers this field, or None."""
    return next((r for r in table if r.matches(message, part, record, name)), None)


def field_label(message: str, part: str, record: str, name: str, detail: str = "") -> str:
    """How a field is named in a failure: the reply, the part, the record and the field."""
    where = {"masked-vector": "inside the masked vector", "masked-extra": "masked extra",
             "error": "error reply"}.get(part, f"{part} field")
    return f"'{message}' reply: {where} {record}/{name}" + (f" ({detail})" if detail else "")


def unlisted(fields: Iterable[Mapping[str, str]], table: Iterable[Row] = TABLE) -> list[str]:
    """The labels of the fields (dicts with message, part, record, name, detail) no row covers, sorted, unique."""
    rows = tuple(table)
    out = {field_label(f["message"], f["part"], f["record"], f["name"], f.get("detail", ""))
           for f in fields if lookup(f["message"], f["part"], f["record"], f["name"], rows) is None}
    return sorted(out)


_PART_WORDS = {"config": "config", "array": "array", "metric": "metric", "masked-vector": "masked vector",
               "masked-extra": "masked extra", "error": "error"}


def render_markdown(table: Iterable[Row] = TABLE) -> str:
    """The table as Markdown (one line per row), for docs/audit.md and the report."""
    lines = ["| reply | field | what it is | covered by | when |", "|---|---|---|---|---|"]
    for r in table:
        field = f"{_PART_WORDS[r.part]} `{r.record}/{r.name}`"
        cells = [f"`{r.message}`", field, r.what, r.covered_by, r.when or "default"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
