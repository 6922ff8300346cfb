"""Every settings dataclass refuses, by name, a value its command's flag would refuse: the Python API checks
what the command line does (a batch size of -1 had evaluated nothing, eval_items=-1 cut the demo's data)."""

from __future__ import annotations

import pytest

from hcr.argtypes import POSITIVE_INT, check_fields, non_empty_tuple_of, optional
from hcr.compression.examples import ExampleConfig
from hcr.compression.settings import LoraSettings, PoolerSettings, TrainSettings
from hcr.demo.experiment import DemoSettings
from hcr.demo.reasoner import ReasonerSettings
from hcr.doublethink.config import DoublethinkConfig
from hcr.evaluation.runner import EvalSettings


def evaluation(**changes):
    return EvalSettings(base="b", dataset="d.jsonl", out="o", **changes)


BAD = [  # (make the settings, field, bad value, what the error says it expects)
    (LoraSettings, "r", 0, "a positive integer"),
    (LoraSettings, "alpha", 0, "a positive number"),
    (LoraSettings, "dropout", -1, r"a number in \[0, 1\]"),
    (LoraSettings, "target_modules", "q_proj", "a non-empty tuple, each item a module name"),
    (PoolerSettings, "num_hidden_layers", 0, "None or a positive integer"),
    (PoolerSettings, "num_hidden_layers", 1.5, "None or a positive integer"),
    (TrainSettings, "max_steps", 0, r"-1 \(run --epochs\) or a positive integer"),
    (TrainSettings, "per_device_train_batch_size", 0, "a positive integer"),
    (TrainSettings, "gradient_accumulation_steps", 0, "a positive integer"),
    (TrainSettings, "learning_rate", -1e-4, "a positive number"),
    (TrainSettings, "num_train_epochs", float("inf"), "a positive number"),
    (TrainSettings, "save_total_limit", -1, "None or a positive integer"),
    (evaluation, "batch_size", -1, "a positive integer"),
    (evaluation, "batch_size", 0, "a positive integer"),
    (evaluation, "limit", 0, "None or a positive integer"),
    (evaluation, "top_p", 1.5, r"None or a number in \(0, 1\]"),
    (evaluation, "top_k", -1, "None or an integer >= 0"),
    (evaluation, "do_sample", "no", "True or False"),
    (DemoSettings, "eval_items", -1, "a positive integer"),
    (DemoSettings, "keep_last", (), "a non-empty tuple, each item an integer >= 0"),
    (DemoSettings, "windows", (2, 0), "a non-empty tuple, each item a positive integer"),
    (DemoSettings, "pooler_layers", 0, "a positive integer"),
    (ReasonerSettings, "layers", True, "a positive integer"),
    (ReasonerSettings, "marker_fraction", 2, r"a number in \[0, 1\]"),
    (DoublethinkConfig, "layers", 1.5, "a positive integer"),
    (DoublethinkConfig, "batch_size", "64", "a positive integer"),
    (DoublethinkConfig, "solved_threshold", 5, r"a number in \[0, 1\]"),
    (DoublethinkConfig, "save_every_s", -1, "a number >= 0"),
    (DoublethinkConfig, "answer_weight", "0.5", r"None or a number in \[0, 1\]"),
    (DoublethinkConfig, "answer_weight", float("nan"), r"None or a number in \[0, 1\]"),
    (ExampleConfig, "window", True, "a positive integer"),
    (ExampleConfig, "pad_id", 5.5, "None or an integer >= 0"),
]


@pytest.mark.parametrize("make,name,value,expected", BAD, ids=[f"{m.__name__}-{n}-{v!r}" for m, n, v, _ in BAD])
def test_a_bad_setting_is_named_with_what_it_expects(make, name, value, expected):
    extra = {"window": 2} if make is ExampleConfig and name != "window" else {}
    owner = "EvalSettings" if make is evaluation else make.__name__
    with pytest.raises(ValueError, match=rf"^{owner}\.{name} must be {expected}, got "):
        make(**extra, **{name: value})


def test_the_defaults_and_the_quick_demo_pass():
    for make in (LoraSettings, PoolerSettings, TrainSettings, evaluation, DemoSettings, DemoSettings.quick,
                 ReasonerSettings, DoublethinkConfig):
        make()
    assert DemoSettings(min_steps=3, max_steps=3).min_steps == 3
    with pytest.raises(ValueError, match=r"min_steps \(6\) must be <= max_steps \(5\)"):
        DemoSettings(min_steps=6, max_steps=5)


def test_rules_compose():
    class Holder:
        def __init__(self, **fields):
            vars(self).update(fields)

    check_fields(Holder(a=None, b=[1, 2]), a=optional(POSITIVE_INT), b=non_empty_tuple_of(POSITIVE_INT))
    with pytest.raises(ValueError, match=r"Holder.b must be a non-empty tuple, each item a positive integer, got \[1, 0\]"):
        check_fields(Holder(b=[1, 0]), b=non_empty_tuple_of(POSITIVE_INT))
