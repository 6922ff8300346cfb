"""The top-level names of ``hcr``: lazily imported, each the object of its home module."""

import importlib

import pytest

import hcr

pytest.importorskip("transformers")


def test_compressed_generator_is_exported_at_the_top_level():
    from hcr.generation.generator import CompressedGenerator, GenerationOutput

    assert hcr.CompressedGenerator is CompressedGenerator and hcr.GenerationOutput is GenerationOutput


@pytest.mark.parametrize("name", hcr.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(hcr, name) is getattr(importlib.import_module(hcr._EXPORTS[name]), name)
