"""Doublethink tasks and tokenization: values against an independent computation, formats, the tokenizer check."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hcr.doublethink.data import IGNORE_INDEX, encode_tasks
from hcr.doublethink.tasks import OPERATIONS, Task, TaskGenerator, direct_texts, doublethink_texts
from hcr.doublethink.tokenizer import build_tokenizer, check_tokenizer, load_tokenizer

# Independent description: every operation is an affine map x -> a x + b (mod 5); letters per name.
AFFINE = {"one": (1, 1), "two": (1, 2), "three": (1, 3), "four": (1, 4), "double": (2, 0), "triple": (3, 0), "quad": (4, 0)}
LETTERS = {"one": 3, "two": 3, "three": 5, "four": 4, "double": 6, "triple": 6, "quad": 4}


def composed_prefix_values(operations):
    """Hidden values as the composition of affine maps applied to 0, overt values as letter sums."""
    a, b, hidden, overt = 1, 0, [], []
    for k, name in enumerate(operations):
        m, c = AFFINE[name]
        a, b = (m * a) % 5, (m * b + c) % 5
        hidden.append(b)  # (a * 0 + b)
        overt.append(sum(LETTERS[n] for n in operations[: k + 1]) % 5)
    return hidden, overt


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(sorted(OPERATIONS)), min_size=1, max_size=40))
def test_task_values_match_an_independent_computation(operations):
    task = Task.from_operations(operations)
    hidden, overt = composed_prefix_values(operations)
    assert list(task.hidden) == hidden
    assert list(task.overt) == overt


def test_text_formats():
    task = Task.from_operations(["two", "double", "three"])  # hidden 2, 4, 2; overt 3, 4, 4
    assert doublethink_texts(task) == (" two double three\n", " two 3 double 4 three 4\n 2")
    assert direct_texts(task) == (" two double three", " 2 4 2")


def test_generator_is_reproducible_and_seed_dependent():
    lengths = [1, 5, 9, 3]
    assert TaskGenerator(7).tasks(lengths) == TaskGenerator(7).tasks(lengths)
    assert TaskGenerator(7).tasks(lengths) != TaskGenerator(8).tasks(lengths)
    assert [len(t) for t in TaskGenerator(7).tasks(lengths)] == lengths
    with pytest.raises(ValueError, match="task length"):
        TaskGenerator(0).task(0)
    with pytest.raises(ValueError, match="unknown operation"):
        Task.from_operations(["minus"])


def test_builtin_tokenizer_passes_the_check_and_round_trips(tmp_path):
    tokenizer = build_tokenizer()
    check_tokenizer(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "".join(doublethink_texts(TaskGenerator(3).task(12)))
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(tokenizer(text)["input_ids"]) == 3 * 12 + 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def splitting_tokenizer():
    """A word-level tokenizer that cuts "double" into "dou" + "ble"."""
    words = ["<pad>", "<eos>", "<unk>", "\n", "0", "1", "2", "3", "4", "dou", "ble", *[w for w in OPERATIONS if w != "double"]]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), "isolated"),
        pre_tokenizers.Split(" ", "removed"),
        pre_tokenizers.Split("ble", "isolated"),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_check_fails_clearly_on_a_tokenizer_that_splits_an_operation():
    tokenizer = splitting_tokenizer()
    assert tokenizer(" double", add_special_tokens=False)["input_ids"] == [9, 10]
    with pytest.raises(ValueError, match=r"word 'double' .* exactly one token.*\['dou', 'ble'\]"):
        check_tokenizer(tokenizer)


@pytest.mark.parametrize("kind", ["doublethink", "direct"])
def test_encoded_batches_score_exactly_the_answer_tokens(kind):
    tokenizer = build_tokenizer()
    tasks = TaskGenerator(1).tasks([1, 4, 2, 7])
    batch = encode_tasks(tokenizer, tasks, kind)
    vocab = tokenizer.get_vocab()
    for row, task in enumerate(tasks):
        n = len(task)
        real = int(batch.attention_mask[row].sum())
        scored = batch.answer_targets[row][batch.answer_targets[row] != IGNORE_INDEX].tolist()
        if kind == "doublethink":
            assert real == 3 * n + 3
            words = [w for name, value in zip(task.operations, task.overt) for w in (name, str(value))]
            expected = [vocab[w] for w in words] + [vocab["\n"], vocab[str(task.hidden[-1])]]
            # scored positions predict the next token: the last real position scores nothing
            assert batch.answer_targets[row, real - 1] == IGNORE_INDEX
        else:
            assert real == n
            expected = [vocab[str(v)] for v in task.hidden]
        assert scored == expected
