"""answer_loss_weights: the seed's "fancy loss", vectorised and right on padded batches.

The seed's loss (sneaky-mamba compute_loss) is transcribed below as it was, loop
over the batch included; on unpadded batches of equal length the weights must
reproduce it exactly. On padded batches the final-answer term must use each
example's last real token (the seed used the padded last position).
"""

from __future__ import annotations

import pytest
import torch

from hcr_kernels import answer_loss_weights, weighted_cross_entropy, weighted_cross_entropy_ref

ANSWER = 5  # token id of the answer marker in these synthetic batches
PAD = 0
VOCAB = 23


def seed_fancy_loss(lm_logits, input_ids, answer_token, final_answer_loss_contribution):
    """The seed's compute_loss, verbatim but for the model call (logits are given)."""
    labels = input_ids.to(lm_logits.device)
    shift_logits = lm_logits[:, :-1, :].contiguous()
    labels = labels[:, 1:].contiguous()

    reasoning_shift_logits = []
    reasoning_labels = []
    final_answer_shift_logits = []
    final_answer_labels = []
    for ex_shift_logits, ex_labels in zip(shift_logits, labels):
        answer_index = torch.where(ex_labels == answer_token)[0]
        answer_index = int(answer_index)
        reasoning_shift_logits.append(ex_shift_logits[answer_index:-1])
        reasoning_labels.append(ex_labels[answer_index:-1])
        final_answer_shift_logits.append(ex_shift_logits[-1:])
        final_answer_labels.append(ex_labels[-1:])

    loss_fct = torch.nn.CrossEntropyLoss()
    reasoning_lm_loss = loss_fct(torch.cat(reasoning_shift_logits), torch.cat(reasoning_labels))
    loss_fct = torch.nn.CrossEntropyLoss()
    final_answer_lm_loss = loss_fct(torch.cat(final_answer_shift_logits), torch.cat(final_answer_labels))
    return (
        reasoning_lm_loss * (1 - final_answer_loss_contribution)
        + final_answer_lm_loss * final_answer_loss_contribution
    )


def make_example(task_len: int, reasoning_len: int, generator) -> list[int]:
    """``task ANSWER reasoning... final``; no other token equals the marker."""
    body = torch.randint(6, VOCAB, (task_len + reasoning_len + 1,), generator=generator).tolist()
    return body[:task_len] + [ANSWER] + body[task_len:]


def pad_batch(examples, left=()):
    length = max(map(len, examples))
    ids = torch.full((len(examples), length), PAD)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, example in enumerate(examples):
        start = length - len(example) if row in left else 0
        ids[row, start : start + len(example)] = torch.tensor(example)
        mask[row, start : start + len(example)] = 1
    return ids, mask


def loss_with_weights(logits, input_ids, weights, backend):
    vocab = logits.shape[-1]
    return weighted_cross_entropy(
        logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1), weights.reshape(-1), backend=backend
    )


