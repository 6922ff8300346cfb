"""One training step of the compression model on CPU: the fused path vs the reference path.

A Qwen2 base (hidden 256, 2 layers, vocabulary 32,000) with a 1-layer LoRA pooler,
a batch of 4 compressed sequences of 512 tokens at W = 10 with 40 windows each.
``native``: ``pool_scatter`` native and ``fused_linear_cross_entropy`` (no logits);
``reference``: ``pool_scatter`` reference and the base's own loss on full logits.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from hcr.compression.model import CompressionConfig, CompressionModel  # noqa: E402
from hcr.compression.pooler import EmbedPooler  # noqa: E402
from hcr.compression.train import LoraSettings, add_lora  # noqa: E402

VOCAB, HIDDEN, BATCH, LENGTH, WINDOW, SLOTS = 32000, 256, 4, 512, 10, 40
PLACEHOLDER, START, END = VOCAB - 3, VOCAB - 2, VOCAB - 1


def setup_model():
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=4 * HIDDEN, max_position_embeddings=LENGTH))
    pooler = add_lora(EmbedPooler.from_base(base, num_hidden_layers=1), LoraSettings())
    model = CompressionModel(CompressionConfig(None, WINDOW, PLACEHOLDER, START, END), base, pooler)
    ids = torch.randint(0, VOCAB - 3, (BATCH, LENGTH))
    ids[:, 20] = START
    ids[:, 21 : 21 + SLOTS] = PLACEHOLDER
    ids[:, 21 + SLOTS] = END
    labels = ids.clone()
    labels[:, : 22 + SLOTS] = -100
    batch = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                 window_ids=torch.randint(0, VOCAB - 3, (BATCH * SLOTS, WINDOW)))
    return model, batch


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_training_step(benchmark, backend, monkeypatch):
    model, batch = setup_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    monkeypatch.setenv("HCR_BACKEND", backend)
    benchmark.group = f"compression model training step, vocab {VOCAB}, batch {BATCH} x {LENGTH}, W={WINDOW}"
    benchmark.extra_info.update(backend=backend, count=BATCH * LENGTH, unit="tokens")

    def step():
        loss = model(**batch, return_logits=backend == "reference").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
