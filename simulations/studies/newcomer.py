"""``fedpersona bench newcomer``: a user who joins after training, personalized by data, by prompt, or both.

A newcomer (a corpus user that the run never trained on) starts from the shared adapter (the run's
newest checkpoint; the initial adapter with ``--initial`` or ``--quick``) with a fresh personal head
(B = 0: the shared model itself). Its examples are split as a device splits them (held-out part
by ``data.eval-fraction``); with the first k = 0, 5, 20 and all of its training examples we measure
the held-out loss (nats per target token, mean over newcomers) of

* **head** — data-based personalization: the fresh head trained on the k examples (plain Adam, the
  head never leaves the device; the shared adapter frozen);
* **profile** — prompt-based personalization: no training; the profile computed from the k
  examples (:mod:`fedpersona.client.profile`) put before each held-out prompt as a system turn;
* **head + profile** — the head trained on the k examples with the profile in their prompts.

**Reptile-style shared update.** With server learning rate 1, FedAvg's shared update already *is*
batched Reptile's: the movement of the shared adapter after k local steps, averaged. What can
differ is what the inner loop starts from. In the shipped loop each device continues its own,
persisted head, so the shared adapter learns to complement trained heads; a newcomer meets it with
a fresh head. The Reptile-style variant starts every inner loop from a fresh head (and discards it
after), so the shared adapter is meta-trained for exactly the newcomer's situation: a fresh head
after a few local steps. Both variants are trained here from the same initial adapter on the same
training users, rounds, steps, batches and seeds (without DP, which would affect both alike), and
compared on the newcomers with the head trained on k examples.

``--quick`` builds a tiny random-weight Llama and tokenizer in a temporary folder: it checks the
machinery in well under a minute; its figures say nothing about the methods.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpersona.client.data import encode_examples, split_examples
from fedpersona.client.profile import compute_profile, system_prefix
from fedpersona.client.train import CachedExample, evaluate
from fedpersona.config import Config, load_config
from fedpersona.model import AdaptedModel, adapted_model, labels_for, lower_hidden

logger = logging.getLogger(__name__)

KS = (0, 5, 20, None)  # None: all of the newcomer's training examples


@dataclass(frozen=True)
class BenchSettings:
    newcomers: int = 4
    head_steps: int = 30
    head_batch: int = 8
    head_lr: float = 3e-3
    fed_rounds: int = 4
    fed_users: int = 4
    fed_steps: int = 6
    fed_lr: float = 3e-3
    seed: int = 0


# ------------------------------------------------------------------------------- data
def _encode(model: AdaptedModel, cfg: Config, pairs, profile_text: str = "") -> list[CachedExample]:
    """Examples as the device encodes them, the profile (if any) put before each prompt (never a target)."""
    enc = encode_examples(model.tokenizer, pairs, seq_len=cfg.model.seq_len, cue_tokens=cfg.model.cue_tokens)
    prefix = list(model.tokenizer(system_prefix(profile_text), add_special_tokens=False)["input_ids"]) if profile_text else []
    seqs = [prefix + e.input_ids for e in enc]
    masks = [[False] * len(prefix) + e.target_mask for e in enc]
    hiddens = lower_hidden(model, seqs)
    return [CachedExample(h, tuple(labels_for(s, m))) for h, s, m in zip(hiddens, seqs, masks)]


@dataclass
class Newcomer:
    user_id: str
    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]


def pick_newcomers(cfg: Config, count: int) -> list[Newcomer]:
    """Users of the corpus outside the run's training users, with the most speeches first."""
    from fedpersona.simulations.corpus import all_users, load_users

    trained = {u.user_id for u in load_users(min_speeches=cfg.data.min_speeches, max_users=cfg.data.max_users,
                                             seed=cfg.run.seed)}
    out = []
    for u in all_users():  # sorted by (-speeches, id)
        if u.user_id in trained or u.num_speeches < 40:
            continue
        pairs = [(e.cue, e.reply) for e in u.examples][: max(cfg.data.max_examples, 40)]
        train, held = split_examples(pairs, eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed, key=u.user_id)
        out.append(Newcomer(u.user_id, train, held))
        if len(out) == count:
            break
    if not out:
        raise ValueError("no corpus user outside the run's training users has 40 speeches or more")
    return out


# --------------------------------------------------------------------------- training
@contextlib.contextmanager
def _only(model: AdaptedModel, names: list[str]):
    """Only these adapter tensors get gradients; the rest are frozen for the duration."""
    params = model.named_trainable()
    trainable = model.shared_names + model.personal_names
    before = {n: params[n].requires_grad for n in trainable}
    trainer = getattr(model, "_dp_trainer", None)
    if trainer is not None:
        trainer.gsm.disable_hooks()  # plain training: no per-sample gradients
    try:
        for n in trainable:
            params[n].requires_grad_(n in names)
        yield [params[n] for n in names]
    finally:
        for n, flag in before.items():
            params[n].requires_grad_(flag)


