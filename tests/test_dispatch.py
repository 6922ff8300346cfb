"""Backend choice: argument > HCR_BACKEND > fastest available > reference."""

import pytest
import torch

from hcr_kernels import _dispatch

CPU = torch.device("cpu")


def available(device):
    return None


def unavailable(device):
    raise RuntimeError("backend 'native' is not available: rebuild")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(_dispatch.BACKEND_ENV_VAR, raising=False)


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV_VAR, "native")
    checks = {"reference": available, "native": available}
    assert _dispatch.choose_backend("op", CPU, "reference", checks) == "reference"
    assert _dispatch.choose_backend("op", CPU, None, checks) == "native"


def test_automatic_choice_prefers_fastest_and_falls_back_silently():
    assert _dispatch.choose_backend("op", CPU, None, {"reference": available, "native": available}) == "native"
    assert _dispatch.choose_backend("op", CPU, None, {"reference": available, "native": unavailable}) == "reference"


def test_automatic_choice_never_picks_triton_on_cpu():
    checks = {"reference": available, "triton": available}
    assert _dispatch.choose_backend("op", CPU, None, checks) == "reference"


def test_requested_but_unavailable_raises():
    with pytest.raises(RuntimeError, match="rebuild"):
        _dispatch.choose_backend("op", CPU, "native", {"reference": available, "native": unavailable})


def test_environment_request_unavailable_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV_VAR, "native")
    with pytest.raises(RuntimeError, match="rebuild"):
        _dispatch.choose_backend("op", CPU, None, {"reference": available, "native": unavailable})


def test_backend_the_op_lacks_is_named():
    with pytest.raises(ValueError, match="backend 'triton' is not implemented"):
        _dispatch.choose_backend("op", CPU, "triton", {"reference": available})


def test_environment_backend_an_op_lacks_falls_back_to_automatic(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV_VAR, "triton")
    assert _dispatch.choose_backend("op", CPU, None, {"reference": available, "native": available}) == "native"
