"""decode_attention: a decode step's attention over a ragged static KV cache.

A decode step has one query per head per row (a re-encode step a few), so attention
is a matrix-vector product over the cache and its speed is how fast the keys and
values stream. SDPA's CPU kernels read them at about half a plain read's bandwidth at
these shapes, and for more than one query with a mask transformers copies them once
per query head first (``repeat_kv``). The native kernel reads each row's keys and
values once for all the query heads that share them (GQA) and every query of the
step, and takes the visible slots from the queries' positions (cache slot i holds
position i, as in ``hcr.generation``'s ragged cache), so no mask tensor is built.

Backends: ``reference`` (plain PyTorch: the oracle and the fallback), ``native`` (the
compiled extension, CPU; fp32, bf16, fp16). Inference only (no autograd).
``hcr.generation.attention`` routes a model's attention through it during compressed
generation where it was measured faster than the model's own on this machine.
"""

from hcr_kernels.decode_attention.op import BACKEND_CHECKS, BLOCK_QUERIES, NATIVE_DTYPES, chunk_slots, decode_attention
from hcr_kernels.decode_attention.reference import decode_attention_ref

__all__ = ["decode_attention", "decode_attention_ref", "BLOCK_QUERIES", "BACKEND_CHECKS", "NATIVE_DTYPES", "chunk_slots"]
