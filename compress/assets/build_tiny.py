"""Train the embedded default model `builtin:tiny-phi4-mini` from CPython's own documentation.

    python -m compress.assets.build_tiny [--steps N] [--out DIR]

A Phi3ForCausalLM with Phi-4-mini's design choices scaled down (GQA, partial rotary 0.75, tied
embeddings, RMSNorm, fused qkv_proj / gate_up_proj) and a byte-level BPE tokenizer with Phi-4-mini's
special tokens and chat template. Seeded and single-threaded, trained by step count, so a rerun on the
same Python and library versions gives the same weights. Writes config, weights, tokenizer and CARD.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from compress.data import pydoc_splits, stdlib_docstrings, token_stream

DEFAULT_OUT = Path(__file__).parent / "tiny-phi4-mini"
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Phi-4-mini's chat format: <|system|>..<|end|><|user|>..<|end|><|assistant|>
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
VOCAB_SIZE = 4096
# head_dim 64: the ONNX GenAI builder needs head_dim * 0.75 / 2 to be a multiple of 8.
# 2 * intermediate_size != vocab_size, or the builder mistakes gate_up_proj for the LM head.
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    original_max_position_embeddings=1024,
)
TRAINING = dict(steps=1800, batch=8, seq_len=256, lr=3e-3, warmup=50, weight_decay=0.1, clip=1.0, seed=0)


def train_tokenizer(documents: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,  # text is cut into windows by compress.data, not by the tokenizer
    )


def build_config(tokenizer):
    from transformers import Phi3Config

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Phi3Config(
        vocab_size=len(tokenizer),
        **MODEL_SHAPE,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        architectures=["Phi3ForCausalLM"],
    )


def mean_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over [windows, seq_len] tokens."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows.split(8):
            logits = model(window).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += window[:, 1:].numel()
    model.train()
    return total / count


def train(out: Path, steps: int) -> dict:
    from transformers import GenerationConfig, Phi3ForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(TRAINING["seed"])
    splits = pydoc_splits()
    train_documents = splits["train"] + stdlib_docstrings()
    tokenizer = train_tokenizer(train_documents)
    config = build_config(tokenizer)
    model = Phi3ForCausalLM(config)

    seq_len, batch = TRAINING["seq_len"], TRAINING["batch"]
    train_ids = torch.from_numpy(token_stream(train_documents, tokenizer))
    eval_ids = token_stream(splits["eval"], tokenizer)
    eval_windows = torch.from_numpy(eval_ids[: (len(eval_ids) // seq_len) * seq_len].reshape(-1, seq_len)[:32])

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAINING["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAINING["lr"],
        betas=(0.9, 0.95),
    )

    def learning_rate(step: int) -> float:
        if step < TRAINING["warmup"]:
            return (step + 1) / TRAINING["warmup"]
        progress = (step - TRAINING["warmup"]) / max(1, steps - TRAINING["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    generator = torch.Generator().manual_seed(TRAINING["seed"])
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (batch,), generator=generator)
        inputs = torch.stack([train_ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAINING["clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            held_out = math.exp(mean_nll(model, eval_windows)) if step % 300 == 0 or step == steps - 1 else float("nan")
            print(f"step {step:5d}  loss {loss.item():.3f}  eval ppl {held_out:8.2f}  {time.perf_counter() - started:6.0f}s", flush=True)

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)
    card = {
        "name": "tiny-phi4-mini",
        "architecture": "Phi3ForCausalLM",
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {**MODEL_SHAPE, "vocab_size": config.vocab_size, "partial_rotary_factor": 0.75, "tie_word_embeddings": True},
        "training": {**TRAINING, "steps": steps, "threads": 1, "seconds": round(time.perf_counter() - started, 1)},
        "corpus": "train split of pydoc_data.topics (compress.data.pydoc_splits) + CPython stdlib docstrings "
                  "(compress.data.stdlib_docstrings)",
        "train_tokens": int(len(train_ids)),
        "eval": {"dataset": "builtin:pydoc-eval", "seq_len": seq_len, "windows": int(len(eval_windows)),
                 "ppl": round(math.exp(mean_nll(model, eval_windows)), 4)},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()},
    }
    (out / "CARD.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=TRAINING["steps"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    card = train(args.out, args.steps)
    print(json.dumps({k: card[k] for k in ("parameters", "eval", "training")}, indent=2))
    np.set_printoptions()


if __name__ == "__main__":
    main()
