"""Final-answer extraction and equivalence (hcr.evaluation.answers): exact expected results, case by case."""

from __future__ import annotations

import threading

import pytest

from hcr.evaluation import answers_match, extract_answer, extract_answer_with_rule, normalize_answer
from hcr.evaluation.data import gold_answer

# (id, model output, expected answer, expected rule)
EXTRACTION = [
    ("plain-box", r"So the answer is \boxed{42}.", "42", "boxed"),
    ("nested-frac", r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", "boxed"),
    ("deeply-nested", r"\boxed{\frac{\sqrt{2}}{\sqrt{3}}}", r"\frac{\sqrt{2}}{\sqrt{3}}", "boxed"),
    ("escaped-braces", r"\boxed{\{1, 2\}}", r"\{1, 2\}", "boxed"),
    ("several-boxes-last", r"First \boxed{3}, then corrected: \boxed{5}", "5", "boxed"),
    ("unclosed-last-box", r"\boxed{7} and later \boxed{8", "7", "boxed"),
    ("unclosed-only", r"the answer is \boxed{12", "12", "last-number"),
    ("box-inside-unclosed", r"\boxed{\boxed{9} oops", "9", "boxed"),
    ("box-in-box", r"\boxed{\boxed{5}}", "5", "boxed"),
    ("text-after-box", r"\boxed{6}. Let me double-check: 2+4=6, and 10 is not it.", "6", "boxed"),
    ("think-box-ignored", r"<think>maybe \boxed{1}</think>The answer is \boxed{2}.", "2", "boxed"),
    ("think-number-ignored", r"<think>I get 17</think>So it is 18.", "18", "last-number"),
    ("only-think-box", r"<think>\boxed{4}</think>I am not sure.", None, "none"),
    ("last-think-end", r"<think>a</think>\boxed{1}</think>\boxed{2}", "2", "boxed"),
    ("no-think", r"reasoning without the tag... \boxed{x+1}", "x+1", "boxed"),
    ("fbox", r"\fbox{7}", "7", "fbox"),
    ("fbox-after-boxed", r"\boxed{1} then \fbox{2}", "2", "fbox"),
    ("boxed-after-fbox", r"\fbox{2} then \boxed{3}", "3", "boxed"),
    ("unbraced", r"\boxed 5", "5", "boxed-unbraced"),
    ("unbraced-in-math", r"so $\boxed 42$.", "42", "boxed-unbraced"),
    ("space-before-brace", r"\boxed {12}", "12", "boxed"),
    ("boxed-in-dollars", r"$\boxed{-3}$", "-3", "boxed"),
    ("empty-box-skipped", r"\boxed{} hmm, 4", "4", "last-number"),
    ("boxed-is-not-boxedx", r"\boxedx{3} gives 4", "4", "last-number"),
    ("box-spaces-stripped", r"\boxed{  10  }", "10", "boxed"),
    ("unicode-minus-box", "\\boxed{\u22125}", "\u22125", "boxed"),
    ("unicode-minus-number", "x = \u22125", "-5", "last-number"),
    ("thousands", "The total is 1,000 dollars.", "1000", "last-number"),
    ("thousands-millions", "about 12,345,678 people", "12345678", "last-number"),
    ("list-not-thousands", "the numbers 1,2,3", "3", "last-number"),
    ("decimal", "pi is about 3.14.", "3.14", "last-number"),
    ("leading-dot", "it is .5", "0.5", "last-number"),
    ("negative-decimal", "The result: -0.25.", "-0.25", "last-number"),
    ("hyphen-is-not-minus", "pages 3-5", "5", "last-number"),
    ("fraction-number", "The answer is 3/4.", "3/4", "last-number"),
    ("last-number-of-many", "2 apples and 3 pears make 5 fruits", "5", "last-number"),
    ("nothing", "I do not know.", None, "none"),
    ("empty", "", None, "none"),
    ("none-input", None, None, "none"),
]


@pytest.mark.parametrize("text, answer, rule", [case[1:] for case in EXTRACTION], ids=[c[0] for c in EXTRACTION])
def test_extraction(text, answer, rule):
    assert extract_answer_with_rule(text) == (answer, rule)
    assert extract_answer(text) == answer


# (id, predicted, gold, match?)
EQUIVALENCE = [
    ("same-integer", "7", "7", True),
    ("different-integer", "7", "8", False),
    ("half-decimal-frac", "0.5", r"\frac{1}{2}", True),
    ("half-slash-dfrac", "1/2", r"\dfrac{1}{2}", True),
    ("half-decimal-slash", "0.5", "1/2", True),
    ("thousands", "1,000", "1000", True),
    ("thousands-wrong", "1,001", "1000", False),
    ("unicode-minus", "\u22125", "-5", True),
    ("choice-text", r"\text{(A)}", "A", True),
    ("choice-paren", "(B)", r"\text{B}", True),
    ("choice-wrong", "B", r"\text{(A)}", False),
    ("degrees", r"90^\circ", "90", True),
    ("degrees-braced", r"45^{\circ}", "45", True),
    ("units", r"10\text{ cm}", "10", True),
    ("left-right", r"\left(1, 2\right)", "(1,2)", True),
    ("trailing-period", "5.", "5", True),
    ("spaces", r"x + 1", "x+1", True),
    ("commutative", "x+1", "1+x", True),
    ("sqrt-forms", r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", True),
    ("percent", r"50\%", "50", True),
    ("dollars", r"\$5", "5", True),
    ("pi-is-not-3.14", r"\pi", "3.14", False),
    ("decimals-exact", "0.50", "0.5", True),
    ("text-answer", r"\text{Monday}", "Monday", True),
    ("text-answer-wrong", r"\text{Monday}", "Tuesday", False),
    ("none-predicted", None, "7", False),
    ("none-gold", "7", None, False),
    ("both-none", None, None, False),
    ("empty-predicted", "", "0", False),
]


@pytest.mark.parametrize("predicted, gold, match", [case[1:] for case in EQUIVALENCE],
                         ids=[c[0] for c in EQUIVALENCE])
def test_equivalence(predicted, gold, match):
    assert answers_match(predicted, gold) is match


@pytest.mark.parametrize("answer, expected", [
    (r"$\dfrac{1}{2}$", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, 4 \right)}", "(3,4)"),
    ("\u22121,234", "-1234"),
    (r"\text{(C)}", "C"),
    (r"30^\circ.", "30"),
    (r"\pi r^2", r"\pi r^2"),  # the space that ends a command name stays
    ("", None),
    (None, None),
])
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


def test_match_outside_the_main_thread():
    """math-verify's timeouts need SIGALRM (main thread only): other threads compare without them."""
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_match("0.5", r"\frac{1}{2}")))
    worker.start()
    worker.join()
    assert results == [True]


@pytest.mark.parametrize("answer, gold", [
    ("42", "42"),
    (" 42 ", "42"),
    (r"<think>x</think>The answer is $\boxed{\frac{3}{4}}$.", r"\frac{3}{4}"),
    (r"\boxed{12} apples", "12"),
    ("12 apples", "12 apples"),  # no box: the gold answer is taken as written
    (7, "7"),
])
def test_gold_answer(answer, gold):
    assert gold_answer(answer) == gold


def test_what_is_not_an_answer_is_refused_by_name():
    """A number is a fine gold answer (datasets store them so); a list, a dict or a bool is no answer, where
    str() had made ['5'] match '5'. A model output must be text."""
    assert answers_match("5", 5) and answers_match(0.5, r"\frac{1}{2}") and not answers_match(None, "5")
    for odd in (["5"], {"a": 1}, True):
        with pytest.raises(TypeError, match="an answer must be text, a number or None"):
            answers_match(odd, "5")
    for odd in (5, 0, ["x"]):
        with pytest.raises(TypeError, match="text must be a model's output"):
            extract_answer(odd)
