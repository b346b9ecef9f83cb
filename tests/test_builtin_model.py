"""The shipped default model: Phi-4-mini's design choices, and it still scores what its card says."""

import hashlib
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.data import evaluation_windows, load_documents, token_stream
from compress.model import BUILTIN_MODELS, inspect_model

FOLDER = BUILTIN_MODELS["tiny-phi4-mini"]
CARD = json.loads((FOLDER / "CARD.json").read_text())


def test_card_hashes_match_the_shipped_files():
    for name, digest in CARD["sha256"].items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest, name


def test_architecture_has_phi4_mini_design_choices():
    info = inspect_model("builtin:tiny-phi4-mini")
    config = info.config
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["model_type"] == "phi3"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.75
    assert config["tie_word_embeddings"] is True
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert (head_dim * 0.75 / 2) % 8 == 0  # ONNX GenAI builder's GQA kernel
    assert 2 * config["intermediate_size"] != config["vocab_size"]  # builder's LM-head detection
    assert 1_000_000 <= info.parameters <= 5_000_000
    model = AutoModelForCausalLM.from_pretrained(FOLDER, local_files_only=True)
    names = {name for name, _ in model.named_modules()}
    assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.0.mlp.gate_up_proj" in names
    assert type(model.model.norm).__name__ == "Phi3RMSNorm"


def test_tokenizer_has_phi4_mini_special_tokens_and_chat_template():
    tokenizer = AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    for token in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>Hi<|end|><|assistant|>"
    sample = "def f(x):\n    return x ** 2  # café"
    assert tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample


def test_shipped_model_reproduces_its_recorded_perplexity_within_one_percent():
    tokenizer = AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    tokenizer.model_max_length = 1 << 30
    model = AutoModelForCausalLM.from_pretrained(FOLDER, local_files_only=True, dtype=torch.float32).eval()
    recorded = CARD["eval"]
    stream = token_stream(load_documents(recorded["dataset"]), tokenizer)
    windows = torch.from_numpy(evaluation_windows(stream, recorded["seq_len"], recorded["windows"]))
    with torch.inference_mode():
        logits = torch.cat([model(chunk).logits for chunk in windows.split(8)])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.exp(nll.item()) == pytest.approx(recorded["ppl"], rel=0.01)
