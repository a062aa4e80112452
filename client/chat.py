"""``fedpersona chat``: the assistant in the terminal, with the user's feedback kept as local training data.

The model is the base model + the shared adapter + this device's personal head; on a device the
shared adapter is the one it last received in a round (saved in its store at train time), in a
simulation run the run's newest checkpoint. Each plain input line is a message to the user; the
assistant drafts the user's reply (in the user's voice), with the conversation so far as context:
the latest turns that fit in ``model.seq-len`` tokens (older turns are dropped whole; a message
longer than that keeps its last tokens). The user profile (:mod:`fedpersona.client.profile`) comes before it,
as a ChatML system turn of at most :data:`PROFILE_TOKENS` tokens. With ``exemplars = K`` the user's
own turns most like the message (:mod:`fedpersona.client.exemplars`: the device's data and kept feedback, at
most :data:`EXEMPLAR_TOKENS` tokens) come between the profile and the conversation.

Commands (a line that starts with ``/``)::

    /accept        the draft is what I would have said: keep it as a new example
    /edit TEXT     what I would have said is TEXT: keep (message, TEXT) as a new example
    /reject        the draft is wrong: keep it as a negative example (evaluation only)
    /profile       show the profile the assistant writes with
    /stats         loss of the model on the kept examples and on the rejected drafts
    /help          this list
    /quit          leave (end of input does the same)

A draft left without a command stays in the context and is not kept. Accepted and edited replies
join the training set at the device's next round (:mod:`fedpersona.client.feedback`). Input is read line by
line, so a session can be scripted: ``printf 'Good morrow\\n/accept\\n/quit\\n' | fedpersona chat ...``.

Input rule (:func:`chat_line`): a line is read as bytes and must be valid UTF-8, hold no NUL or
control character (tab aside), and be at most :data:`fedpersona.client.data.MAX_TEXT_CHARS` characters; any
other line, a message or a command with its text, is refused with a message saying why, and
nothing of it is drafted or kept (a pending draft stays pending). Drafts are shown and kept without
control characters (a model can emit an escape sequence; the terminal never receives it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

import torch

from fedpersona.client.data import ASSISTANT_HEADER, IM_END, MAX_TEXT_CHARS, USER_HEADER, TextRefused, check_text
from fedpersona.client.device import HEAD_FILE, RECEIVED_CONFIG, RECEIVED_SHARED, cache_examples
from fedpersona.client.exemplars import check_count, exemplar_text, pick_exemplars
from fedpersona.client.feedback import load_feedback, pairs_of, record_feedback, usable
from fedpersona.client.profile import compute_profile, load_profile, save_profile, system_prefix
from fedpersona.client.store import DeviceStore
from fedpersona.client.train import evaluate
from fedpersona.config import load_config
from fedpersona.model import adapted_model

logger = logging.getLogger(__name__)


def feedback_losses(model, cfg, store: DeviceStore) -> dict[str, float]:
    """Held-out-style loss (nats/token) of the model as it stands on the positive and on the rejected examples."""
    examples = usable(load_feedback(store))
    out: dict[str, float] = {}
    for label, chosen in (("positive", [e for e in examples if e.positive]),
                          ("rejected", [e for e in examples if not e.positive])):
        out[f"{label}-examples"] = float(len(chosen))
        out[f"{label}-loss"] = (evaluate(model, cache_examples(model, cfg, [(e.cue, e.reply) for e in chosen]))["loss"]
                                if chosen else math.nan)
    return out

PROFILE_TOKENS = 64
EXEMPLAR_TOKENS = 192
#: A small model loops ("I will. I will. ...") without it.
REPETITION_PENALTY = 1.2
HELP = """commands: /accept  /edit TEXT  /reject  /profile  /stats  /help  /quit   (other lines: a message to answer)"""
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def chat_line(raw: bytes | str) -> str:
    """One input line as text (line ending and surrounding spaces stripped), or :class:`TextRefused` saying why.

    Bytes must be valid UTF-8 (refused, never replaced); text, from a stream that decoded it already,
    must hold no lone surrogate (what such a stream makes of bytes that are not UTF-8).
    """
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > 4 * MAX_TEXT_CHARS + 2:  # more bytes than any accepted line can take
            raise TextRefused(f"the line is {len(raw)} bytes long; at most {MAX_TEXT_CHARS} characters are accepted")
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextRefused(f"the line is not valid UTF-8 (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})"
                              ) from None
    text = raw.rstrip("\r\n").strip()
    return check_text(text, field="the line", max_chars=MAX_TEXT_CHARS)


def _input_lines(lines: Iterable[str] | Iterable[bytes] | TextIO) -> Iterable[str | bytes]:
    """The raw lines of ``lines``; of a text stream over bytes (``sys.stdin``), its bytes, decoded by :func:`chat_line`."""
    buffer = getattr(lines, "buffer", None)
    return buffer if buffer is not None else lines


def printable(text: str) -> str:
    """``text`` without control characters (line breaks become spaces): what a draft shows and keeps."""
    return _CONTROLS.sub("", text.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))


@dataclass
class SessionCounts:
    drafts: int = 0
    accepted: int = 0
    edited: int = 0
    rejected: int = 0
    turns: list[tuple[str, str]] = field(default_factory=list)


def device_profile(store, *, pairs: list[tuple[str, str]] | None, tokenizer) -> str:
    """The profile to write with: recomputed from ``pairs`` + kept feedback when the data is at hand, else the stored one."""
    kept = pairs_of(usable([e for e in load_feedback(store) if e.positive]))
    if pairs is not None:
        text = compute_profile(list(pairs) + kept, tokenizer=tokenizer).text()
        save_profile(store, text)
        return text
    stored = load_profile(store)
    if stored is not None:
        return stored
    return compute_profile(kept, tokenizer=tokenizer).text()


class ChatSession:
    """One conversation with the personalized model (already loaded with the shared adapter and the head)."""

    def __init__(self, model, cfg, store, *, profile: str = "", max_new_tokens: int = 48, temperature: float = 0.7,
                 seed: int = 0, pairs: Iterable[tuple[str, str]] | None = None, exemplars: int = 0,
                 compare_base: bool = False) -> None:
        """``compare_base``: after each draft, also the base model's (every adapter off, the same context), shown
        for comparison only: feedback always applies to the personalized draft."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1. You passed: {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0. You passed: {temperature!r}")
        self.model, self.cfg, self.store = model, cfg, store
        self.profile = profile
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.generator_seed = seed
        self.pairs, self.exemplars = list(pairs or ()), check_count(exemplars)
        self.compare_base = compare_base
        self.device = model.device  # placed where model.device / model.dtype say (fedpersona.model.adapted_model)
        tok = model.tokenizer
        self._end = tok.convert_tokens_to_ids(IM_END)
        # A draft is one reply: it never opens another turn or ends the text before it starts.
        self._suppress = sorted(set(tok.all_special_ids) - {self._end})
        prefix = self._ids(system_prefix(profile))
        if len(prefix) > PROFILE_TOKENS:  # keep the closing of the system turn
            prefix = prefix[: PROFILE_TOKENS - 2] + self._ids(f"{IM_END}\n")
        self._prefix = prefix
        torch.manual_seed(seed)

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def context_ids(self, turns: list[tuple[str, str]], message: str) -> list[int]:
        """Profile prefix + the latest turns and the message that fit in ``model.seq-len`` tokens."""
        budget = self.cfg.model.seq_len
        head, tail = self._ids(USER_HEADER), self._ids(ASSISTANT_HEADER)
        msg = self._ids(message)
        room = budget - len(head) - len(tail)
        if len(msg) > room:
            msg = msg[len(msg) - room:] if room > 0 else []
        current = head + msg + tail
        context: list[int] = []
        used = len(current)
        for cue, reply in reversed(turns):
            turn = self._ids(f"{USER_HEADER}{cue}{ASSISTANT_HEADER}{reply}{IM_END}\n")
            if used + len(turn) > budget:
                break
            context = turn + context
            used += len(turn)
        return self._prefix + self.exemplar_ids(message) + context + current

    def exemplar_ids(self, message: str) -> list[int]:
        """The user's own turns most like ``message`` (its data and kept feedback), at most EXEMPLAR_TOKENS."""
        if not self.exemplars:
            return []
        kept = pairs_of(usable([e for e in load_feedback(self.store) if e.positive]))
        ids: list[int] = []
        for pair in pick_exemplars(self.pairs + kept, message, self.exemplars, seed=self.generator_seed):
            turn = self._ids(exemplar_text([pair]))
            if len(ids) + len(turn) <= EXEMPLAR_TOKENS:  # a turn that does not fit is left out
                ids += turn
        return ids

    @torch.no_grad()
    def draft(self, turns: list[tuple[str, str]], message: str, *, base: bool = False) -> str:
        """The reply drafted for ``message``; ``base``: by the base model (every adapter off, the same context)."""
        if base:  # on a forked generator: the personalized drafts are the same with or without the comparison
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), self.model.adapters_disabled():
                return self.draft(turns, message)
        ids = torch.tensor([self.context_ids(turns, message)], dtype=torch.long, device=self.device)
        tok = self.model.tokenizer
        sample = self.temperature > 0
        out = self.model.generate(  # a prompt head: its prefix runs at the cache boundary (fedpersona.model)
            ids, max_new_tokens=self.max_new_tokens,
            min_new_tokens=1, suppress_tokens=self._suppress or None, repetition_penalty=REPETITION_PENALTY,
            do_sample=sample, temperature=self.temperature if sample else None, top_p=0.9 if sample else None,
            eos_token_id=self._end, pad_token_id=tok.pad_token_id,
        )
        return printable(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()

    def run(self, lines: Iterable[str] | Iterable[bytes] | TextIO, out: TextIO = sys.stdout, *,
            prompt: str = "") -> SessionCounts:
        """Read messages and commands line by line (a text stream is read as bytes: :func:`chat_line`); print
        drafts and what was kept."""
        counts = SessionCounts()
        pending: tuple[str, str] | None = None

        def say(text: str) -> None:
            print(text, file=out, flush=True)

        if prompt:
            out.write(prompt)
            out.flush()
        for raw in _input_lines(lines):
            try:
                line = chat_line(raw)
            except TextRefused as exc:
                say(f"input refused: {exc}; nothing of this line is kept"
                    + ("" if pending is None else " (the draft still waits for /accept, /edit or /reject)"))
                line = ""
            if not line:
                pass
            elif not line.startswith("/"):
                if pending is not None:
                    counts.turns.append(pending)  # no feedback: stays in the context, is not kept
                pending = (line, self.draft(counts.turns, line))
                counts.drafts += 1
                say(f"assistant: {pending[1] or '(empty draft)'}")
                if self.compare_base:
                    say(f"base model: {self.draft(counts.turns, line, base=True) or '(empty draft)'}")
            else:
                command, _, arg = line.partition(" ")
                arg = arg.strip()
                if command == "/quit":
                    break
                if command == "/help":
                    say(HELP)
                elif command == "/profile":
                    say(f"profile: {self.profile or '(none yet: no examples)'}")
                elif command == "/stats":
                    s = feedback_losses(self.model, self.cfg, self.store)
                    say(f"kept examples: {int(s['positive-examples'])} (loss {s['positive-loss']:.3f}); "
                        f"rejected drafts: {int(s['rejected-examples'])} (loss {s['rejected-loss']:.3f})")
                elif command in ("/accept", "/edit", "/reject"):
                    if pending is None:
                        say(f"{command}: there is no draft to give feedback on")
                    elif command == "/accept" and not pending[1]:
                        say("/accept: the draft is empty; use /edit TEXT or /reject")
                    elif command == "/edit" and not arg:
                        say("/edit needs the text you would have said: /edit TEXT")
                    else:
                        cue, draft = pending
                        if command == "/reject":
                            draft = draft[:MAX_TEXT_CHARS]  # a negative example: its start is enough
                        if command == "/accept" and len(draft) > MAX_TEXT_CHARS:  # --max-new-tokens in the thousands
                            say(f"/accept refused: the draft is {len(draft)} characters long, at most {MAX_TEXT_CHARS} "
                                f"are kept; use /edit TEXT or /reject")
                        elif command == "/accept":
                            record_feedback(self.store, cue=cue, reply=draft, origin="accepted")
                            counts.accepted += 1
                            counts.turns.append((cue, draft))
                            say("[accepted: kept as a new example for the next round]")
                        elif command == "/edit":
                            record_feedback(self.store, cue=cue, reply=arg, origin="edited", proposed=draft)
                            counts.edited += 1
                            counts.turns.append((cue, arg))
                            say("[edited: your text is kept as a new example for the next round]")
                        else:
                            record_feedback(self.store, cue=cue, reply=draft or "(empty)", origin="rejected")
                            counts.rejected += 1
                            say("[rejected: kept as a negative example, never trained on]")
                        if not command == "/accept" or len(draft) <= MAX_TEXT_CHARS:
                            pending = None
                else:
                    say(f"unknown command {command!r}; {HELP}")
            if prompt:
                out.write(prompt)
                out.flush()
        say(f"session: {counts.drafts} draft(s), {counts.accepted} accepted, {counts.edited} edited, "
            f"{counts.rejected} rejected; kept examples join the training set at the next round")
        return counts


def load_device_model(store, overrides: dict | None = None):
    """(config, model) of a device from what its last round left in its store (shared adapter, config, head)."""
    text = store.load_text(RECEIVED_CONFIG)
    shared = store.load_tensors(RECEIVED_SHARED)
    if text is None or shared is None:
        raise ValueError(f"state folder {str(store.state_dir)!r} holds no shared adapter yet: the device has not "
                         f"taken part in a round (or its state predates `fedpersona chat`)")
    flat = json.loads(text)
    flat.update(overrides or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run's settings were warned about when it trained
        cfg = load_config(flat, env=False)
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    model.load_shared_state(shared)
    head = store.load_tensors(HEAD_FILE)
    if head is None:
        logger.warning("no personal head in %s: chatting with the shared adapter and a fresh head", store.state_dir)
        head = model.fresh_personal_state()
    model.load_personal_state(head)
    return cfg, model
