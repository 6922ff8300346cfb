"""The special tokens of compressed reasoning, resolved from a tokenizer by name.

Ids are never hard-coded: a user with the real DeepSeek-R1-Distill-Qwen tokenizer
gets its ids (``<|fim_pad|>`` 151662, ``<|vision_start|>`` 151652, ``<|vision_end|>``
151653, ``</think>`` 151649, ``<｜end▁of▁sentence｜>`` 151643); the tests' tiny
tokenizer gets its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PLACEHOLDER = "<|fim_pad|>"
BLOCK_START = "<|vision_start|>"
BLOCK_END = "<|vision_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# Every special token the R1-Distill-Qwen chat template and the compression layout use.
TEMPLATE_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END)
COMPRESSION_TOKENS = (PLACEHOLDER, BLOCK_START, BLOCK_END)


# Any of these marks a folder a tokenizer can be loaded from (fast, slow BPE, sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(base: str, tokenizer: str | None = None):
    """``AutoTokenizer`` of ``tokenizer``, by default ``base``'s (the commands' ``--tokenizer`` / ``--base``).

    A local folder without tokenizer files is an error naming the option: transformers would build an
    empty tokenizer from the folder's model config, and the first token looked up would be reported
    missing (a saved model, ``hcr demo``'s reasoner, keeps its tokenizer elsewhere).
    """
    from transformers import AutoTokenizer

    source, option = (tokenizer, "--tokenizer") if tokenizer else (base, "--base")
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES):
        hint = "" if tokenizer else "; pass --tokenizer with the folder or name of its tokenizer"
        raise FileNotFoundError(f"{option} {source}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)})"
                                + hint)
    return AutoTokenizer.from_pretrained(source)


class MissingTokenError(ValueError):
    """The tokenizer lacks a special token the compression layout needs."""


def token_id(tokenizer, token: str) -> int:
    """The id of ``token`` as one whole token of ``tokenizer``, or a MissingTokenError."""
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or (unk is not None and ids[0] == unk and token != tokenizer.unk_token):
        raise MissingTokenError(
            f"the tokenizer has no token {token!r}; add the compression tokens with "
            f"hcr.add_compression_tokens(tokenizer) (and resize the model's embeddings)"
        )
    return ids[0]


@dataclass(frozen=True)
class CompressionTokens:
    """Ids of the tokens the compressed layout is made of."""

    placeholder: int
    block_start: int
    block_end: int
    think_start: int
    think_end: int
    bos: int
    eos: int
    user: int
    assistant: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "CompressionTokens":
        if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"tokenizer must be a transformers tokenizer (its ids are looked up by token), got "
                            f"{type(tokenizer).__name__}")
        return cls(
            placeholder=token_id(tokenizer, PLACEHOLDER),
            block_start=token_id(tokenizer, BLOCK_START),
            block_end=token_id(tokenizer, BLOCK_END),
            think_start=token_id(tokenizer, THINK_START),
            think_end=token_id(tokenizer, THINK_END),
            bos=token_id(tokenizer, BOS),
            eos=token_id(tokenizer, EOS),
            user=token_id(tokenizer, USER),
            assistant=token_id(tokenizer, ASSISTANT),
        )

    @property
    def markers(self) -> tuple[int, int]:
        return self.block_start, self.block_end


def add_compression_tokens(tokenizer) -> int:
    """Add every template and compression token the tokenizer lacks; returns how many were added.

    Resize the model's embeddings afterwards (``model.resize_token_embeddings(len(tokenizer))``).
    """
    missing = []
    for token in TEMPLATE_TOKENS + COMPRESSION_TOKENS:
        try:
            token_id(tokenizer, token)
        except MissingTokenError:
            missing.append(token)
    if not missing:
        return 0
    return tokenizer.add_tokens(missing, special_tokens=True)
