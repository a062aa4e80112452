"""A model's adapters as one plain peft LoRA folder: what ``fedpersona export`` writes.

The personalized model is the base model with two LoRA adapters (``shared`` and ``personal``,
:class:`fedpersona.model.AdaptedModel`); outside fedpersona one adapter is what tools load. Both are
LoRA on the same kind of linear layers, with the same scaling ``alpha / r``, so their sum is one LoRA
adapter: for a layer that carries both,

    scaling * (B_s A_s + B_p A_p) = scaling * [B_s  B_p] [A_s ; A_p]

a LoRA of rank ``r_s + r_p`` (``ffa``: both on the top personal blocks; ``fedper``: disjoint blocks;
``fedsa``: A from the shared adapter, B from the personal one). Every layer is written at the largest
rank R, zero-padded (zero rows of A and columns of B add nothing), with ``lora_alpha = alpha * R / r``
so that peft's scaling ``lora_alpha / R`` is the model's ``alpha / r``. The result loads with
``PeftModel.from_pretrained(base, folder)`` on the base model folder recorded in its
``adapter_config.json`` and computes the same logits as the model it was taken from
(``tests/fedpersona/test_export.py``).

A prompt head (``adapter.head = prompt``: a soft prompt at the cache boundary, inside the model) is
no LoRA: only the shared adapter can be exported then.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedpersona.model import PERSONAL, SHARED, AdaptedModel

logger = logging.getLogger(__name__)

__all__ = ["export_lora", "EXPORT_INFO"]

EXPORT_INFO = "fedpersona_export.json"
WEIGHTS = "adapter_model.safetensors"


def _lora_modules(model: AdaptedModel):
    """(module name, module) of every LoRA-wrapped linear layer of the model."""
    for name, module in model.peft.named_modules():
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and len(module.lora_A):
            yield name, module


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def _collect(model: AdaptedModel, parts: tuple[str, ...]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Per LoRA layer, the adapters' A stacked and B side by side (float32, CPU); the common scaling."""
    pieces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scaling = None
    for name, module in _lora_modules(model):
        As, Bs = [], []
        for part in parts:
            if part not in module.lora_A:
                continue
            s = float(module.scaling[part])
            if scaling is None:
                scaling = s
            elif abs(s - scaling) > 1e-9 * max(1.0, abs(scaling)):
                raise ValueError(f"LoRA scaling differs between adapters ({s} vs {scaling}): not one adapter")
            As.append(module.lora_A[part].weight.detach().to("cpu", torch.float32, copy=True))
            Bs.append(module.lora_B[part].weight.detach().to("cpu", torch.float32, copy=True))
        if As:  # fedper: the personal blocks carry no shared adapter
            pieces[name] = (torch.cat(As, dim=0), torch.cat(Bs, dim=1))
    if not pieces or scaling is None:
        raise ValueError("the model has no LoRA layer to export")
    return pieces, scaling


def export_lora(model: AdaptedModel, out: str | Path, *, base_model: str | Path, personal: bool,
                info: dict | None = None) -> Path:
    """Write ``model``'s shared adapter (``personal``: plus its personal head) as one peft LoRA folder.

    ``base_model``: the folder the adapter applies to (recorded as ``base_model_name_or_path``).
    ``info``: what else to record in ``fedpersona_export.json`` (run, round, user). The tokenizer is
    saved beside, so the folder alone gives text in and out. Returns the folder.
    """
    from peft import LoraConfig

    if personal and model.head != "lora":
        raise ValueError(f"Invalid config value for 'adapter.head': a {model.head!r} head is not a LoRA adapter and "
                         "cannot be exported as one; export the shared adapter alone (--shared-only). You passed: "
                         f"{model.head!r}")
    parts = (SHARED, PERSONAL) if personal else (SHARED,)
    if personal:
        pieces, scaling = _collect(model, parts)
    else:  # the personal tensors zeroed: with fedsa, B (personal) lives inside the shared adapter
        with model.personal_zeroed():
            pieces, scaling = _collect(model, parts)
    rank = max(a.shape[0] for a, _ in pieces.values())
    tensors = {}
    for name, (a, b) in pieces.items():
        pad = rank - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        tensors[f"{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{name}.lora_B.weight"] = b.contiguous()
    cfg = model.cfg
    config = LoraConfig(
        r=rank, lora_alpha=scaling * rank, lora_dropout=0.0, target_modules=list(cfg.targets),
        layers_to_transform=sorted({_layer_index(n) for n in pieces}), layers_pattern="layers", bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=str(base_model),
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if personal:
        os.chmod(folder, 0o700)  # the personal head, out of the device's encrypted store
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    model.tokenizer.save_pretrained(str(folder))
    record = {"parts": list(parts), "rank": rank, "scaling": scaling, "split": cfg.split, "base": str(base_model),
              **(info or {})}
    (folder / EXPORT_INFO).write_text(json.dumps(record, indent=1) + "\n")
    if personal:
        for p in folder.iterdir():
            if p.is_file():
                os.chmod(p, 0o600)
    logger.info("exported %s (rank %d, %d layers) to %s", " + ".join(parts), rank, len(pieces), folder)
    return folder
