"""Clients side by side: packed examples on the device, adapter tensors stacked over clients.

* :class:`PackedExamples`: one client's cached examples as padded tensors on the
  model's device (built once; keep it across rounds): hidden ``[n, L, H]``, the
  positions of each example's target tokens ``[n, T]`` and their labels.
* :func:`gather_samples`: one step's ragged batches of several clients, packed
  flat ``[N, ...]`` with a client index (no padding samples; sequences padded
  only to the longest, on the right, which causal attention never sees).
* :class:`StackNames`: model parameter names (``base_model.model.model.layers...``)
  to the names the engine's functional call uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

IGNORE = -100


@dataclass
class PackedExamples:
    hidden: torch.Tensor  # [n, L, H], base dtype, on the device
    lengths: torch.Tensor  # [n] (CPU)
    target_pos: torch.Tensor  # [n, T] long: positions predicting a target (padded with 0)
    target_label: torch.Tensor  # [n, T] long (padded with 0)
    target_valid: torch.Tensor  # [n, T] float (1 for a real target)
    num_targets: torch.Tensor  # [n] (CPU)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @classmethod
    def pack(cls, examples: Sequence, *, device: torch.device, dtype: torch.dtype) -> PackedExamples:
        """Pack ``fedpersona.client.train.CachedExample`` s (hidden ``[len, H]`` + labels) onto ``device``."""
        if not examples:
            raise ValueError("A client needs at least one training example. You passed: 0 examples")
        n = len(examples)
        width = max(e.hidden.shape[0] for e in examples)
        dim = examples[0].hidden.shape[1]
        hidden = torch.zeros(n, width, dim, dtype=dtype, device=device)
        pos_rows, lab_rows = [], []
        for i, e in enumerate(examples):
            if e.hidden.shape[0] != len(e.labels):
                raise ValueError(f"Example {i}: hidden has {e.hidden.shape[0]} positions, labels {len(e.labels)}")
            hidden[i, : e.hidden.shape[0]] = e.hidden.to(device=device, dtype=dtype)
            lab = torch.tensor(e.labels, dtype=torch.long)
            pos = (lab != IGNORE).nonzero().flatten()
            pos_rows.append(pos)
            lab_rows.append(lab[pos])
        tmax = max(1, max(len(p) for p in pos_rows))
        tpos = torch.zeros(n, tmax, dtype=torch.long)
        tlab = torch.zeros(n, tmax, dtype=torch.long)
        tval = torch.zeros(n, tmax, dtype=torch.float32)
        for i, (p, lab) in enumerate(zip(pos_rows, lab_rows)):
            tpos[i, : len(p)] = p
            tlab[i, : len(p)] = lab
            tval[i, : len(p)] = 1.0
        return cls(
            hidden=hidden,
            lengths=torch.tensor([e.hidden.shape[0] for e in examples]),
            target_pos=tpos.to(device),
            target_label=tlab.to(device),
            target_valid=tval.to(device),
            num_targets=torch.tensor([len(p) for p in pos_rows]),
        )


@dataclass
class SampleBatch:
    """One step's samples of several clients, packed flat with a client index (no padding samples)."""

    hidden: torch.Tensor  # [N, L, H]
    target_pos: torch.Tensor  # [N, T]
    target_label: torch.Tensor  # [N, T]
    target_valid: torch.Tensor  # [N, T]
    client: torch.Tensor  # [N] long, on the device: the row of the sample's client


def gather_samples(packed: Sequence[PackedExamples], indices: Sequence[torch.Tensor], rows: Sequence[int]) -> SampleBatch:
    """Client ``rows[k]``'s examples ``indices[k]`` (non-empty), concatenated; padded to the longest only in length."""
    width = max(int(pk.lengths[idx].max()) for pk, idx in zip(packed, indices))
    tmax = max(max(1, int(pk.num_targets[idx].max())) for pk, idx in zip(packed, indices))
    hid, tpos, tlab, tval, client = [], [], [], [], []
    for pk, idx, row in zip(packed, indices, rows):
        rd = idx.to(pk.hidden.device)
        h = pk.hidden.index_select(0, rd)[:, :width]
        if h.shape[1] < width:
            h = nn.functional.pad(h, (0, 0, 0, width - h.shape[1]))
        hid.append(h)
        for src, out in ((pk.target_pos, tpos), (pk.target_label, tlab), (pk.target_valid, tval)):
            t = src.index_select(0, rd)[:, :tmax]
            if t.shape[1] < tmax:
                t = nn.functional.pad(t, (0, tmax - t.shape[1]))
            out.append(t)
        client.append(torch.full((len(idx),), row, dtype=torch.long))
    device = packed[0].hidden.device
    return SampleBatch(torch.cat(hid), torch.cat(tpos), torch.cat(tlab), torch.cat(tval), torch.cat(client).to(device))


class StackNames:
    """Model parameter names <-> the names of the same tensors inside the engine's functional module."""

    def __init__(self, peft_model: nn.Module, module: nn.Module) -> None:
        inner = {id(p): n for n, p in module.named_parameters()}
        self.to_inner: dict[str, str] = {}
        for name, p in peft_model.named_parameters():
            if id(p) in inner:
                self.to_inner[name] = inner[id(p)]

    def inner(self, name: str) -> str:
        try:
            return self.to_inner[name]
        except KeyError:
            raise ValueError(f"Tensor {name!r} is not part of the adapted top blocks") from None
