"""Shared fixtures: a tiny real Llama model folder and tokenizer, built locally (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(folder: Path, *, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny Llama (random weights) + a byte-level BPE tokenizer trained on a few lines, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [
        "To be, or not to be, that is the question.",
        "Who's there? Nay, answer me: stand, and unfold yourself.",
        "user assistant my lord, I pray you, good night and farewell.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                      bos_token_id=fast.bos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """Flat config keys for a fast run of the tiny model."""
    return {
        "model.path": str(tiny_model_dir),
        "model.seq-len": 32,
        "model.cue-tokens": 8,
        "adapter.layers": 2,
        "adapter.personal-layers": 1,
        "adapter.rank": 2,
        "data.max-users": 4,
        "data.min-examples": 40,
        "data.max-examples": 16,
        "client.local-steps": 2,
        "client.batch-size": 4,
        "server.num-rounds": 2,
        "server.clients-per-round": 3,
        "privacy.delta": 1e-2,
        # The demo puts the noise on the sum (Adam on the server's side, clip 0.1); most tests exercise the
        # per-device placement they were written for, and the noise-on-the-sum tests set it themselves.
        "privacy.noise-on": "device",
        "privacy.max-grad-norm": 1.0,
        "server.optimizer": "fedavg",
        "server.lr": 1.0,
        "run.results-dir": str(tmp_path / "results"),
        "run.state-dir": str(tmp_path / "state"),
    }
