"""Compressing a reasoning model's chain of thought: tokens, traces, training examples; the model, the
pooler and their training (imported on first use: they load transformers and peft)."""

import importlib

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

# Names imported on first use: they load transformers and peft, which the names above do not need.
_LAZY = {
    "EmbedPooler": "hcr.compression.pooler",
    "CompressionConfig": "hcr.compression.model",
    "CompressionModel": "hcr.compression.model",
    "build_compression_model": "hcr.compression.train",
    "load_traces": "hcr.compression.train",
    "train_compressor": "hcr.compression.train",
    "LoraSettings": "hcr.compression.settings",
    "PoolerSettings": "hcr.compression.settings",
    "TrainSettings": "hcr.compression.settings",
}
__all__ += sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hcr.compression' has no attribute {name!r}")
