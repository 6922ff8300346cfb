"""Compressed generation on CPU: the cached fast path, the recompute oracle and plain generate().

A tiny Qwen2 (hidden 256, 4 layers, intermediate 1024; the built-in tokenizer's
512-token vocabulary) with a 1-layer pooler, W = 10, k = 4 (the seed's setting),
32-token prompts, greedy, no EOS (every row writes all its tokens). Backends:

* ``native``: the fast path as a user gets it by default (static ragged cache,
  ``decode_linear`` for the few-row matmuls, eager, decode and re-encode steps as one
  native Qwen2 step where the attention kernel wins);
* ``compiled``: the same with ``compile_decode=True`` (compiled once in the fixture;
  the compile time goes to ``extra_info``, not into the timed runs);
* ``no-kernels``: the eager fast path with ``decode_kernels=False`` (two cases: what
  the decode kernel adds);
* ``model-forward``: the eager fast path with ``direct_forward=False`` (each step through
  transformers' own forward; interleaved only: what ``direct_forward`` adds);
* ``reference``: the recompute oracle (batch 1 only: it re-encodes everything every step);
* ``generate``: transformers' ``generate()`` on the same base without compression;
* ``generate-decode-linears`` (interleaved only): the same ``generate()`` inside
  ``hcr_kernels.decode_linears(base)``, as a user of plain transformers generation would
  route its linears (target: never slower than ``generate``).

Targets: fast path >= 0.8x generate()'s tokens/s while compressing, >= 10x the oracle
at 1024 new tokens. The time split (decode / pooling / re-encode / other) and the peak
cache length go to ``extra_info``. Each case is one timed run, after the other paths of
its group: ``test_generation_interleaved`` times the fast path, the same through the
model's own forward, without decode kernels, and ``generate()`` without and inside ``decode_linears``
alternating (``interleaved.py``), the ratios to trust on a shared machine. ``test_generation_real_vocabulary``: the same model with R1-Distill-Qwen's
151,936-token vocabulary, batch 8 of 256-token prompts, 64 new tokens, where the lm_head
outweighs the rest; the fast path (logits at each row's last position only), the same
with every position's logits (``keeps_logits = False``, as before 2026-12-04) and
``generate()``, alternating. With a GPU, two cases also run on it (``cuda`` in
the test id), for reference: a model this small is launch-bound there.
"""

from __future__ import annotations

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hcr.compression.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from hcr.compression.train import PoolerSettings, build_compression_model  # noqa: E402
from hcr.generation import CompressedGenerator  # noqa: E402
from hcr_kernels import decode_linears  # noqa: E402
from interleaved import record_interleaved  # noqa: E402

PROMPT = 32
CASES = [(1, 128), (1, 1024), (1, 2048), (8, 128), (8, 512), (8, 2048)]
ORACLE_CASES = [(1, 128), (1, 1024)]
NO_KERNEL_CASES = [(1, 1024), (8, 512)]
GPU_CASES = [(1, 1024), (8, 512)]
INTERLEAVED_CASES = [(1, 512), (8, 256)]
INTERLEAVED_ROUNDS = 4
REAL_VOCABULARY = 151936  # R1-Distill-Qwen's
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def prompt_ids(batch: int, device) -> torch.Tensor:
    return torch.randint(20, 500, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)


def tiny_models(tokenizer, vocab_size: int):
    """The benchmark's tiny Qwen2 (seeded) with ``vocab_size`` tokens, and its compression model (1-layer pooler)."""
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=4096)).eval()
    model = build_compression_model(base, tokenizer, 10, pooler=PoolerSettings(num_hidden_layers=1), lora=None)
    return base, model.eval()


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    base, model = tiny_models(tokenizer, len(tokenizer))
    model = model.to(request.param)
    generators = {
        "native": CompressedGenerator(model, tokenizer, keep_last=4),
        "compiled": CompressedGenerator(model, tokenizer, keep_last=4, compile_decode=True),
        "no-kernels": CompressedGenerator(model, tokenizer, keep_last=4, decode_kernels=False),
        "model-forward": CompressedGenerator(model, tokenizer, keep_last=4, direct_forward=False),
    }
    began = time.perf_counter()
    for batch in (1, 8):  # compiles the prefill, decode and re-encode graphs for both batch sizes
        generators["compiled"].generate(prompt_ids(batch, request.param), max_new_tokens=40, eos_token_id=-1)
    return base, generators, time.perf_counter() - began


