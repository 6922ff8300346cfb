"""Tokenizers for the doublethink tasks: a built-in word-level one, local HF ones, and the check.

Why a check: the experiment measures computation per token, so every operation, every
value and the newline marker must be exactly one token, whatever tokenizer is used.
The built-in tokenizer needs no hub; GPT-2 /
GPT-NeoX tokenizers are loaded from a local path only (no machine here reaches a hub).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from hcr.doublethink.tasks import MODULUS, OPERATIONS, TaskGenerator, direct_texts, doublethink_texts

__all__ = [
    "ANSWER_MARKER",
    "PAD_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "answer_marker_id",
    "build_tokenizer",
    "check_tokenizer",
    "load_tokenizer",
]

ANSWER_MARKER = "\n"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
CHECK_LENGTH = 99  # operations in the sample task that ``check_tokenizer`` encodes


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: pad, eos, unk, newline, the values 0-4 and the seven operations.

    Spaces separate words and are dropped; the newline is its own token. It saves and
    loads like any HF tokenizer (``save_pretrained`` / ``AutoTokenizer.from_pretrained``).
    """
    words = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, ANSWER_MARKER, *map(str, range(MODULUS)), *OPERATIONS]
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n"), "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN, padding_side="right"
    )


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The built-in tokenizer (``path`` None or ``"builtin"``) or a local one (a GPT-2 / GPT-NeoX folder).

    A tokenizer without a pad token pads with its eos token; right
    padding is forced, since the losses find each example's last real token from the mask.
    The result is checked with ``check_tokenizer``.
    """
    if path is None or str(path) == "builtin":
        tokenizer = build_tokenizer()
    else:
        if not Path(path).exists():
            raise FileNotFoundError(
                f"tokenizer path {str(path)!r} does not exist; give a local folder saved with save_pretrained "
                "(no model hub is reachable here) or 'builtin'"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer at {str(path)!r} has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
    check_tokenizer(tokenizer)
    return tokenizer


def answer_marker_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the newline that ends the prompt (looked up, never hard-coded)."""
    ids = _encode(tokenizer, ANSWER_MARKER)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer must encode the answer marker {ANSWER_MARKER!r} as one token, got ids {ids}")
    return ids[0]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, length: int = CHECK_LENGTH) -> None:
    """Raise ``ValueError`` unless each operation, value and the marker is exactly one token.

    Checks, without special tokens: ``" op op"`` is two equal tokens for every operation,
    ``" v"`` one token for every value, the newline one token, a doublethink prompt of
    ``length`` operations ``length + 1`` tokens and its target ``2 * length + 2``, a direct
    task ``length`` tokens on each side. The message names the word that breaks it.
    """
    marker = answer_marker_id(tokenizer)
    for word in [*OPERATIONS, *map(str, range(MODULUS))]:
        ids = _encode(tokenizer, f" {word} {word}")
        if len(ids) != 2 or ids[0] != ids[1]:
            pieces = tokenizer.convert_ids_to_tokens(_encode(tokenizer, f" {word}"))
            raise ValueError(
                f"the tokenizer must encode the word {word!r} (after a space) as exactly one token, "
                f"but it gives {pieces}; doublethink needs one token per operation and value"
            )
        if ids[0] == marker or ids[0] == tokenizer.pad_token_id:
            raise ValueError(f"the word {word!r} shares its token id {ids[0]} with the marker or the pad token")
    task = TaskGenerator(seed=0).task(length)
    expected = {
        "doublethink prompt": (doublethink_texts(task)[0], length + 1),
        "doublethink target": (doublethink_texts(task)[1], 2 * length + 2),
        "direct input": (direct_texts(task)[0], length),
        "direct labels": (direct_texts(task)[1], length),
    }
    for what, (text, count) in expected.items():
        got = len(_encode(tokenizer, text))
        if got != count:
            raise ValueError(f"the tokenizer encodes a {what} of {length} operations as {got} tokens, expected {count}")


