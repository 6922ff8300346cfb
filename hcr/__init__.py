"""hcr: research tools for hidden capacity reasoning.

The research layer (data, models, training, generation, command line) on top of
the ops in ``hcr_kernels``. Run ``hcr demo`` for a whole hidden-capacity experiment
(offline, minutes on a CPU), ``hcr --help`` for the commands.

Names are imported lazily (``hcr.CompressionModel`` loads transformers only when
first used), so ``import hcr`` and the command line stay fast.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CompressionTokens": "hcr.compression.tokens",
    "add_compression_tokens": "hcr.compression.tokens",
    "tokenize_trace": "hcr.compression.traces",
    "tokenize_dataset": "hcr.compression.traces",
    "ExampleConfig": "hcr.compression.examples",
    "build_compression_example": "hcr.compression.examples",
    "build_compression_examples": "hcr.compression.examples",
    "CompressionExampleDataset": "hcr.compression.examples",
    "CompressionCollator": "hcr.compression.collator",
    "tiny_tokenizer": "hcr.compression.tiny_tokenizer",
    "EmbedPooler": "hcr.compression.pooler",
    "CompressionModel": "hcr.compression.model",
    "CompressionConfig": "hcr.compression.model",
    "build_compression_model": "hcr.compression.train",
    "train_compressor": "hcr.compression.train",
    "LoraSettings": "hcr.compression.settings",
    "PoolerSettings": "hcr.compression.settings",
    "TrainSettings": "hcr.compression.settings",
    "CompressedGenerator": "hcr.generation.generator",
    "GenerationOutput": "hcr.generation.generator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hcr' has no attribute {name!r}")
