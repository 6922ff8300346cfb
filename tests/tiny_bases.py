"""A tiny Qwen2 base saved with the tiny tokenizer, and a traces file: what the CLI tests train on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def tiny_qwen2(vocab_size: int, *, hidden_size: int = 32, layers: int = 2):
    """A seeded random Qwen2 base: 4 query heads, 2 key/value heads, an MLP twice the hidden size."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden_size,
                                      max_position_embeddings=256)
    return transformers.Qwen2ForCausalLM(config).eval()


def save_tiny_base_and_traces(root: Path, *, hidden_size: int, layers: int, traces: int) -> Path:
    """``root/base`` (model + tokenizer) and ``root/traces.jsonl`` with ``traces`` arithmetic traces."""
    from hcr.compression import arithmetic_trace, tiny_tokenizer

    tokenizer = tiny_tokenizer(root / "base")
    tiny_qwen2(len(tokenizer), hidden_size=hidden_size, layers=layers).save_pretrained(root / "base")
    with (root / "traces.jsonl").open("w") as f:
        for i in range(traces):
            question, answer = arithmetic_trace(random.Random(i))
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return root
