"""ReasoningTrainer: the losses against a per-example reference on padded batches, and a tiny model learning."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hcr.doublethink.data import IGNORE_INDEX, encode_tasks
from hcr.doublethink.evaluation import evaluate_lengths
from hcr.doublethink.experiment import DoublethinkConfig, run_experiment
from hcr.doublethink.models import build_model
from hcr.doublethink.tasks import TaskGenerator
from hcr.doublethink.tokenizer import answer_marker_id, build_tokenizer
from hcr.doublethink.trainer import ReasoningTrainer, direct_loss, doublethink_loss, make_training_arguments
from hcr_kernels._extension import native_supports

BACKENDS = ["reference"] + (["native"] if native_supports(torch.device("cpu")) else [])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin-wait contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def per_example_reference(logits, input_ids, attention_mask, marker, c):
    """The seed's two CrossEntropyLoss means, one example at a time, with the last *real* token as the answer."""
    reasoning_terms, final_terms = [], []
    for row in range(input_ids.shape[0]):
        real = int(attention_mask[row].sum())
        ids, out = input_ids[row, :real], logits[row, :real].double()
        answer_index = int((ids[1:] == marker).nonzero()[0])  # in label space, as the seed's
        labels, shifted = ids[1:], out[:-1]
        reasoning_terms.append(F.cross_entropy(shifted[answer_index:-1], labels[answer_index:-1], reduction="none"))
        final_terms.append(F.cross_entropy(shifted[-1:], labels[-1:], reduction="none"))
    return (1 - c) * torch.cat(reasoning_terms).mean() + c * torch.cat(final_terms).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [0.0, 0.3, 1.0], ids=lambda c: f"c{c}")
def test_doublethink_loss_equals_per_example_reference_on_padded_batch(backend, c):
    tokenizer = build_tokenizer()
    batch = encode_tasks(tokenizer, TaskGenerator(2).tasks([3, 1, 7, 2, 5]), "doublethink")
    assert (batch.attention_mask == 0).any()  # really padded
    marker = answer_marker_id(tokenizer)
    logits = torch.randn(*batch.input_ids.shape, len(tokenizer), dtype=torch.float32, requires_grad=True)
    loss = doublethink_loss(logits, batch.input_ids, batch.attention_mask, marker, c, backend=backend)
    reference = per_example_reference(logits, batch.input_ids, batch.attention_mask, marker, c)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad, grad_ref.float(), rtol=1e-4, atol=1e-6)
    assert grad[batch.attention_mask == 0].abs().max() == 0  # padding gets no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_loss_is_the_mean_over_hidden_values(backend):
    tokenizer = build_tokenizer()
    batch = encode_tasks(tokenizer, TaskGenerator(4).tasks([2, 6, 1]), "direct")
    logits = torch.randn(*batch.input_ids.shape, len(tokenizer))
    terms = [
        F.cross_entropy(logits[row, : int(batch.attention_mask[row].sum())], batch.labels[row, : int(batch.attention_mask[row].sum())], reduction="none")
        for row in range(len(batch))
    ]
    assert (batch.labels == IGNORE_INDEX).any()
    torch.testing.assert_close(direct_loss(logits, batch.labels, backend=backend), torch.cat(terms).mean())


def test_trainer_compute_loss_uses_the_doublethink_loss(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model("transformer", 1, len(tokenizer), hidden=32)
    marker = answer_marker_id(tokenizer)
    trainer = ReasoningTrainer(
        model=model, args=make_training_arguments(str(tmp_path)), answer_token_id=marker, answer_weight=0.25,
        freeze_gc=False,
    )
    batch = encode_tasks(tokenizer, TaskGenerator(0).tasks([2, 4]), "doublethink")
    inputs = batch.model_inputs()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        logits = model(**inputs).logits
    torch.testing.assert_close(loss, doublethink_loss(logits, batch.input_ids, batch.attention_mask, marker, 0.25))
    with pytest.raises(ValueError, match="answer_weight"):
        ReasoningTrainer(model=model, args=make_training_arguments(str(tmp_path)), answer_token_id=marker, answer_weight=2.0)


def test_tiny_transformer_learns_lengths_one_and_two(tmp_path):
    config = DoublethinkConfig(
        arch="transformer", layers=2, max_length=2, max_examples=40_000, learning_rate=3e-3, seed=0,
        out=str(tmp_path), report_to="none", save_model=True, eval_per_length=40, solved_threshold=0.95,
    )
    report = run_experiment(config, progress=False)
    assert report.summary["finished"], report.summary  # length 2 solved before the budget ran out
    assert report.rounds[-1].examples < config.max_examples
    # independently: the saved model on 50 fresh tasks per length, from a generator the run never used
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the atomic save left nothing beside
    assert not (tmp_path / "trainer").exists()  # the Trainer's working folder, empty, is not left behind
    accuracies = evaluate_lengths(model, build_tokenizer(), "doublethink", 2, 50, TaskGenerator(seed=987))
    assert np.all(accuracies >= 0.8), accuracies
