import pytest
import torch
import torch.nn.functional as F

from fedpersona.config import AdapterConfig
from fedpersona.model import AdaptedModel, collate, labels_for, load_base, lower_hidden, resolve_model_dir


def _model(tiny_model_dir, split="ffa", layers=2, personal=1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AdaptedModel(base, tok, AdapterConfig(split=split, rank=2, layers=layers, personal_layers=personal,
                                                 targets=("q_proj", "v_proj")), seed=0)


@pytest.mark.parametrize("split", ["ffa", "fedsa", "fedper"])
def test_shared_and_personal_never_overlap(tiny_model_dir, split):
    m = _model(tiny_model_dir, split)
    shared, personal = m.shared_state(), m.personal_state()
    assert shared and personal
    assert not set(shared) & set(personal)
    trainable = {n for n, p in m.peft.named_parameters() if p.requires_grad}
    assert trainable == set(shared) | set(personal)
    if split == "ffa":
        assert all(".lora_B.shared." in n for n in shared)
        assert m.frozen_lora_names and all(".lora_A.shared." in n for n in m.frozen_lora_names)
    if split == "fedsa":
        assert all(".lora_A." in n for n in shared) and all(".lora_B." in n for n in personal)
    if split == "fedper":
        top = str(m.layout.num_layers - 1)
        assert all(f"layers.{top}." not in n for n in shared)
        assert all(f"layers.{top}." in n for n in personal)


def test_shared_init_is_derived_from_the_seed(tiny_model_dir):
    a, b = _model(tiny_model_dir), _model(tiny_model_dir)
    for n, t in a.initial_shared_state().items():
        torch.testing.assert_close(t, b.initial_shared_state()[n])
    frozen_a = {n: p for n, p in a.peft.named_parameters() if n in a.frozen_lora_names}
    frozen_b = {n: p for n, p in b.peft.named_parameters() if n in b.frozen_lora_names}
    for n in frozen_a:
        torch.testing.assert_close(frozen_a[n], frozen_b[n])


def test_topstack_matches_full_model(tiny_model_dir):
    m = _model(tiny_model_dir, "ffa")
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (9, 14, 6)]
    masks = [[i >= 3 for i in range(len(s))] for s in seqs]
    labels = [labels_for(s, k) for s, k in zip(seqs, masks)]
    hb, lb = collate(lower_hidden(m, seqs), labels)
    per_sample = m.stack(hb, lb)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        with torch.no_grad():
            logits = m.peft(input_ids=torch.tensor([s])).logits[0]
        lab_t = torch.tensor(lab)
        sel = lab_t != -100
        ref = F.cross_entropy(logits[sel], lab_t[sel])
        torch.testing.assert_close(per_sample[i], ref, rtol=1e-4, atol=1e-5)


def test_adapter_modes_change_the_output(tiny_model_dir):
    m = _model(tiny_model_dir, "ffa")
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        full = m.peft(input_ids=ids).logits
        with m.personal_zeroed():
            shared_only = m.peft(input_ids=ids).logits
        with m.adapters_disabled():
            base = m.peft(input_ids=ids).logits
    assert not torch.allclose(full, shared_only) and not torch.allclose(shared_only, base)
    # personal state restored after the context
    with torch.no_grad():
        torch.testing.assert_close(m.peft(input_ids=ids).logits, full)


def test_load_state_rejects_foreign_keys_and_shapes(tiny_model_dir):
    m = _model(tiny_model_dir)
    state = m.shared_state()
    bad = dict(state)
    bad["x.lora_B.personal.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        m.load_shared_state(bad)
    name = next(iter(state))
    wrong = dict(state)
    wrong[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        m.load_shared_state(wrong)
    nan = dict(state)
    nan[name] = torch.full_like(state[name], float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        m.load_shared_state(nan)


def test_model_path_errors(tmp_path):
    with pytest.raises(ValueError, match="model.path.*does not exist"):
        resolve_model_dir(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_load_base_from_a_folder_once(tiny_model_dir):
    a = load_base(str(tiny_model_dir))
    b = load_base(str(tiny_model_dir))
    assert a[0] is b[0]
    # peft may have injected adapters into the cached model; the base weights stay frozen
    assert not any(p.requires_grad for n, p in a[0].named_parameters() if "lora_" not in n)


def test_adapter_layers_beyond_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="adapter.layers"):
        AdaptedModel(base, tok, AdapterConfig(layers=9, personal_layers=1), seed=0)
