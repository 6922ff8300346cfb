"""Test setup shared by every test module.

* Without a GPU, Triton kernels run in the interpreter on CPU tensors; that must
  be switched on before ``triton`` is imported, so it happens here, first.
* Fresh allocations are filled with NaN (torch's deterministic mode fills
  ``torch.empty``), so an output element a kernel never writes is caught.
* Seeds are fixed; tests marked ``gpu`` are skipped without a CUDA device.
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_nan_fill():
    torch.manual_seed(0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
