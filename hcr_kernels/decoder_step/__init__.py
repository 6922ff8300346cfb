"""qwen2_decoder_step: a cached step of a Qwen2 decoder stack, every layer in one native call.

A small model's decode step on a CPU is mostly Python between its ops: the tiny
benchmark model (4 layers, hidden 256) runs ~30 ATen ops per layer, each wrapped in a
few microseconds of interpreter and dispatch around a kernel of one or two. The native
op runs the same ops in the same order in C++ (the norms and rotary embedding as ATen
ops, the projections through ``decode_linear`` where its row buckets say, the cache
write through ``ragged_cache_write_``, the attention through ``decode_attention``), so
its output and cache writes are bit for bit those of the reference, which makes the same
calls from Python.

Backends: ``reference`` (the same ops called from Python: the oracle), ``native`` (the
compiled extension, CPU; fp32, bf16, fp16). Inference only. ``hcr.generation``'s
``direct_forward`` takes it for a step whose layers are all plain (no hooks, LoRA or
replaced modules) and whose attention takes the native kernel.
"""

from hcr_kernels.decoder_step.op import BACKEND_CHECKS, NATIVE_DTYPES, Qwen2DecoderStack, Qwen2LayerWeights
from hcr_kernels.decoder_step.reference import REFERENCE_OPS, StepOps, qwen2_decoder_step_ref

__all__ = ["Qwen2DecoderStack", "Qwen2LayerWeights", "qwen2_decoder_step_ref", "StepOps", "REFERENCE_OPS",
           "BACKEND_CHECKS", "NATIVE_DTYPES"]
