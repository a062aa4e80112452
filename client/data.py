"""A user's own data on the device, and how a (cue, reply) pair becomes a training example.

Deployment format
-----------------
A device's data is one folder holding one or more ``*.jsonl`` files (UTF-8), read in sorted
file-name order. Each non-blank line is one JSON object::

    {"cue": "what was said to the user (may be empty)", "reply": "the user's own reply"}

* ``reply`` (required): a string, not empty once whitespace is stripped — the text the model
  learns to write like the user;
* ``cue`` (optional, default ``""``): a string — the context the reply answers;
* other keys are ignored; blank lines are skipped; a file with no record is an error.

Anything else (missing folder, no ``*.jsonl`` file, unreadable or non-UTF-8 file, a line that is not
a JSON object, a missing / non-string / blank reply, a non-string cue, text that breaks the rule
below) raises ``ValueError`` naming the file and, for a bad line, its line number. This data never
leaves the device.

Text rule
---------
Every text a device trains on (its data files, chat messages, ``/edit`` text and kept feedback) is
checked by :func:`check_text`: valid Unicode (no lone surrogate: a JSON ``"\ud800"`` escape, or
undecodable bytes that a terminal handed over as surrogates), and no control character but tab and
line breaks (NUL, ESC, DEL and the C1 controls are refused). A ``fedpersona chat`` line is read as
bytes and must be valid UTF-8 (refused with a message, never replaced: what is kept is exactly
what the user wrote) and at most :data:`MAX_TEXT_CHARS` characters.

Training format
---------------
ChatML, as SmolLM2-Instruct uses it, without a system prompt::

    <|im_start|>user\\n{cue}<|im_end|>\\n<|im_start|>assistant\\n   <- prompt (context, no loss)
    {reply}<|im_end|>                                                <- target

Convention for :class:`EncodedExample`: ``target_mask[i]`` is True when token ``i`` is a target,
i.e. the loss at position ``i`` is the model's prediction of ``input_ids[i]`` from the tokens before
it (``input_ids[:i]``). For a causal LM whose output at position ``t`` predicts token ``t + 1``, the
label at ``t`` is ``input_ids[t + 1]`` where ``target_mask[t + 1]`` (``fedpersona.model.labels_for``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
USER_HEADER = f"{IM_START}user\n"
ASSISTANT_HEADER = f"{IM_END}\n{IM_START}assistant\n"
MIN_SEQ_LEN = 16
MIN_REPLY_TOKENS = 4
#: The longest line ``fedpersona chat`` accepts (a message, or the text of ``/edit``), and the longest
#: cue or reply kept as feedback, in characters.
MAX_TEXT_CHARS = 4096
#: What :func:`check_text` refuses: lone surrogates and every control character (Unicode category Cc)
#: but tab, line feed and carriage return.
_REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class TextRefused(ValueError):
    """Text that breaks the text rule (:func:`check_text`); the message names the field, the character and
    where it is, never the text itself."""


def check_text(text: object, *, field: str, max_chars: int | None = None) -> str:
    """``text`` if it follows the text rule (module docstring), else :class:`TextRefused`."""
    if not isinstance(text, str):
        raise TextRefused(f"{field} must be a string. You passed: a {type(text).__name__}")
    if max_chars is not None and len(text) > max_chars:
        raise TextRefused(f"{field} is {len(text)} characters long; at most {max_chars} are accepted")
    bad = _REFUSED.search(text)
    if bad is not None:
        ch, at = bad.group(), bad.start()
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise TextRefused(f"{field} is not valid Unicode: a lone surrogate U+{ord(ch):04X} at character {at} "
                              f"(bytes that are not valid UTF-8). You passed: {ch!r}")
        raise TextRefused(f"{field} holds the control character U+{ord(ch):04X} at character {at}: NUL and control "
                          f"characters other than tab and line breaks are refused. You passed: {ch!r}")
    return text


# ------------------------------------------------------------------------------------------ reading
def read_user_folder(path: str | Path) -> list[tuple[str, str]]:
    """All ``(cue, reply)`` pairs of a device's data folder (format in the module docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"User data folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.glob("*.jsonl") if p.is_file())
    if not files:
        raise ValueError(f"User data folder {str(folder)!r} has no *.jsonl file")
    pairs: list[tuple[str, str]] = []
    for file in files:
        pairs.extend(_read_jsonl(file))
    logger.debug("Read %d examples from %d file(s) in %s", len(pairs), len(files), folder)
    return pairs