def fit(model: AdaptedModel, examples: list[CachedExample], names: list[str], *, steps: int, batch: int, lr: float,
        seed: int) -> None:
    """Plain Adam on the named tensors, uniformly sampled minibatches (no DP: nothing of it leaves the device)."""
    from fedpersona.model import collate

    if not examples or steps < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    with _only(model, names) as params:
        opt = torch.optim.Adam(params, lr=lr)
        model.stack.train()
        for _ in range(steps):
            idx = torch.randint(len(examples), (min(batch, len(examples)),), generator=gen).tolist()
            hidden, labels = collate([examples[i].hidden for i in idx], [examples[i].labels for i in idx])
            opt.zero_grad(set_to_none=True)
            model.stack(hidden, labels).mean().backward()
            opt.step()
        model.stack.eval()


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def newcomer_losses(model: AdaptedModel, cfg: Config, shared: dict, user: Newcomer, s: BenchSettings,
                    methods=("head", "profile", "head+profile")) -> dict[tuple[str, str], float]:
    """Held-out loss of one newcomer per (method, k label)."""
    out: dict[tuple[str, str], float] = {}
    fresh = model.fresh_personal_state()
    model.load_shared_state(shared)
    model.load_personal_state(fresh)
    plain_held = _encode(model, cfg, user.held_out)
    base = evaluate(model, plain_held)["loss"]
    for k in KS:
        label = "all" if k is None else str(k)
        pairs = user.train if k is None else user.train[:k]
        for method in methods:
            profile = compute_profile(pairs, tokenizer=model.tokenizer).text() if "profile" in method else ""
            model.load_personal_state(fresh)
            held = _encode(model, cfg, user.held_out, profile) if profile else plain_held
            if "head" in method and pairs:
                fit(model, _encode(model, cfg, pairs, profile), model.personal_names, steps=s.head_steps,
                    batch=s.head_batch, lr=s.head_lr, seed=_seed(s.seed, user.user_id, k, method))
            out[(method, label)] = evaluate(model, held)["loss"] if (pairs or method == "head") else base
    out[("shared only", "-")] = base
    model.load_personal_state(fresh)
    return out


def mini_federation(model: AdaptedModel, cfg: Config, *, fresh_head_each_round: bool, s: BenchSettings) -> dict:
    """FedAvg (server lr 1) of the shared update over the run's training users, without DP.

    ``fresh_head_each_round``: the Reptile-style inner loop (fresh head every round, discarded after);
    otherwise the shipped one (each user's head persists across rounds). Same users, batches and seeds.
    """
    from fedpersona.simulations.corpus import load_users

    users = load_users(min_speeches=cfg.data.min_speeches, max_users=cfg.data.max_users, seed=cfg.run.seed)[: s.fed_users]
    data = {}
    for u in users:
        pairs = [(e.cue, e.reply) for e in u.examples][: cfg.data.max_examples]
        train, _ = split_examples(pairs, eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed, key=u.user_id)
        data[u.user_id] = _encode(model, cfg, train)
    shared = model.initial_shared_state()
    heads = {u.user_id: model.fresh_personal_state() for u in users}
    names = model.shared_names + model.personal_names
    for r in range(s.fed_rounds):
        total = {n: torch.zeros_like(t) for n, t in shared.items()}
        for u in users:
            model.load_shared_state(shared)
            model.load_personal_state(model.fresh_personal_state() if fresh_head_each_round else heads[u.user_id])
            fit(model, data[u.user_id], names, steps=s.fed_steps, batch=cfg.client.batch_size, lr=s.fed_lr,
                seed=_seed(s.seed, "fed", r, u.user_id))
            after = model.shared_state()
            for n in total:
                total[n] += after[n] - shared[n]
            if not fresh_head_each_round:
                heads[u.user_id] = model.personal_state()
        shared = {n: shared[n] + total[n] / len(users) for n in shared}
    return shared


