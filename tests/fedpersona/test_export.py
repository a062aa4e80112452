"""`fedpersona export`: the personalized model as one peft LoRA folder, loaded back with plain transformers + peft."""

import json
import stat

import pytest
import torch

from fedpersona.config import AdapterConfig
from fedpersona.export import EXPORT_INFO, export_lora
from fedpersona.model import AdaptedModel, load_base


def _model(tiny_model_dir, **adapter) -> AdaptedModel:
    base, tok = load_base.__wrapped__(str(tiny_model_dir))  # a base of its own: the process's cached one stays clean
    cfg = AdapterConfig(**{"layers": 3, "personal_layers": 1, "rank": 2, **{k.replace("-", "_"): v
                                                                            for k, v in adapter.items()}})
    model = AdaptedModel(base, tok, cfg, seed=3)
    gen = torch.Generator().manual_seed(7)
    # Trained-looking adapters: every shared and personal tensor away from its initialisation.
    model.load_shared_state({n: torch.randn(t.shape, generator=gen) * 0.3 for n, t in model.shared_state().items()})
    model.load_personal_state({n: torch.randn(t.shape, generator=gen) * 0.3 for n, t in model.personal_state().items()})
    return model


def _peft_logits(tiny_model_dir, folder, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(folder))
    loaded.eval()
    with torch.no_grad():
        return loaded(input_ids=ids).logits


@pytest.mark.parametrize("split", ["ffa", "fedper", "fedsa"])
def test_exported_adapters_load_with_peft_and_give_the_models_logits(tiny_model_dir, tmp_path, split):
    adapter = {"split": split}
    model = _model(tiny_model_dir, **adapter)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12]])
    with torch.no_grad():
        personalized = model.peft(input_ids=ids).logits
        with model.personal_zeroed():
            shared = model.peft(input_ids=ids).logits
        with model.adapters_disabled():
            plain = model.peft(input_ids=ids).logits
    out_p = export_lora(model, tmp_path / "personalized", base_model=tiny_model_dir, personal=True, info={"user": "u"})
    out_s = export_lora(model, tmp_path / "shared", base_model=tiny_model_dir, personal=False)
    got_p = _peft_logits(tiny_model_dir, out_p, ids)
    got_s = _peft_logits(tiny_model_dir, out_s, ids)
    torch.testing.assert_close(got_p, personalized, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_s, shared, rtol=1e-4, atol=1e-5)
    assert (personalized - shared).abs().max() > 1e-3, "the head changes the logits: the test can tell them apart"
    if split != "fedsa":  # fedsa's shared part is A alone: with B (personal) zeroed the shared model is the base
        assert (shared - plain).abs().max() > 1e-3
    cfg = json.loads((out_p / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and cfg["peft_type"] == "LORA"
    info = json.loads((out_p / EXPORT_INFO).read_text())
    assert info["parts"] == ["shared", "personal"] and info["user"] == "u"
    assert json.loads((out_s / EXPORT_INFO).read_text())["parts"] == ["shared"]
    # The personal head out of the encrypted store: for its owner only.
    assert stat.S_IMODE(out_p.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in out_p.iterdir())


def test_a_prompt_head_exports_the_shared_adapter_only(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir, head="prompt", **{"prompt-tokens": 2})
    with pytest.raises(ValueError, match="adapter.head.*shared-only"):
        export_lora(model, tmp_path / "p", base_model=tiny_model_dir, personal=True)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad(), model.personal_zeroed():
        shared = model.peft(input_ids=ids).logits
    out = export_lora(model, tmp_path / "s", base_model=tiny_model_dir, personal=False)
    torch.testing.assert_close(_peft_logits(tiny_model_dir, out, ids), shared, rtol=1e-4, atol=1e-5)
