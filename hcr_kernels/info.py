"""Environment report: ``python -m hcr_kernels.info``.

What was built, what this machine has, and which backend each op will use for
CPU and CUDA tensors here (the same choice the ops make at call time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from hcr_kernels import _dispatch, _extension, autotune, cpu_isa
from hcr_kernels.causal_conv1d import BACKEND_CHECKS as CAUSAL_CONV1D_BACKENDS
from hcr_kernels.cpu_identity import cpu_identity
from hcr_kernels.cross_entropy import BACKEND_CHECKS as CROSS_ENTROPY_BACKENDS
from hcr_kernels.decode_attention import BACKEND_CHECKS as DECODE_ATTENTION_BACKENDS
from hcr_kernels.decode_linear import BACKEND_CHECKS as DECODE_LINEAR_BACKENDS
from hcr_kernels.decoder_step import BACKEND_CHECKS as DECODER_STEP_BACKENDS
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
    "decode_attention": DECODE_ATTENTION_BACKENDS,
    "qwen2_decoder_step": DECODER_STEP_BACKENDS,
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
        "cpu": cpu_identity(),
        "cpu_threads": torch.get_num_threads(),
        "extension_loaded": _extension.extension_loaded(),
        "extension_error": str(_extension.import_error()) if _extension.import_error() else None,
        "extension_cpu": build["cpu"],
        "extension_cuda": build["cuda"],
        "extension_cuda_runtime": build.get("cuda_runtime_version"),
        "extension_cuda_skipped": build.get("cuda_skipped_reason"),
        "cpu_isa": cpu_isa.active_cpu_isa(),
        "cpu_isas_supported": list(cpu_isa.supported_cpu_isas()),
        "autotune": autotune.enabled(),
        "autotune_cache": str(autotune.cache_path()),
        "autotune_decisions": autotune.cached_decisions(),
        "env": {name: os.environ.get(name) for name in (_dispatch.BACKEND_ENV_VAR, cpu_isa.CPU_ISA_ENV_VAR,
                                                         autotune.AUTOTUNE_ENV_VAR, "TRITON_INTERPRET")},
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
        f"  cpu             {info['cpu']}",
        f"  cpu threads     {info['cpu_threads']}",
        f"  extension _C    {'loaded' if info['extension_loaded'] else 'NOT LOADED: ' + str(info['extension_error'])}",
        f"    CPU kernels   {'yes' if info['extension_cpu'] else 'no'}",
        f"    CUDA kernels  {'yes (CUDA runtime %d.%d)' % (cuda_rt // 1000, cuda_rt % 1000 // 10) if info['extension_cuda'] else 'no'}"
        f"{' (skipped at build: ' + info['extension_cuda_skipped'] + ')' if info['extension_cuda_skipped'] else ''}",
        f"    CPU ISA       {info['cpu_isa'] or '-'} (this CPU: {', '.join(info['cpu_isas_supported']) or '-'}; "
        f"{cpu_isa.CPU_ISA_ENV_VAR} chooses)",
        f"  autotune        {'on' if info['autotune'] else 'off'}, {len(info['autotune_decisions'])} measured "
        f"choices cached for this machine in {info['autotune_cache']}",
        "  environment     " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in info["env"].items()),
        "  backend per op (automatic choice):",
    ]
    width = max(map(len, info["backends"]))
    for op, per_device in info["backends"].items():
        choices = ", ".join(f"{device}: {backend}" for device, backend in per_device.items())
        lines.append(f"    {op:<{width}} {choices}")
    return "\n".join(lines)


def _splice_batch(batch: int, length: int, dim: int, window: int, generator: torch.Generator):
    """A compressed batch: one block of placeholder slots per row, about a third of it."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    slots = length // 3
    mask[:, length // 10 : length // 10 + slots] = True
    template = torch.randn(batch, length, dim, generator=generator)
    hidden = torch.randn(batch * slots, window, dim, generator=generator, requires_grad=True)
    return template, mask, hidden


def bench_pool_scatter(batch: int = 8, length: int = 1024, dim: int = 1536, window: int = 2,
                       repeats: int = 5) -> dict[str, float]:
    """Median seconds of one pool_scatter forward + backward (grad to the pooled hidden states) per CPU backend.

    A quick look at whether the native kernels pay off on this machine; the
    benchmark suite (``pytest benchmarks/ --benchmark-only``) is the real measurement.
    """
    from hcr_kernels import pool_scatter

    template, mask, hidden = _splice_batch(batch, length, dim, window, torch.Generator().manual_seed(0))
    grad_out = torch.ones_like(template)
    results = {}
    for backend in ["reference"] + (["native"] if collect()["extension_cpu"] else []):
        timings = []
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            out = pool_scatter(template, mask, hidden, backend=backend)
            torch.autograd.grad(out, [hidden], grad_out)
            timings.append(time.perf_counter() - start)
        results[backend] = statistics.median(timings[1:])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcr_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="also time pool_scatter forward+backward per backend")
    parser.add_argument("--batch", type=int, default=8, help="benchmark: sequences in the batch (default 8)")
    parser.add_argument("--length", type=int, default=1024, help="benchmark: tokens per sequence (default 1024)")
    parser.add_argument("--dim", type=int, default=1536, help="benchmark: hidden size (default 1536)")
    parser.add_argument("--window", type=int, default=2, help="benchmark: tokens per window (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="benchmark: timed repeats (default 5)")
    parser.add_argument("--gpu", action="store_true",
                        help="also compile every Triton kernel for sm_80/sm_90 and read the CUDA extension's cubins "
                             "(no GPU needed): registers, spills, shared memory")
    args = parser.parse_args(argv)
    print(report())
    if args.gpu:
        from hcr_kernels import cuda_resources, triton_aot

        print("\nTriton kernels compiled ahead of time (ptxas -v):")
        print(triton_aot.format_table(triton_aot.compile_isolated()))
        print("\nCUDA extension kernels (cuobjdump --dump-resource-usage):")
        reason = cuda_resources.unavailable_reason()
        if reason is None:
            try:
                print(cuda_resources.format_table(cuda_resources.collect()))
            except RuntimeError as error:  # e.g. a cuobjdump older than the nvcc that built the cubins
                reason = str(error).splitlines()[0]
        if reason is not None:
            print(f"  none: {reason}")
    if args.bench:
        print(f"\npool_scatter forward+backward, fp32, B={args.batch} T={args.length} D={args.dim} W={args.window} "
              f"(median of {args.repeats}):")
        results = bench_pool_scatter(args.batch, args.length, args.dim, args.window, args.repeats)
        for backend, seconds in results.items():
            print(f"  {backend:<10} {seconds * 1e3:8.2f} ms   {results['reference'] / seconds:5.2f}x vs reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
