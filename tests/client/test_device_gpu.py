"""The sequential device path on CUDA with a bfloat16 base: placement, one DP round, a generated reply.

Needs torch with CUDA, transformers, peft, opacus, scipy and cryptography (no Flower):
``simulations/gpu_check.sh`` runs it.
"""

from __future__ import annotations

import pytest
import torch

from fedpersona.config import AdapterConfig
from fedpersona.model import adapted_model
from fedpersona.simulations.generate import reply
from tests.client.device_helpers import flat, placed_device, rel, seeded_round

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_picks_cuda(tiny_model_dir):
    cfg = AdapterConfig(rank=2, layers=2, personal_layers=1)
    m = adapted_model(str(tiny_model_dir), cfg, 0, device="auto", dtype="bfloat16")
    assert m.device.type == "cuda" and m.dtype == torch.bfloat16
    assert m is adapted_model(str(tiny_model_dir), cfg, 0, device="cuda:0", dtype="bfloat16")


def test_device_round_and_reply_on_cuda_bfloat16(tiny_config, tmp_path):
    ref = placed_device(tiny_config, tmp_path, device="cpu", dtype="float32", tag="cpu")
    dev = placed_device(tiny_config, tmp_path, device="cuda", dtype="bfloat16", tag="cuda")
    for name, p in dev.model.peft.named_parameters():
        want = torch.float32 if ".lora_" in name else torch.bfloat16
        assert p.is_cuda and p.dtype == want, (name, p.device, p.dtype)
    assert all(e.hidden.is_cuda and e.hidden.dtype == torch.bfloat16 for e in dev.data.train + dev.data.held_out)
    where = {n: p.data_ptr() for n, p in dev.model.peft.named_parameters()}

    head0 = ref.model.fresh_personal_state()
    up_ref, head_ref, ledger_ref = seeded_round(ref, seed=1, head=head0)
    up, head, ledger = seeded_round(dev, seed=1, head=head0)  # the injected noise is drawn on the CPU: the same

    for state in (up, head):
        assert {(t.device.type, t.dtype) for t in state.values()} == {("cpu", torch.float32)}
        assert all(torch.isfinite(t).all() for t in state.values())
    assert ledger.history == ledger_ref.history
    assert {n: p.data_ptr() for n, p in dev.model.peft.named_parameters()} == where, "the model never moved"
    # bfloat16 rounding of the base's activations (on the CPU: ~0.7% and ~1%).
    assert rel(flat(up), flat(up_ref)) < 0.05
    assert rel(flat(head, head0), flat(head_ref, head0)) < 0.05

    # The same adapters in the float32 CPU model: the same next-token distribution, rounded.
    ref.model.load_shared_state(dev.model.shared_state())
    ref.model.load_personal_state(dev.model.personal_state())
    ids = dev.model.tokenizer("What news from Vienna?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp_gpu = torch.log_softmax(dev.model.peft(input_ids=ids.cuda()).logits[0, -1].float().cpu(), -1)
        lp_cpu = torch.log_softmax(ref.model.peft(input_ids=ids).logits[0, -1].float(), -1)
    assert rel(lp_gpu, lp_cpu) < 0.005
    text = reply(dev.model, "What news from Vienna?", max_new_tokens=6, temperature=0.7, seed=1)
    assert isinstance(text, str)
    assert text == reply(dev.model, "What news from Vienna?", max_new_tokens=6, temperature=0.7, seed=1)
