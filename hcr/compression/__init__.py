"""Compressing a reasoning model's chain of thought: tokens, traces, training examples."""

from hcr.compression.collator import CompressionCollator
from hcr.compression.examples import (
    IGNORE_INDEX,
    CompressionExampleDataset,
    ExampleConfig,
    build_compression_example,
    build_compression_examples,
    stage_count,
)
from hcr.compression.layout import CompressedLayout, compressed_layout, compressed_length
from hcr.compression.tiny_tokenizer import arithmetic_trace, tiny_tokenizer
from hcr.compression.tokens import CompressionTokens, MissingTokenError, add_compression_tokens
from hcr.compression.traces import (
    Content,
    MissingThinkEndError,
    TokenizedTrace,
    tokenize_dataset,
    tokenize_trace,
)

__all__ = [
    "IGNORE_INDEX",
    "CompressionCollator",
    "CompressedLayout",
    "CompressionExampleDataset",
    "CompressionTokens",
    "Content",
    "ExampleConfig",
    "MissingThinkEndError",
    "MissingTokenError",
    "TokenizedTrace",
    "add_compression_tokens",
    "arithmetic_trace",
    "build_compression_example",
    "build_compression_examples",
    "compressed_layout",
    "compressed_length",
    "stage_count",
    "tiny_tokenizer",
    "tokenize_dataset",
    "tokenize_trace",
]
