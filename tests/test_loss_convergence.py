"""Tiny-model convergence: training with the loss kernels follows the reference's loss curve.

A 2-layer GPT-2 (n_embd 32, vocabulary 64, tied lm_head) trained for 20 AdamW
steps on doublethink-shaped batches (task, answer marker, reasoning, final token;
right-padded) with the answer-weighted loss, once per loss implementation from
the same initial weights. In fp32 the curves must agree to rounding: the kernels
change the order of floating-point sums, nothing else. The fused linear loss also
exercises the lm_head weight gradient (tied to the input embeddings).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hcr_kernels import (  # noqa: E402
    answer_loss_weights,
    fused_linear_cross_entropy,
    weighted_cross_entropy,
    weighted_cross_entropy_ref,
)

VOCAB, ANSWER, PAD = 64, 3, 0
STEPS, BATCH = 20, 8
ANSWER_WEIGHT = 0.3


def make_batches(seed: int = 0):
    """Learnable sequences: the reasoning counts up from the task's last token, mod the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        ids = torch.full((BATCH, 16), PAD)
        mask = torch.zeros(BATCH, 16, dtype=torch.long)
        for row in range(BATCH):
            task = torch.randint(4, VOCAB, (int(torch.randint(2, 5, (1,), generator=generator)),), generator=generator)
            steps = int(torch.randint(3, 16 - len(task) - 1, (1,), generator=generator))
            reasoning = (task[-1] + torch.arange(1, steps + 1)) % (VOCAB - 4) + 4
            example = torch.cat([task, torch.tensor([ANSWER]), reasoning])
            ids[row, : len(example)] = example
            mask[row, : len(example)] = 1
        batches.append((ids, mask))
    return batches


def make_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config)


def weighted_loss(fn):
    def loss(model, ids, mask, weights):
        logits = model(input_ids=ids, attention_mask=mask).logits
        return fn(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), weights.reshape(-1))

    return loss


def fused_loss(backend):
    def loss(model, ids, mask, weights):
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        return fused_linear_cross_entropy(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), model.lm_head.weight, ids[:, 1:].reshape(-1),
            weights.reshape(-1), chunk_size=37, backend=backend,
        )

    return loss


def train(loss_fn) -> torch.Tensor:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    curve = []
    for ids, mask in make_batches():
        weights = answer_loss_weights(ids, mask, ANSWER, ANSWER_WEIGHT)
        loss = loss_fn(model, ids, mask, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return torch.tensor(curve)


LOSSES = [
    pytest.param(weighted_loss(lambda x, y, w: weighted_cross_entropy(x, y, w, backend="native")), id="weighted-native"),
    pytest.param(weighted_loss(lambda x, y, w: weighted_cross_entropy(x, y, w, backend="triton")), id="weighted-triton"),
    pytest.param(fused_loss("native"), id="fused-linear-native"),
    pytest.param(fused_loss("triton"), id="fused-linear-triton"),
]


@pytest.fixture(scope="module")
def reference_curve():
    return train(weighted_loss(weighted_cross_entropy_ref))


def test_reference_learns(reference_curve):
    assert reference_curve[-5:].mean() < 0.8 * reference_curve[:3].mean(), reference_curve


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_same_loss_curve_as_reference(loss_fn, reference_curve):
    curve = train(loss_fn)
    torch.testing.assert_close(curve, reference_curve, atol=1e-4, rtol=1e-4)
