"""Compressed generation on CPU: the cached fast path, the recompute oracle and plain generate().

A tiny Qwen2 (hidden 256, 4 layers, intermediate 1024; the built-in tokenizer's
512-token vocabulary) with a 1-layer pooler, W = 10, k = 4 (the seed's setting),
32-token prompts, greedy, no EOS (every row writes all its tokens). ``native`` is
the fast path, ``reference`` the recompute oracle, ``generate`` transformers'
``generate()`` on the same base without compression. Targets: fast path >= 0.8x
generate()'s tokens/s while compressing, >= 10x the oracle at 1024 new tokens.
The fast path's time split (decode / pooling / re-encode) and peak cache length go
to ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hcr.compression.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from hcr.compression.train import PoolerSettings, build_compression_model  # noqa: E402
from hcr.generation import CompressedGenerator  # noqa: E402

PROMPT = 32
CASES = [(1, 128), (1, 1024), (1, 2048), (8, 128), (8, 512)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=4096)).eval()
    model = build_compression_model(base, tokenizer, 10, pooler=PoolerSettings(num_hidden_layers=1), lora=None).eval()
    return base, CompressedGenerator(model, tokenizer, keep_last=4)


@pytest.mark.parametrize("batch,new", CASES, ids=[f"B{b}-{n}-new" for b, n in CASES])
@pytest.mark.parametrize("backend", ["generate", "native", "reference"])
def test_generation(benchmark, setup, backend, batch, new):
    if backend == "reference" and (batch, new) not in ((1, 128), (1, 1024)):
        pytest.skip("the oracle is timed at batch 1 only (it re-encodes everything every step)")
    base, generator = setup
    ids = torch.randint(20, 500, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    benchmark.group = f"generation, tiny Qwen2, batch {batch}, {new} new tokens, W=10 k=4"
    benchmark.extra_info.update(backend=backend, count=batch * new, unit="tokens")
    if backend == "generate":
        def run():
            return base.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    else:
        strategy = "cache" if backend == "native" else "recompute"

        def run():
            return generator.generate(ids, max_new_tokens=new, eos_token_id=-1, strategy=strategy,
                                      return_dict_in_generate=True)
    result = benchmark.pedantic(run, rounds=1, warmup_rounds=1 if new <= 128 else 0)
    if backend == "native":
        benchmark.extra_info.update(peak_cache=max(result.peak_cache_length),
                                    split={k: round(v, 3) for k, v in result.time_split.items()})
