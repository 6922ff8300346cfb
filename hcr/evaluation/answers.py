"""Final answers of reasoning-model outputs: extraction and equivalence.

``extract_answer`` finds the answer a model gave; ``answers_match`` decides whether
two answers are the same mathematical object. Equivalence is Hugging Face's
math-verify (sympy-backed: ``0.5 == \\frac{1}{2} == 1/2``, sets, intervals,
matrices, ...). What it lacks is written here, each with its reason:

* which box counts: math-verify's own extraction prefers "final answer is" phrases
  and matches ``\\boxed{.+}`` greedily; an R1 model's answer is its last *complete*
  ``\\boxed{...}`` after ``</think>``, so we extract first and hand math-verify the
  answer alone;
* ``\\fbox{...}`` and ``\\boxed 5`` (no braces), which its patterns do not match;
* the last number of the text when nothing is boxed (models that forget the box);
* MATH-style normalisation of the surface form (``\\dfrac``, ``\\left``, units in
  ``\\text{}``, ``^\\circ``, ``1,000``, ``\\text{(A)}``, the unicode minus), which math-verify
  either does not do or does only inside its own extraction.

Nothing here imports torch or transformers; math-verify (and sympy) load on the
first comparison.
"""

from __future__ import annotations

import numbers
import re
import threading
from fractions import Fraction

from hcr.compression.tokens import THINK_END

__all__ = ["RULES", "answers_match", "extract_answer", "extract_answer_with_rule", "normalize_answer"]

# What ``extract_answer_with_rule`` reports: which rule gave the answer.
RULES = ("boxed", "fbox", "boxed-unbraced", "last-number", "none")

_BOX = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")
# A number as models write it: an optional sign (not a hyphen inside a word), thousands separators, decimals,
# and an optional ``/denominator`` so that "the answer is 3/4" does not come out as 4.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])[-\u2212])?"  # a sign only where it cannot be a hyphen or a subtraction
    r"(?<![\d.])(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/\d+(?!\d|\.\d))?"
)
_UNBRACED_TRAILING = "$.,;:!?)]"


