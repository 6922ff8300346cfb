"""Environment report: ``python -m hcr_kernels.info``.

What was built, what this machine has, and which backend each op will use for
CPU and CUDA tensors here (the same choice the ops make at call time).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from hcr_kernels import _dispatch, _extension
from hcr_kernels.causal_conv1d import BACKEND_CHECKS as CAUSAL_CONV1D_BACKENDS
from hcr_kernels.cross_entropy import BACKEND_CHECKS as CROSS_ENTROPY_BACKENDS
from hcr_kernels.decode_linear import BACKEND_CHECKS as DECODE_LINEAR_BACKENDS
from hcr_kernels.kv_cache import BACKEND_CHECKS as KV_CACHE_BACKENDS
from hcr_kernels.pool_scatter import BACKEND_CHECKS as POOL_SCATTER_BACKENDS
from hcr_kernels.selective_scan import BACKEND_CHECKS as SELECTIVE_SCAN_BACKENDS

# Every op of the library with its backend checks; later ops add themselves here.
OPS = {
    "window_mean_pool": POOL_SCATTER_BACKENDS,
    "pool_scatter": POOL_SCATTER_BACKENDS,
    "selective_scan": SELECTIVE_SCAN_BACKENDS,
    "causal_conv1d": CAUSAL_CONV1D_BACKENDS,
    "weighted_cross_entropy": CROSS_ENTROPY_BACKENDS,
    "fused_linear_cross_entropy": CROSS_ENTROPY_BACKENDS,
    "ragged_cache_write_": KV_CACHE_BACKENDS,
    "decode_linear": DECODE_LINEAR_BACKENDS,
}


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _backend_for(op: str, checks: dict, device: torch.device) -> str:
    try:
        return _dispatch.choose_backend(op, device, None, checks)
    except (RuntimeError, ValueError) as error:
        return f"error: {error}"


def collect() -> dict:
    """The report as a dict (``report()`` formats it)."""
    build = _extension.build_info()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": _triton_version(),
        "cpu_threads": torch.get_num_threads(),
        "extension_loaded": _extension.extension_loaded(),
        "extension_error": str(_extension.import_error()) if _extension.import_error() else None,
        "extension_cpu": build["cpu"],
        "extension_cuda": build["cuda"],
        "extension_cuda_runtime": build.get("cuda_runtime_version"),
        "env": {name: os.environ.get(name) for name in (_dispatch.BACKEND_ENV_VAR, "TRITON_INTERPRET")},
        "backends": {
            op: {device.type: _backend_for(op, checks, device) for device in devices} for op, checks in OPS.items()
        },
    }


def report() -> str:
    info = collect()
    cuda_rt = info["extension_cuda_runtime"]
    lines = [
        "hcr_kernels environment",
        f"  python          {info['python']} ({info['platform']})",
        f"  torch           {info['torch']} (CUDA build: {info['torch_cuda'] or 'no'}, "
        f"GPU available: {info['cuda_available']}{', ' + info['gpu'] if info['gpu'] else ''})",
        f"  triton          {info['triton']}",
        f"  cpu threads     {info['cpu_threads']}",
        f"  extension _C    {'loaded' if info['extension_loaded'] else 'NOT LOADED: ' + str(info['extension_error'])}",
        f"    CPU kernels   {'yes' if info['extension_cpu'] else 'no'}",
        f"    CUDA kernels  {'yes (CUDA runtime %d.%d)' % (cuda_rt // 1000, cuda_rt % 1000 // 10) if info['extension_cuda'] else 'no'}",
        "  environment     " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in info["env"].items()),
        "  backend per op (automatic choice):",
    ]
    width = max(map(len, info["backends"]))
    for op, per_device in info["backends"].items():
        choices = ", ".join(f"{device}: {backend}" for device, backend in per_device.items())
        lines.append(f"    {op:<{width}} {choices}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcr_kernels.info", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
