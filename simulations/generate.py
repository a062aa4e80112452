"""Write a reply in one user's voice: base model + latest shared adapter + that user's personal head.

A run remembers itself: ``--run results/<name>`` reads the config the run saved in its
``metrics.json`` (``config``: every key, folders absolute), so nothing of ``--set data.*`` has to be
repeated; the user's own turns come from the data folder the simulation handed that user's device
(``<run.state-dir>/<run.name>/_simulated/``, listed in its manifest), without reading the source again.
Without ``--run`` the scenario (``--scenario``, default ``demo``) and ``--set`` are resolved as
``fedpersona run`` resolves them.

The model runs where ``model.device`` / ``model.dtype`` say (:func:`fedpersona.model.adapted_model`).
With ``adapter.head = "prompt"`` the user's soft prompt is prepended at the first adapted block on
every decoding step (:meth:`fedpersona.model.AdaptedModel.generate`: a full forward per new token,
without a KV cache).
"""

from __future__ import annotations

import difflib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from fedpersona.client.chat import REPETITION_PENALTY
from fedpersona.client.data import format_prompt, read_user_folder
from fedpersona.client.device import HEAD_FILE
from fedpersona.client.exemplars import exemplar_text, pick_exemplars
from fedpersona.client.node_data import manifest_path, read_manifest
from fedpersona.client.store import DeviceStore
from fedpersona.config import Config, load_config
from fedpersona.model import adapted_model
from fedpersona.server.checkpoint import latest_checkpoint
from fedpersona.simulations.partitions import simulated_state_dir
from fedpersona.simulations.sources import load_source

logger = logging.getLogger(__name__)


def run_folder(run: str) -> Path:
    """``--run``: a run's results folder (with ``metrics.json``), or a run name under ``results/``."""
    p = Path(run).expanduser()
    for candidate in (p, Path("results") / run):
        if (candidate / "metrics.json").is_file():
            return candidate
    raise ValueError(f"--run {run!r}: no metrics.json in {str(p)!r}" + ("" if p.parent != Path(".") else
                     f" nor in {str(Path('results') / run)!r}") + ": give the run's results folder, results/<run.name>")


def run_config(run: str | None, scenario: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """The config of a finished run: the one it saved (``run``), or the scenario resolved as ``fedpersona run`` does."""
    if run is None:
        from fedpersona.simulations.runner import resolve  # the runner (and Flower) only where a scenario is resolved

        return resolve(scenario, dict(overrides or {}))[1]
    folder = run_folder(run)
    saved = json.loads((folder / "metrics.json").read_text()).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{folder / 'metrics.json'} holds no config (written by a run of an older version?): "
                         "use --scenario and --set as that run had them")
    flat = dict(saved, **(overrides or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run's settings were warned about when it ran
        return load_config(flat, env=False)


def _manifest_users(cfg: Config) -> dict[str, Path] | None:
    """User id -> the data folder the simulation handed that user's device; None without a manifest."""
    try:
        nodes = read_manifest(manifest_path(cfg))["nodes"]
    except ValueError:
        return None
    return {str(e["user-id"]): Path(e["data-dir"]) for e in nodes.values()}


def run_users(cfg: Config) -> list[str]:
    users = _manifest_users(cfg)
    if users is not None:
        return sorted(users)
    return [u.user_id for u in load_source(cfg.data, cfg.run.seed)]


def find_user(user: str, cfg) -> str:
    users = run_users(cfg)
    for u in users:
        if u == user or u.lower() == user.lower():
            return u
    close = difflib.get_close_matches(user, users, n=1, cutoff=0.5) or \
        [u for u in users if user.lower() in u.lower()][:1]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(users[:8]) + (", ..." if len(users) > 8 else "")
    raise ValueError(f"Unknown user {user!r} in run '{cfg.run.name}' (data.source {cfg.data.source}).{hint} "
                     f"Its {len(users)} users: {shown}")


def user_pairs(cfg, user_id: str) -> list[tuple[str, str]]:
    """A simulated user's own (cue, reply) pairs, as the user's device holds them."""
    folders = _manifest_users(cfg)
    if folders is not None and user_id in folders and folders[user_id].is_dir():
        return read_user_folder(folders[user_id])
    return [(e.cue, e.reply) for e in next(u for u in load_source(cfg.data, cfg.run.seed) if u.user_id == user_id).examples]


def personalized_model(user: str, scenario: str | None, overrides: dict[str, Any] | None = None, *,
                       run: str | None = None):
    """(config, user id, model, store, checkpoint round) of a simulated user of a run: the run's newest
    shared adapter and that user's personal head, loaded."""
    cfg = run_config(run, scenario, overrides)
    user_id = find_user(user, cfg)
    run_dir = Path(cfg.run.results_dir) / cfg.run.name
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ValueError(f"No checkpoint in {run_dir / 'checkpoints'}: run `fedpersona run {scenario or ''}` first")
    model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
    model.load_shared_state(ckpt[1])
    store = DeviceStore(simulated_state_dir(cfg, user_id))
    head = store.load_tensors(HEAD_FILE)
    if head is None:
        raise ValueError(f"{user_id} has no personal head yet (never sampled in run '{cfg.run.name}')")
    model.load_personal_state(head)
    return cfg, user_id, model, store, ckpt[0]


def reply(model, prompt: str, *, max_new_tokens: int = 48, temperature: float = 0.7, seed: int = 0,
          exemplars: list[tuple[str, str]] = ()) -> str:
    """The model's reply to ``prompt`` (sampled with ``temperature``, greedy at 0), on the model's device;
    ``exemplars``: the user's own (cue, reply) pairs shown first as earlier turns (:mod:`fedpersona.client.exemplars`)."""
    tok = model.tokenizer
    text = exemplar_text(exemplars) + format_prompt(prompt)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(  # a prompt head: its prefix runs at the cache boundary (fedpersona.model)
            ids, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=0.9,
            repetition_penalty=REPETITION_PENALTY, eos_token_id=end, pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate_many(
    *,
    user: str,
    prompts: list[str],
    run: str | None = None,
    scenario: str | None = "demo",
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    seed: int = 0,
    exemplars: int = 0,
    base: bool = False,
) -> list[dict[str, str]]:
    """One reply per prompt from one load of the model: ``{"prompt", "personalized"}`` (and ``"base"``: the base
    model with every adapter off, the same exemplars and seed, with ``base``)."""
    cfg, user_id, model, _, ckpt_round = personalized_model(user, scenario, overrides, run=run)
    logger.info("%s: shared adapter of round %d of run '%s', personal head from its device", user_id, ckpt_round,
                cfg.run.name)
    pairs = user_pairs(cfg, user_id) if exemplars else []
    out = []
    for prompt in prompts:
        shown = pick_exemplars(pairs, prompt, exemplars, seed=seed) if exemplars else []
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, exemplars=shown)
        row = {"prompt": prompt, "personalized": reply(model, prompt, **kw)}
        if base:
            with model.adapters_disabled():
                row["base"] = reply(model, prompt, **kw)
        out.append(row)
    return out


def generate(
    *,
    user: str,
    prompt: str,
    scenario: str | None = "demo",
    overrides: dict[str, Any] | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    seed: int = 0,
    exemplars: int = 0,
    run: str | None = None,
) -> str:
    return generate_many(user=user, prompts=[prompt], run=run, scenario=scenario, overrides=overrides,
                         max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                         exemplars=exemplars)[0]["personalized"]
