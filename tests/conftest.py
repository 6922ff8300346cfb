"""Test setup shared by every test module.

* Without a GPU, Triton kernels run in the interpreter on CPU tensors; that must
  be switched on before ``triton`` is imported, so it happens here, first.
* Fresh allocations are filled with NaN (torch's deterministic mode fills
  ``torch.empty``), so an output element a kernel never writes is caught.
* Seeds are fixed; tests marked ``gpu`` are skipped without a CUDA device.
* Measured backend choices (``hcr_kernels.autotune``) are cached in a fresh folder
  per test session, never in the user's cache.
* A test that uses the ``cpu_isa`` fixture runs once per instruction set this CPU
  has (``hcr_kernels.cpu_isa``): an AVX-512 machine tests all three native paths.
"""

import atexit
import os
import shutil
import tempfile

import torch

_CACHE_DIR = tempfile.mkdtemp(prefix="hcr-test-cache-")
os.environ["HCR_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hcr_kernels.cpu_isa import supported_cpu_isas, use_cpu_isa  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_nan_fill():
    torch.manual_seed(0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def pytest_generate_tests(metafunc):
    if "cpu_isa" in metafunc.fixturenames:
        isas = supported_cpu_isas() or ("none",)  # without the extension the native tests skip themselves
        metafunc.parametrize("cpu_isa", isas, indirect=True, ids=[f"isa-{isa}" for isa in isas])


@pytest.fixture
def cpu_isa(request):
    """The native CPU kernels run with this instruction set during the test.

    Tests of ops with other backends than native run once, with the best ISA: the ISA
    changes nothing else.
    """
    isa = request.param
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    if backend not in (None, "native") and isa != supported_cpu_isas()[0]:
        pytest.skip(f"the {backend} backend does not depend on the CPU ISA")
    if isa == "none":
        yield isa
        return
    with use_cpu_isa(isa):
        yield isa


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
