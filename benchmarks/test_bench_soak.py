"""Soak: batch 8 x 16,384 new tokens through the compressed-generation fast path, on CPU.

Why: a long run is where a leak, a cache that outgrows its bound or a per-step cost
that grows with what was written shows up. The tiny Qwen2 and 1-layer pooler of
``test_bench_generation.py`` (W = 10, k = 4, 32-token random prompts, greedy, no EOS
so every row writes all its tokens), the ``native`` backend, one timed run.

Run: ``pytest benchmarks/test_bench_soak.py --benchmark-only -s`` (``-s`` shows the
summary line); ``HCR_SOAK_TOKENS=1024`` for a quick smoke run (default 16384).

How it is observed without touching the library: a forward hook on the base model's
rotary embedding, which every step calls once whichever way it runs (``direct_forward``
and its native Qwen2 step included, so the soak times the default fast path), fires
once per step (the prefill, then one token per row per step, a compression step
included), stamps the time and, every 64 steps and at the last one, reads the process
RSS (``/proc/self/statm``) and the cache length the step reached (largest position + 1;
the rows move in lockstep here). Sampling inside the run, not after it, keeps the end
point before ``generate()`` frees its cache. (Until 2026-12-05 the hook sat on the base
model, which made every step go through the model's own forward.) A hook on the lm_head
masks ``</think>``'s logit: the untrained model writes it at random within 16k greedy
tokens, after which a row stops compressing (by design) and its layout grows freely.

Cache bound. A row writes n tokens; after each token, once its uncompressed tail holds
W + k tokens, the oldest W are pooled into one slot, so the tail never exceeds
W + k - 1 when fed, and the last token is never fed. Hence a row compresses exactly
m = floor((n - 1 - k) / W) windows and its cached layout never exceeds
``prompt + 2 markers + m + (W + k - 1)`` (1,684 slots at n = 16,384 against 16,418
uncompressed). Asserted: every row's ``peak_cache_length`` <= that bound, its
compressions == m (one slot per window, nothing else grows), and every stop reason is
``max_new_tokens`` (the bound fits ``max_position_embeddings``, so none is ``context``).

Reported, not asserted (this machine is shared and noisy), with their targets: RSS
at 10 % of the run and at the end (target: flat), tokens/s over the first 10 % of
steps after a 256-step warm-up and over the last 10 % (median over chunks of W steps,
each holding one compression; target: end >= 0.9 x start), the cache curve's ends.
First full run (1 thread, shared machine): cache 204 -> 1,684 = bound, RSS flat
(1,380 -> 1,380 MiB, when the cache was still allocated up front for prompt + n + 4
slots, ~10x what is used), but 858 -> 292 tok/s (0.34x): the layout still grows one
slot per window, and with hidden 256 attention over 1.7k slots outweighs the matmuls.
2026-12-02 (AVX-512, 2 threads; cache grown on demand from 1,688 slots, attention of
decode and re-encode steps through hcr_kernels.decode_attention): RSS 948 -> 951 MiB,
1,032 -> 595 tok/s (0.58x); with decode_attention's key blocks: 1,154 -> 671 (0.58x);
and its value prefetch: 1,177 -> 793 (0.67x), RSS 911 -> 913 MiB, 143 s; and its key
prefetch (two runs, a slower hour: 150 and 151 s): 1,576 -> 759 (0.48x), 1,077 -> 714
(0.66x), RSS 910 -> 912 MiB: the start rate's spread between runs hides the change.
Why 0.9x is out of reach here: the summary line also prints the bytes a decode step
reads at each end (weights + keys and values); for this 16 MiB model they grow ~3x
over the run, so a step bound by bandwidth alone would end at ~1/3 of its start speed.
The 0.67x measured is above that only because the first steps are not bandwidth-bound.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hcr.compression.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from hcr.compression.train import PoolerSettings, build_compression_model  # noqa: E402
from hcr.generation import CompressedGenerator  # noqa: E402

BATCH, PROMPT, W, K = 8, 32, 10, 4
NEW = int(os.environ.get("HCR_SOAK_TOKENS", "16384"))
CONTEXT = 8192
SAMPLE_EVERY = 64
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def test_soak(benchmark, tmp_path):
    windows = max(0, (NEW - 1 - K) // W)
    bound = PROMPT + 2 + windows + W + K - 1
    assert bound < CONTEXT, "the compressed layout must fit the context, or rows stop with reason 'context'"
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=CONTEXT)).eval()
    model = build_compression_model(base, tokenizer, W, pooler=PoolerSettings(num_hidden_layers=1), lora=None).eval()
    generator = CompressedGenerator(model, tokenizer, keep_last=K)
    ids = torch.randint(20, 500, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []
    samples: dict[int, tuple[float, int]] = {}  # step -> (RSS MiB, cache length reached)

    def stamp(module, args, output):  # the rotary embedding's forward(x, position_ids), once per step
        stamps.append(time.perf_counter())
        step = len(stamps) - 1  # 0: the prefill; step i feeds token i
        if step % SAMPLE_EVERY == 0 or step == NEW - 1:
            samples[step] = (rss_mib(), int(args[1].max()) + 1)

    def keep_reasoning(module, args, logits):  # every row keeps reasoning, and compressing
        logits[..., generator.tokens.think_end] = float("-inf")

    def run():
        stamps.clear(), samples.clear()
        handles = [model.base.model.rotary_emb.register_forward_hook(stamp),
                   model.base.lm_head.register_forward_hook(keep_reasoning)]
        try:
            return generator.generate(ids, max_new_tokens=NEW, eos_token_id=-1, return_dict_in_generate=True)
        finally:
            for handle in handles:
                handle.remove()

    benchmark.group = f"soak, tiny Qwen2, batch {BATCH}, {NEW} new tokens, W={W} k={K}"
    # first a short generation: the generator checks its direct step against the model's own forward at its first
    # decode step (both call the rotary embedding), and the automatic kernel choices are measured, outside the run
    generator.generate(ids, max_new_tokens=16, eos_token_id=-1)
    result = benchmark.pedantic(run, rounds=1, iterations=1)

    tenth, warm = NEW // 10, min(256, NEW // 10)

    def rate(first: int, last: int) -> float:  # tokens/s, median over chunks of W steps in [first, last]
        return BATCH * W / statistics.median(stamps[i + W] - stamps[i] for i in range(first, last - W + 1, W))

    start, end = rate(warm, warm + tenth), rate(NEW - 1 - tenth, NEW - 1)
    s0 = min(s for s in samples if s >= max(warm, tenth))
    (rss0, cache0), (rss1, cache1) = samples[s0], samples[NEW - 1]
    # What a decode step must read at each end: the base model's weights (all of them, an upper bound: the
    # embedding lookup reads 8 rows) and every layer's keys and values up to the cache length reached.
    config = base.config
    weights_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    kv_bytes_per_slot = 2 * config.num_hidden_layers * BATCH * config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads) * 4
    kv0, kv1 = cache0 * kv_bytes_per_slot / 2**20, cache1 * kv_bytes_per_slot / 2**20
    bytes_ratio = (weights_mib + kv0) / (weights_mib + kv1)
    info = dict(backend="native", count=BATCH * NEW, weights_mib=round(weights_mib, 1), kv_mib_start=round(kv0, 1),
                kv_mib_end=round(kv1, 1), bytes_ratio=round(bytes_ratio, 3), unit="tokens", peak_mb=round(max(r for r, _ in samples.values()), 1),
                peak_cache=result.peak_cache_length, cache_bound=bound, compressions=result.compressions,
                cache_curve={s0: cache0, NEW - 1: cache1}, rss_start_mb=round(rss0, 1), rss_end_mb=round(rss1, 1),
                rss_growth_mb=round(rss1 - rss0, 1), tok_s_start=round(start), tok_s_end=round(end),
                tok_s_ratio=round(end / start, 3), seconds=round(result.seconds, 1),
                split={k: round(v, 2) for k, v in result.time_split.items()})
    benchmark.extra_info.update(info)
    print(f"\nsoak {BATCH}x{NEW}: peak cache {max(result.peak_cache_length)} (bound {bound}), cache "
          f"{cache0} -> {cache1} slots, RSS {rss0:.1f} -> {rss1:.1f} MiB (step {s0} -> {NEW - 1}), "
          f"{start:,.0f} -> {end:,.0f} tok/s ({end / start:.2f}x, target >= 0.9), {result.seconds:.1f} s, "
          f"split {info['split']}; a decode step reads {weights_mib:.1f} MiB of weights + {kv0:.1f} -> {kv1:.1f} MiB "
          f"of keys and values: a step bound by bandwidth alone would run {bytes_ratio:.2f}x as fast at the end")

    assert len(stamps) == NEW, "one step per token: the prefill, then one per token fed"
    assert result.stop_reasons == ["max_new_tokens"] * BATCH
    assert result.compressions == [windows] * BATCH, ("one slot per window of W tokens", result.compressions)
    assert all(peak <= bound for peak in result.peak_cache_length), (result.peak_cache_length, bound)
    assert max(cache0, cache1) <= bound