def _read_jsonl(file: Path) -> list[tuple[str, str]]:
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"{file}: cannot read the file ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not valid UTF-8 ({exc})") from exc
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}, line {lineno}"
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with a \"reply\", got {type(record).__name__}")
        reply = record.get("reply")
        if not isinstance(reply, str):
            raise ValueError(f"{where}: \"reply\" must be a string. You passed: {reply!r}")
        if not reply.strip():
            raise ValueError(f"{where}: \"reply\" is empty")
        cue = record.get("cue", "")
        if not isinstance(cue, str):
            raise ValueError(f"{where}: \"cue\" must be a string. You passed: {cue!r}")
        try:
            check_text(reply, field='"reply"')
            check_text(cue, field='"cue"')
        except TextRefused as exc:
            raise ValueError(f"{where}: {exc}") from None
        pairs.append((cue, reply))
    if not pairs:
        raise ValueError(f"{file}: the file has no record")
    return pairs


# ---------------------------------------------------------------------------------------- splitting
def split_examples(
    examples: Sequence[T], *, eval_fraction: float, seed: int, key: str
) -> tuple[list[T], list[T]]:
    """Split a user's examples into (train, held_out), the same way every time for (seed, key).

    ``held_out`` gets ``max(1, round(eval_fraction * n))`` examples (at most ``n - 1``); both parts
    keep the original order. ``key`` (the user id) is hashed with SHA-256, so the split does not
    depend on Python's per-process string hashing.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
            or math.isnan(eval_fraction) or not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1). You passed: {eval_fraction!r}")
    n = len(examples)
    if n < 2:
        raise ValueError(f"user {key!r} has only {n} examples: at least 2 are needed to hold one out")
    n_held = min(n - 1, max(1, round(eval_fraction * n)))
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    held = set(rng.sample(range(n), n_held))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    held_out = [ex for i, ex in enumerate(examples) if i in held]
    return train, held_out


# ----------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class EncodedExample:
    """Token ids and, per position, whether that token is a target (see the module docstring)."""

    input_ids: list[int]
    target_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError(
                f"input_ids and target_mask differ in length: {len(self.input_ids)} != {len(self.target_mask)}"
            )

    @property
    def num_targets(self) -> int:
        return sum(self.target_mask)


def format_prompt(cue: str) -> str:
    """The prompt part of an example: what the model sees before it writes the user's reply."""
    return f"{USER_HEADER}{cue}{ASSISTANT_HEADER}"


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without special tokens added. A fast tokenizer's Rust backend encodes the batch
    directly (the same ids as calling the tokenizer, without building its per-text dictionaries), without the
    character offsets where the backend can skip them (``encode_batch_fast``: 40% less time on a device build's
    texts)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_examples(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], *, seq_len: int, cue_tokens: int
) -> list[EncodedExample]:
    """Tokenize ``(cue, reply)`` pairs into ChatML examples of at most ``seq_len`` tokens.

    The pieces are tokenized apart (``add_special_tokens=False``) and concatenated:
    ``USER_HEADER + cue + ASSISTANT_HEADER`` (never targets), then ``reply + <|im_end|>`` (targets).

    Truncation:
    * the cue keeps only its last ``cue_tokens`` tokens (the words just before the reply);
    * the reply keeps its first tokens, as many as fit in ``seq_len``; a reply cut short gets no
      closing ``<|im_end|>`` (the model must not learn to stop mid-speech);
    * if the prompt would leave room for fewer than 4 reply tokens (counting the closing token;
      fewer if the whole reply is shorter), the cue is cut further from its start.
    Every example has at least one target.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len must be an integer >= {MIN_SEQ_LEN}. You passed: {seq_len!r}")
    if isinstance(cue_tokens, bool) or not isinstance(cue_tokens, int) or not 0 <= cue_tokens <= seq_len - 8:
        raise ValueError(f"cue_tokens must be an integer in [0, seq_len - 8 = {seq_len - 8}]. You passed: {cue_tokens!r}")
    if not pairs:
        return []
    header, assistant, end = _ids(tokenizer, [USER_HEADER, ASSISTANT_HEADER, IM_END])
    if len(end) != 1:
        raise ValueError(f"The tokenizer must know {IM_END!r} as one special token; it gives {len(end)} tokens")
    fixed = len(header) + len(assistant)
    if fixed + 1 >= seq_len:
        raise ValueError(f"seq_len={seq_len} leaves no room for a reply after the {fixed}-token prompt template")
    ids = _ids(tokenizer, [c for c, _ in pairs] + [r for _, r in pairs])  # one call: each text on its own
    cues, replies = ids[:len(pairs)], ids[len(pairs):]

    out = []
    for cue_ids, reply_ids in zip(cues, replies):
        cue_ids = cue_ids[max(0, len(cue_ids) - cue_tokens):] if cue_tokens else []
        wanted = min(MIN_REPLY_TOKENS, len(reply_ids) + 1)
        room_for_cue = seq_len - fixed - wanted
        if len(cue_ids) > room_for_cue:
            cue_ids = cue_ids[len(cue_ids) - room_for_cue:] if room_for_cue > 0 else []
        prompt = header + cue_ids + assistant
        room = seq_len - len(prompt)
        target = reply_ids + end if len(reply_ids) + 1 <= room else reply_ids[:room]
        out.append(EncodedExample(prompt + target, [False] * len(prompt) + [True] * len(target)))
    return out