def _matching_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``start`` (``\\{`` and ``\\}`` are literal), or None if unclosed."""
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, e.g. \{ or \}: never a group delimiter
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxes(text: str):
    """Every complete box of ``text`` in order, as (content, rule); nested boxes stay inside their box."""
    position = 0
    while True:
        match = _BOX.search(text, position)
        if match is None:
            return
        after = match.end()
        brace = after
        while brace < len(text) and text[brace] in " \t":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            close = _matching_brace(text, brace)
            if close is None:  # unclosed: not an answer; a complete box may still sit inside it
                position = brace + 1
                continue
            content = text[brace + 1 : close].strip()
            if content:
                yield content, match.group(1)
            position = close + 1
        elif brace > after:  # "\boxed 5": LaTeX boxes the next token
            token = re.match(r"[^\s\\{}]+", text[brace:])
            content = token.group(0).rstrip(_UNBRACED_TRAILING) if token else ""
            if content:
                yield content, "boxed-unbraced"
            position = brace + (token.end() if token else 0)
        else:
            position = after


def _unbox(content: str) -> str:
    """``\\boxed{\\boxed{5}}`` -> ``5``: a box that holds nothing but a box."""
    while True:
        inner = list(_boxes(content))
        if len(inner) != 1:
            return content
        match = _BOX.match(content)
        if match is None:
            return content
        brace = content.find("{", match.end())
        if brace < 0 or _matching_brace(content, brace) != len(content) - 1:
            return content
        content = inner[0][0]


def _canonical_number(text: str) -> str:
    text = text.replace("\u2212", "-").replace(",", "")
    return re.sub(r"^(-?)\.", r"\g<1>0.", text)  # .5 -> 0.5


def extract_answer_with_rule(text: str | None) -> tuple[str | None, str]:
    """The final answer of a model output and the rule that found it (one of ``RULES``).

    Only the text after the last ``</think>`` is read when there is one (the
    reasoning may box intermediate results). Then: the last complete
    ``\\boxed{...}`` (rule ``"boxed"``) or ``\\fbox{...}`` (``"fbox"``), braces matched
    (``\\boxed{\\frac{1}{2}}``), an unclosed box skipped; ``\\boxed 5``
    (``"boxed-unbraced"``); else the last number of the text (``"last-number"``,
    returned with an ASCII minus and no thousands separators); else ``(None, "none")``.
    A box's content is returned as written, stripped of surrounding spaces.
    """
    if text is not None and not isinstance(text, str):
        raise TypeError(f"text must be a model's output (a str) or None, got {type(text).__name__}")
    if not text:
        return None, "none"
    tail = text.rsplit(THINK_END, 1)[-1]
    boxes = list(_boxes(tail))
    if boxes:
        content, rule = boxes[-1]
        return _unbox(content), rule
    numbers = _NUMBER.findall(tail)
    if numbers:
        return _canonical_number(numbers[-1]), "last-number"
    return None, "none"


def extract_answer(text: str | None) -> str | None:
    """The final answer of a model output, or None; see ``extract_answer_with_rule`` for the rules."""
    return extract_answer_with_rule(text)[0]


# ------------------------------------------------------------------ normalisation

_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_COMMANDS = r"\\(?:text|textbf|textit|textrm|mathrm|mbox|mathbf)"
_WHOLE_TEXT = re.compile(rf"^{_TEXT_COMMANDS}\s*\{{(.*)\}}$", re.DOTALL)
_TRAILING_UNITS = re.compile(rf"(?<=\S)\s*{_TEXT_COMMANDS}\s*\{{[^{{}}]*\}}\s*$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_INTEGER = re.compile(r"^-?\d+$")
_SPACING = re.compile(r"\\[,;:! ]|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\u00b0|\\degree(?![A-Za-z])")
_CHOICE = re.compile(r"^\(([A-Z])\)$|^([A-Z])\)$")


def _strip_wrappers(text: str) -> str:
    changed = True
    while changed:
        changed = False
        for opening, closing in _WRAPPERS:
            if len(text) > len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
                text = text[len(opening) : -len(closing)].strip()
                changed = True
        match = _BOX.match(text)
        if match and text.endswith("}"):
            unboxed = _unbox(text)
            if unboxed != text:
                text, changed = unboxed, True
            else:
                boxes = list(_boxes(text))
                brace = text.find("{", match.end())
                if len(boxes) == 1 and brace >= 0 and _matching_brace(text, brace) == len(text) - 1:
                    text, changed = boxes[0][0], True
    return text


def _collapse_spaces(text: str) -> str:
    """Drop whitespace except where it ends a command name before a letter (``\\pi r`` is not ``\\pir``)."""

    def keep(match: re.Match) -> str:
        before, after = match.string[: match.start()], match.string[match.end() : match.end() + 1]
        return " " if after.isalpha() and re.search(r"\\[A-Za-z]+$", before) else ""

    return re.sub(r"\s+", keep, text)


def normalize_answer(answer: str | float | None) -> str | None:
    """A MATH-style canonical surface form of an answer (None for nothing).

    Removes what does not change the value: surrounding ``$``/``\\(\\)``/a whole box,
    spaces and spacing commands, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` (to
    ``\\frac``), degrees, a trailing ``.``, units in a trailing ``\\text{}``, ``\\%``
    and ``\\$``, thousands separators of a plain number; turns the unicode minus into
    ``-`` and ``\\text{(A)}``/``(A)``/``A.`` into ``A``.
    """
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, numbers.Number)):  # a gold answer may be a number
        raise TypeError(f"an answer must be text, a number or None, got {type(answer).__name__}: {answer!r}")
    text = str(answer).strip().replace("\u2212", "-")
    text = _strip_wrappers(text)
    text = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", text)
    text = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", text)
    text = _DEGREES.sub("", text)
    text = _SPACING.sub(" ", text)
    text = re.sub(r"\\?%|\\\$|^\$", "", text).strip()
    whole = _WHOLE_TEXT.match(text)
    if whole and _matching_brace(text, text.index("{")) == len(text) - 1:
        text = whole.group(1).strip()  # \text{(A)}, \text{Monday}: the text is the answer
    else:
        text = _TRAILING_UNITS.sub("", text)  # 5\text{ cm}: the units are not
    text = _collapse_spaces(text).rstrip(".")
    text = text.replace("{,}", ",")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    choice = _CHOICE.match(text)
    if choice:
        text = choice.group(1) or choice.group(2)
    return text or None


# ------------------------------------------------------------------ equivalence


def _as_number(text: str) -> Fraction | None:
    if _INTEGER.match(text) or re.match(r"^-?\d+\.\d+$", text):
        return Fraction(text)
    return None


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Whether ``predicted`` is the same answer as ``gold`` (None never matches).

    Both are normalised (``normalize_answer``); equal forms match at once, plain
    numbers are compared exactly, and everything else goes to math-verify's
    ``verify(parse(gold), parse(predicted))`` on the answers wrapped in ``\\boxed{}``
    (the form its LaTeX extraction reliably finds). math-verify's timeouts use
    ``SIGALRM``, which only the main thread may set, so other threads run without them.
    """
    predicted, gold = normalize_answer(predicted), normalize_answer(gold)
    if predicted is None or gold is None:
        return False
    if predicted == gold:
        return True
    numbers = _as_number(predicted), _as_number(gold)
    if None not in numbers:
        return numbers[0] == numbers[1]
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))