def generation_run(base, generators, backend: str, ids: torch.Tensor, new: int):
    """A call writing ``new`` tokens per row of ``ids`` through ``backend`` (see the module docstring)."""
    if backend in ("generate", "generate-decode-linears"):
        def generate():
            return base.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        def run():
            if backend == "generate":
                return generate()
            with decode_linears(base):
                return generate()
    else:
        generator = generators.get(backend, generators["native"])
        strategy = "recompute" if backend == "reference" else "cache"

        def run():
            return generator.generate(ids, max_new_tokens=new, eos_token_id=-1, strategy=strategy,
                                      return_dict_in_generate=True)
    return run


@pytest.mark.parametrize("batch,new", INTERLEAVED_CASES, ids=[f"B{b}-{n}-new" for b, n in INTERLEAVED_CASES])
def test_generation_interleaved(benchmark, setup, batch, new):
    """The fast path, through the model's own forward, without decode kernels, and generate() without and
    inside ``decode_linears``, alternating (``interleaved.py``)."""
    base, generators, _ = setup
    if base.device.type == "cuda":
        pytest.skip("interleaved on the CPU only")
    ids = prompt_ids(batch, "cpu")
    benchmark.group = f"generation interleaved, tiny Qwen2, batch {batch}, {new} new tokens, W=10 k=4"
    benchmark.extra_info.update(count=batch * new, unit="tokens")
    paths = {backend: generation_run(base, generators, backend, ids, new)
             for backend in ("native", "model-forward", "no-kernels", "generate", "generate-decode-linears")}
    record_interleaved(benchmark, paths, rounds=INTERLEAVED_ROUNDS, baselines=["model-forward", "no-kernels", "generate"])


def test_generation_real_vocabulary(benchmark, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    base, model = tiny_models(tokenizer, REAL_VOCABULARY)
    generators = {"native": CompressedGenerator(model, tokenizer, keep_last=4),
                  "all-logits": CompressedGenerator(model, tokenizer, keep_last=4)}
    generators["all-logits"].keeps_logits = False
    batch, prompt, new = 8, 256, 64
    ids = torch.randint(20, 500, (batch, prompt), generator=torch.Generator().manual_seed(0))
    benchmark.group = (f"generation interleaved, tiny Qwen2 with a {REAL_VOCABULARY:,}-token vocabulary, batch {batch}, "
                       f"{prompt}-token prompts, {new} new tokens, W=10 k=4")
    benchmark.extra_info.update(count=batch * new, unit="tokens")
    paths = {backend: generation_run(base, generators, backend, ids, new)
             for backend in ("native", "all-logits", "generate")}
    record_interleaved(benchmark, paths, rounds=3, baselines=["all-logits", "generate"])


@pytest.mark.parametrize("batch,new", CASES, ids=[f"B{b}-{n}-new" for b, n in CASES])
@pytest.mark.parametrize("backend", ["generate", "native", "compiled", "no-kernels", "reference"])
def test_generation(benchmark, setup, backend, batch, new):
    if backend == "reference" and (batch, new) not in ORACLE_CASES:
        pytest.skip("the oracle is timed at batch 1 only (it re-encodes everything every step)")
    if backend == "no-kernels" and (batch, new) not in NO_KERNEL_CASES:
        pytest.skip("the fast path without decode kernels is timed in two cases only")
    base, generators, compile_seconds = setup
    device = base.device.type
    if device == "cuda" and (batch, new) not in GPU_CASES:
        pytest.skip("on the GPU only a few cases run, for reference")
    ids = prompt_ids(batch, device)
    benchmark.group = f"generation{' on GPU' if device == 'cuda' else ''}, tiny Qwen2, batch {batch}, {new} new tokens, W=10 k=4"
    benchmark.extra_info.update(backend=backend, count=batch * new, unit="tokens")
    result = benchmark.pedantic(generation_run(base, generators, backend, ids, new), rounds=1,
                                warmup_rounds=1 if new <= 128 else 0)
    if backend != "generate":
        benchmark.extra_info.update(peak_cache=max(result.peak_cache_length),
                                    split={k: round(v, 3) for k, v in result.time_split.items()})
    if backend == "compiled":
        benchmark.extra_info.update(compile_seconds=round(compile_seconds, 1))
