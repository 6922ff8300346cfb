"""Parameter sets shared by the op test modules (readable ids)."""

import pytest
import torch

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

# Backends of ops with a CPU native path and a Triton path (the interpreter on CPU).
NATIVE_AND_TRITON = [
    pytest.param("native", "cpu", id="native-cpu"),
    pytest.param("triton", "cpu", id="triton-interpret"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
]
