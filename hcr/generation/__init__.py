"""Generation with the model compressing its own reasoning as it goes."""

from hcr.generation.cache import RaggedStaticCache
from hcr.generation.generator import STRATEGIES, CompressedGenerator, GenerationOutput

__all__ = ["STRATEGIES", "CompressedGenerator", "GenerationOutput", "RaggedStaticCache"]
