"""The public names: ``hcr``'s top level (lazily imported, each the object of its home module), and every
module's ``__all__`` (complete, so ``import *`` and the docs see the whole API)."""

import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

import hcr
import hcr_kernels

pytest.importorskip("transformers")


def test_compressed_generator_is_exported_at_the_top_level():
    from hcr.generation.generator import CompressedGenerator, GenerationOutput

    assert hcr.CompressedGenerator is CompressedGenerator and hcr.GenerationOutput is GenerationOutput


@pytest.mark.parametrize("name", hcr.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(hcr, name) is getattr(importlib.import_module(hcr._EXPORTS[name]), name)


def _modules_with_all():
    """Every module of ``hcr`` and ``hcr_kernels`` whose source declares ``__all__`` (found without importing
    the others, some of which need optional backends)."""
    for package in (hcr, hcr_kernels):
        for info in [None, *pkgutil.walk_packages(package.__path__, package.__name__ + ".")]:
            name = package.__name__ if info is None else info.name
            origin = importlib.util.find_spec(name).origin
            if origin and origin.endswith(".py") and "__all__" in Path(origin).read_text():
                yield name


def test_every_all_is_complete():
    missing = {}
    for name in _modules_with_all():
        module = importlib.import_module(name)
        public = {attribute for attribute, value in vars(module).items()
                  if not attribute.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
                  and value.__module__ == name}
        gaps = public - set(module.__all__)
        if gaps:
            missing[name] = sorted(gaps)
    assert not missing, f"public names missing from __all__: {missing}"