@pytest.mark.parametrize("answer_weight", [0.0, 0.3, 1.0], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_equals_the_seed_on_unpadded_batches(backend, answer_weight):
    generator = torch.Generator().manual_seed(1)
    # equal lengths, markers at different places
    examples = [make_example(task, 12 - task, generator) for task in (2, 5, 7, 3)]
    input_ids, mask = pad_batch(examples)
    assert bool(mask.all())
    logits = torch.randn(*input_ids.shape, VOCAB, generator=generator)

    weights = answer_loss_weights(input_ids, mask, ANSWER, answer_weight)
    assert weights.shape == (4, input_ids.shape[1] - 1) and weights.dtype == torch.float32
    expected = seed_fancy_loss(logits, input_ids, ANSWER, answer_weight)
    torch.testing.assert_close(loss_with_weights(logits, input_ids, weights, backend), expected)
    torch.testing.assert_close(answer_loss_weights(input_ids, None, ANSWER, answer_weight), weights)


def fixed_seed_loss(logits, input_ids, mask, answer_token, c):
    """The seed's loss with its padding bug fixed: each example cut to its real tokens first."""
    reasoning_logits, reasoning_labels, final_logits, final_labels = [], [], [], []
    for ex_logits, ex_ids, ex_mask in zip(logits, input_ids, mask.bool()):
        ex_logits, ex_ids = ex_logits[ex_mask], ex_ids[ex_mask]
        shift_logits, labels = ex_logits[:-1], ex_ids[1:]
        answer_index = int(torch.where(labels == answer_token)[0][0])
        reasoning_logits.append(shift_logits[answer_index:-1])
        reasoning_labels.append(labels[answer_index:-1])
        final_logits.append(shift_logits[-1:])
        final_labels.append(labels[-1:])
    ce = torch.nn.functional.cross_entropy
    reasoning = ce(torch.cat(reasoning_logits), torch.cat(reasoning_labels))
    final = ce(torch.cat(final_logits), torch.cat(final_labels))
    return reasoning * (1 - c) + final * c


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_padded_batches_use_the_last_real_token(backend):
    generator = torch.Generator().manual_seed(2)
    examples = [make_example(3, 9, generator), make_example(2, 4, generator), make_example(6, 1, generator),
                make_example(1, 7, generator)]
    input_ids, mask = pad_batch(examples, left={3})  # rows 0-2 right-padded, row 3 left-padded
    logits = torch.randn(*input_ids.shape, VOCAB, generator=generator)
    c = 0.25

    weights = answer_loss_weights(input_ids, mask, ANSWER, c)
    torch.testing.assert_close(
        loss_with_weights(logits, input_ids, weights, backend), fixed_seed_loss(logits, input_ids, mask, ANSWER, c)
    )
    # the final term sits on the prediction of each row's last real token, c / B each
    real = mask[:, 1:].bool()
    for row, example in enumerate(examples):
        last = int(real[row].nonzero().max())
        assert input_ids[row, last + 1] == example[-1]
        assert weights[row, last] == pytest.approx(c / 4)
    assert not weights[~real].any(), "padding gets no weight"
    assert weights.sum().item() == pytest.approx(1.0)
    # the seed itself, on this padded batch, would score pad predictions as final answers
    seed = seed_fancy_loss(logits, input_ids, ANSWER, c)
    assert not torch.allclose(seed, fixed_seed_loss(logits, input_ids, mask, ANSWER, c))


def test_weights_by_position():
    """task -> 0, marker prediction and reasoning -> (1 - c) / R, last real -> c / B, pads -> 0."""
    input_ids = torch.tensor([[7, 8, ANSWER, 9, 10, 11], [7, ANSWER, 9, 10, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    weights = answer_loss_weights(input_ids, mask, ANSWER, 0.4)
    r, f = 0.6 / 5, 0.4 / 2  # reasoning positions: row 0 -> 1, 2, 3; row 1 -> 0, 1
    expected = torch.tensor([[0, r, r, r, f], [r, r, f, 0, 0]])
    torch.testing.assert_close(weights, expected)


def test_first_marker_counts_and_marker_as_last_token():
    input_ids = torch.tensor([[7, ANSWER, 9, ANSWER, 10], [7, 8, 9, 10, ANSWER]])
    weights = answer_loss_weights(input_ids, None, ANSWER, 0.5)
    # row 0 reasons from its first marker (positions 0..2); row 1's marker is its final token: no reasoning
    expected = torch.tensor([[0.5 / 3] * 3 + [0.25], [0, 0, 0, 0.25]])
    torch.testing.assert_close(weights, expected)
    only_final = answer_loss_weights(input_ids[1:], None, ANSWER, 0.5)
    torch.testing.assert_close(only_final, torch.tensor([[0.0, 0.0, 0.0, 0.5]]))  # R = 0: the first term is 0


def test_rows_without_marker_are_named():
    input_ids = torch.tensor([[7, ANSWER, 9], [7, 8, 9], [ANSWER, 8, 9], [7, 8, ANSWER]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]])  # row 2: marker only at position 0; row 3: in padding
    with pytest.raises(ValueError, match=r"rows \[1, 2, 3\] of input_ids have no answer marker \(token id 5\)"):
        answer_loss_weights(input_ids, mask, ANSWER, 0.5)


BAD = [
    pytest.param(dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3)), ValueError,
                 "attention_mask must have input_ids' shape", id="mask-shape"),
    pytest.param(dict(input_ids=torch.ones(4, dtype=torch.long)), ValueError, "input_ids must be a 2-D", id="ids-1d"),
    pytest.param(dict(input_ids=torch.ones(2, 4)), TypeError, "input_ids must be an integer", id="ids-float"),
    pytest.param(dict(input_ids=torch.ones(2, 1, dtype=torch.long)), ValueError, "at least 2 positions", id="L1"),
    pytest.param(dict(answer_weight=1.5), ValueError, r"answer_weight must be in \[0, 1\]", id="c-too-big"),
    pytest.param(dict(answer_weight="0.3"), TypeError, "answer_weight must be a number in", id="c-text"),
    pytest.param(dict(answer_token_id="5"), TypeError, "answer_token_id must be a token id", id="marker-text"),
    pytest.param(dict(input_ids=torch.ones(2, 4, dtype=torch.bool)), TypeError, "input_ids must be an integer",
                 id="ids-bool"),
    pytest.param(dict(dtype=torch.int64), TypeError, "dtype must be a floating-point", id="integer-weights"),
    pytest.param(dict(attention_mask=torch.ones(1, 3, device="meta")), ValueError, "attention_mask on meta",
                 id="mask-meta"),
]


@pytest.mark.parametrize("override,error,message", BAD)
def test_bad_input_is_rejected(override, error, message):
    args = dict(input_ids=torch.tensor([[1, ANSWER, 2]]), attention_mask=None, answer_token_id=ANSWER, answer_weight=0.5)
    args.update(override)
    with pytest.raises(error, match=message):
        answer_loss_weights(**args)


def test_gradient_flows_through_the_weighted_loss():
    """The trainer's use: weights from the batch, loss differentiable in the logits."""
    generator = torch.Generator().manual_seed(3)
    input_ids, mask = pad_batch([make_example(2, 5, generator), make_example(3, 2, generator)])
    logits = torch.randn(*input_ids.shape, VOCAB, generator=generator, requires_grad=True)
    weights = answer_loss_weights(input_ids, mask, ANSWER, 0.3)
    loss = loss_with_weights(logits, input_ids, weights, "native")
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = weighted_cross_entropy_ref(ref_logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1), weights.reshape(-1))
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(grad, ref_grad)
    assert not grad[:, -1].any(), "the last position predicts nothing"