# ------------------------------------------------------------------------------ bench
def _tiny_model(folder: Path) -> Path:
    """A tiny random-weight Llama with a byte-level BPE tokenizer trained on corpus speeches."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedpersona.simulations.corpus import all_users

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [e.reply for u in all_users()[:60] for e in u.examples[:40]] + ["user assistant system"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=fast.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


QUICK = {"model.seq-len": 48, "model.cue-tokens": 12, "adapter.layers": 2, "adapter.personal-layers": 1,
         "adapter.rank": 4, "data.max-users": 8, "data.max-examples": 40, "client.batch-size": 8}


def run_bench(*, quick: bool = False, initial: bool = False, scenario: str | None = "demo",
              overrides: dict | None = None, settings: BenchSettings | None = None) -> dict:
    """Both tables' figures (mean held-out loss over newcomers); see the module docstring."""
    s = settings or (BenchSettings(newcomers=3, head_steps=12, fed_rounds=2, fed_users=4, fed_steps=4) if quick
                     else BenchSettings())
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if quick:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedpersona-newcomer-")))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = load_config({**QUICK, **(overrides or {}), "model.path": str(_tiny_model(folder / "model"))}, env=False)
            source = "initial adapter (tiny random-weight model)"
            shared = None
        else:
            from fedpersona.simulations.runner import resolve

            _, cfg = resolve(scenario, dict(overrides or {}))
            shared = None
            source = "initial adapter"
            if not initial:
                from fedpersona.server.checkpoint import latest_checkpoint

                run_dir = Path(cfg.run.results_dir) / cfg.run.name
                ckpt = latest_checkpoint(run_dir / "checkpoints")
                if ckpt is None:
                    raise ValueError(f"No checkpoint in {run_dir / 'checkpoints'}: run `fedpersona run {scenario}` "
                                     f"first, or pass --initial (the initial adapter) or --quick")
                shared, source = ckpt[1], f"checkpoint round {ckpt[0]} of run '{cfg.run.name}'"
        model = adapted_model(cfg.model.path, cfg.adapter, cfg.run.seed, device=cfg.model.device, dtype=cfg.model.dtype)
        if shared is None:
            shared = model.initial_shared_state()
        users = pick_newcomers(cfg, s.newcomers)
        per_user = [newcomer_losses(model, cfg, shared, u, s) for u in users]
        variants = {"shipped (head persists)": mini_federation(model, cfg, fresh_head_each_round=False, s=s),
                    "Reptile-style (fresh head)": mini_federation(model, cfg, fresh_head_each_round=True, s=s)}
        per_variant = {name: [newcomer_losses(model, cfg, sv, u, s, methods=("head",)) for u in users]
                       for name, sv in variants.items()}
        model.load_shared_state(model.initial_shared_state())
        model.load_personal_state(model.fresh_personal_state())

    def mean(rows, key):
        return statistics.fmean(r[key] for r in rows)

    ks = ["0", "5", "20", "all"]
    table = {m: {k: mean(per_user, (m, k)) for k in ks} for m in ("head", "profile", "head+profile")}
    better = {m: {k: sum(r[(m, k)] < r[("shared only", "-")] for r in per_user) for k in ks} for m in table}
    reptile = {name: {k: mean(rows, ("head", k)) for k in ks} for name, rows in per_variant.items()}
    return {"source": source, "model": cfg.model.path, "newcomers": [u.user_id for u in users],
            "train_examples": [len(u.train) for u in users], "held_out": [len(u.held_out) for u in users],
            "shared_only": mean(per_user, ("shared only", "-")), "table": table, "better": better,
            "reptile": reptile, "settings": s, "quick": quick, "seconds": time.perf_counter() - t0}


def format_tables(r: dict) -> str:
    ks = ["0", "5", "20", "all"]
    n = len(r["newcomers"])
    lines = [
        f"Newcomers: {n} users never trained on ({', '.join(r['newcomers'])}); "
        f"{min(r['train_examples'])}-{max(r['train_examples'])} training / {min(r['held_out'])}-{max(r['held_out'])} "
        f"held-out examples each.",
        f"Shared adapter: {r['source']}. Mean held-out loss (nats/token); [users better than the shared model alone].",
        "",
        f"| examples k | {' | '.join(ks)} |",
        f"|---|{'---|' * len(ks)}",
    ]
    for m, row in r["table"].items():
        cells = [f"{row[k]:.3f} [{r['better'][m][k]}/{n}]" for k in ks]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    lines.append(f"| shared model alone | {r['shared_only']:.3f} | | | |")
    s = r["settings"]
    lines += [
        "",
        f"Reptile-style vs shipped inner loop: shared adapters trained from the initial adapter by FedAvg (server lr 1, "
        f"no DP) over {s.fed_users} training users, {s.fed_rounds} rounds of {s.fed_steps} local steps; then each "
        f"newcomer's fresh head trained on k examples ({s.head_steps} Adam steps of {s.head_batch}, lr {s.head_lr:g}).",
        "",
        f"| shared adapter, head after k | {' | '.join(ks)} |",
        f"|---|{'---|' * len(ks)}",
    ]
    rows = {r["source"]: r["table"]["head"], **r["reptile"]}
    for name, row in rows.items():
        cells = " | ".join(f"{row[k]:.3f}" for k in ks)
        lines.append(f"| {name} | {cells} |")
    lines.append("")
    note = "; tiny random-weight model: checks the machinery, not the methods" if r["quick"] else ""
    lines.append(f"({r['seconds']:.0f} s{note})")
    return "\n".join(lines)


def main(*, quick: bool = False, initial: bool = False, scenario: str | None = "demo", overrides: dict | None = None) -> int:
    r = run_bench(quick=quick, initial=initial, scenario=scenario, overrides=overrides)
    if any(not math.isfinite(v) for row in r["table"].values() for v in row.values()):
        raise RuntimeError("a held-out loss is not finite")
    print(format_tables(r))
    return 0
