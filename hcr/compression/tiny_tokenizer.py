"""A small byte-level BPE tokenizer with the R1-Distill-Qwen template's special tokens.

No model hub is reachable from the test machines, so tests and the offline demo
use this one: trained (deterministically, in about a second) on a built-in
corpus of arithmetic reasoning traces, saved and loaded like any Hugging Face
tokenizer. Byte-level BPE on purpose: merges across part boundaries happen, as
with the real tokenizer, so code that assumes part lengths add up fails here too.
"""

from __future__ import annotations

import random
from pathlib import Path

from hcr.compression.tokens import COMPRESSION_TOKENS, TEMPLATE_TOKENS

PAD = "<|endoftext|>"
SPECIAL_TOKENS = (PAD,) + TEMPLATE_TOKENS + COMPRESSION_TOKENS
VOCAB_SIZE = 512


def arithmetic_trace(rng: random.Random) -> tuple[str, str]:
    """A (question, answer-with-think) pair in the R1 style, about adding small numbers."""
    numbers = [rng.randint(1, 99) for _ in range(rng.randint(2, 5))]
    question = "What is " + " plus ".join(map(str, numbers)) + "?"
    steps, total = [], 0
    for number in numbers:
        steps.append(f"Adding {number} to {total} gives {total + number}.")
        total += number
    reasoning = "Okay, so I need to add these numbers. " + " ".join(steps) + f" So the sum is {total}."
    return question, f"<think>\n{reasoning}\n</think>\n\nThe answer is {total}."


def corpus(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        question, answer = arithmetic_trace(rng)
        texts.extend([question, answer])
    return texts


def build_tiny_tokenizer(texts=None, vocab_size: int = VOCAB_SIZE):
    """Train the tokenizer on ``texts`` (default: the built-in arithmetic corpus), as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus() if texts is None else texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=TEMPLATE_TOKENS[0],
        eos_token=TEMPLATE_TOKENS[1],
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, TEMPLATE_TOKENS[0], TEMPLATE_TOKENS[1])],
    )


def tiny_tokenizer(path: str | Path | None = None, texts=None, vocab_size: int = VOCAB_SIZE):
    """The tiny tokenizer, loaded from ``path`` if it was saved there, else built (and saved to ``path``).

    ``texts`` trains it on another corpus (the demo's own task), ``vocab_size`` sets its size.
    """
    from transformers import PreTrainedTokenizerFast

    if path is not None and (Path(path) / "tokenizer.json").exists():
        # not AutoTokenizer: beside a Qwen2 config.json, transformers 5 would load it as a Qwen2Tokenizer,
        # whose pre-tokenizer splits digits, and the ids would differ from the ones it was trained to give
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer = build_tiny_tokenizer(texts, vocab_size)
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer
