"""CompressedGenerator: the cached fast path against the recompute oracle, the layout invariant, bad input."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from hcr.compression import CompressionTokens, ExampleConfig, TokenizedTrace, build_compression_example  # noqa: E402
from hcr.compression.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from hcr.compression.train import PoolerSettings, build_compression_model  # noqa: E402
from hcr.generation import CompressedGenerator  # noqa: E402
from hcr.generation.generator import STRATEGIES  # noqa: E402
from hcr.generation.pooling import NativePooling  # noqa: E402
from tiny_bases import tiny_qwen2  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_qwen2(len(tokenizer)).double()


def compression_model(base, tokenizer, window):
    model = build_compression_model(base, tokenizer, window, pooler=PoolerSettings(num_hidden_layers=1), lora=None)
    return model.double().eval()


def prompts(lengths, vocab, seed=0):
    """Left-padded prompts of the given lengths (ordinary tokens only)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(20, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


@pytest.mark.parametrize("window", [1, 2, 3, 10])
@pytest.mark.parametrize("keep_last", [0, 1, 4])
@pytest.mark.parametrize("lengths", [pytest.param((7,), id="batch1"),
                                     pytest.param((5, 9, 3, 12, 1, 6, 8, 4), id="batch8-ragged")])
def test_fast_path_equals_recompute_oracle(base, tokenizer, window, keep_last, lengths):
    model = compression_model(base, tokenizer, window)
    generator = CompressedGenerator(model, tokenizer, keep_last=keep_last)
    for seed in (0, 1):
        ids, mask = prompts(lengths, len(tokenizer), seed)
        kwargs = dict(max_new_tokens=28, eos_token_id=-1, return_dict_in_generate=True)
        fast = generator.generate(ids, mask, strategy="cache", **kwargs)
        oracle = generator.generate(ids, mask, strategy="recompute", **kwargs)
        assert torch.equal(fast.sequences, oracle.sequences)
        assert fast.compressions == oracle.compressions and fast.layouts == oracle.layouts
        # the cache holds the layout but the last token, which was sampled and never fed back
        assert fast.final_cache_length == oracle.final_cache_length == [len(lay) - 1 for lay in fast.layouts]
        assert max(fast.compressions) > 0 or window + keep_last > 28


def test_each_row_gets_what_it_gets_alone(base, tokenizer):
    model = compression_model(base, tokenizer, 3)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    ids, mask = prompts((4, 11, 7), len(tokenizer), seed=3)
    batched = generator.generate(ids, mask, max_new_tokens=20, eos_token_id=-1)
    for row in range(3):
        alone = generator.generate(ids[row : row + 1, mask[row].bool()], max_new_tokens=20, eos_token_id=-1)
        assert torch.equal(batched[row : row + 1], alone)


def test_logits_are_computed_at_each_rows_last_position_only(base, tokenizer):
    """A prefill or re-encode step runs the lm_head at the rows' last fed positions only (over every position,
    a real vocabulary's lm_head outweighs the step); the tokens are those of the full logits."""
    model = compression_model(base, tokenizer, 2)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    assert generator.keeps_logits  # transformers 4.50+
    ids, mask = prompts((5, 9, 3, 12), len(tokenizer), seed=2)
    kwargs = dict(max_new_tokens=20, eos_token_id=-1, return_dict_in_generate=True)
    lm_head_rows = {strategy: [] for strategy in STRATEGIES}
    kept = {}
    for strategy in STRATEGIES:
        hook = base.get_output_embeddings().register_forward_hook(
            lambda module, args, out, seen=lm_head_rows[strategy]: seen.append(tuple(args[0].shape[:-1])))
        try:
            kept[strategy] = generator.generate(ids, mask, strategy=strategy, **kwargs)
        finally:
            hook.remove()
    cached = lm_head_rows["cache"]
    assert cached[0] == (4, 4)  # the prefill of 12 positions: the four prompts' distinct last positions
    assert all(rows[0] == 4 and rows[1] <= 2 for rows in cached[1:])  # decodes, and re-encodes of rows in step
    assert any(rows == (4, 1) for rows in cached[1:]) and max(kept["cache"].compressions) > 0
    assert all(rows == (1, 1) for rows in lm_head_rows["recompute"])  # the oracle: one layout, its last position
    generator.keeps_logits = False  # a model without logits_to_keep: every position's logits, then picked
    for strategy in STRATEGIES:
        full = generator.generate(ids, mask, strategy=strategy, **kwargs)
        assert torch.equal(full.sequences, kept[strategy].sequences)


def test_layout_is_the_training_builders(base, tokenizer):
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    window, keep_last = 2, 1
    model = compression_model(base, tokenizer, window)
    ids, mask = prompts((6, 9), len(tokenizer))
    out = CompressedGenerator(model, tokenizer, keep_last=keep_last).generate(
        ids, mask, max_new_tokens=25, eos_token_id=-1, return_dict_in_generate=True)
    for row, layout in enumerate(out.layouts):
        generated = out.sequences[row].tolist()
        prompt = ids[row][mask[row].bool()].tolist()
        trace_ids = np.array(prompt + generated + [tokens.think_end, tokens.eos], dtype=np.int64)
        end = len(prompt) + len(generated)
        trace = TokenizedTrace(trace_ids, np.zeros(len(trace_ids), np.int8), len(prompt), end, end + 1, end + 1)
        built = build_compression_example(trace, out.compressions[row], tokens, ExampleConfig(window=window))
        assert layout == built["compressed_input_ids"][:-2].tolist()


def scripted(tokens_per_step):
    """A _sample replacement that emits a fixed token sequence (the same for every row)."""
    steps = iter(tokens_per_step)

    def sample(logits, *args):
        return torch.full((logits.shape[0],), next(steps), dtype=torch.long)

    return sample


def test_compression_stops_at_think_end_and_generation_at_eos(base, tokenizer, monkeypatch):
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    model = compression_model(base, tokenizer, 2)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    script = [30, 31, 32, 33, 34, 35, tokens.think_end, 36, 37, 38, 39, 40, tokens.eos, 41]
    monkeypatch.setattr(generator, "_sample", scripted(script))
    out = generator.generate(*prompts((5,), len(tokenizer)), max_new_tokens=20, return_dict_in_generate=True)
    assert out.sequences[0].tolist() == script[:13]  # stops after EOS
    # W + k = 3: (30 31) goes when 32 arrives, (32 33) when 34 arrives; the tail (34 35 </think>) would
    # be due next, but writing </think> ends compression for good
    assert out.compressions == [2]


def test_peak_cache_is_bounded(base, tokenizer):
    window, keep_last, new = 3, 2, 60
    model = compression_model(base, tokenizer, window)
    ids, mask = prompts((10, 4), len(tokenizer))
    out = CompressedGenerator(model, tokenizer, keep_last=keep_last).generate(
        ids, mask, max_new_tokens=new, eos_token_id=-1, return_dict_in_generate=True)
    for row, prompt_length in enumerate((10, 4)):
        assert out.peak_cache_length[row] <= prompt_length + new // window + window + keep_last + 2


def test_sampling_is_reproducible(base, tokenizer):
    model = compression_model(base, tokenizer, 2)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    ids, mask = prompts((5, 8), len(tokenizer))
    runs = [
        generator.generate(ids, mask, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                           eos_token_id=-1, generator=torch.Generator().manual_seed(7), strategy=strategy)
        for strategy in ("cache", "cache", "recompute")
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_streamer_receives_every_token(base, tokenizer):
    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.extend(value.tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    model = compression_model(base, tokenizer, 2)
    out = CompressedGenerator(model, tokenizer, keep_last=1).generate(
        *prompts((5,), len(tokenizer)), max_new_tokens=12, eos_token_id=-1, streamer=streamer)
    assert streamer.tokens == out[0].tolist() and streamer.ended


def test_bad_input(base, tokenizer):
    model = compression_model(base, tokenizer, 2)
    with pytest.raises(ValueError, match="must be a CompressionModel"):
        CompressedGenerator(base, tokenizer)
    with pytest.raises(ValueError, match="window_size must be a positive integer, got 0"):
        CompressedGenerator(model, tokenizer, window_size=0)
    with pytest.raises(ValueError, match="keep_last must be an integer >= 0, got -1"):
        CompressedGenerator(model, tokenizer, keep_last=-1)
    with pytest.raises(ValueError, match="trained on windows of 2"):
        CompressedGenerator(model, tokenizer, window_size=3)
    generator = CompressedGenerator(model, tokenizer)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generator.generate(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="more than the model's context of 256"):
        generator.generate(torch.ones(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="streamer needs batch size 1"):
        generator.generate(torch.ones(2, 3, dtype=torch.long), streamer=object())
    assert generator.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=0).shape == (2, 0)

    ids = torch.ones(2, 3, dtype=torch.long)
    bad_calls = [  # (keyword arguments of generate, what the error says)
        (dict(input_ids=ids.float()), "input_ids must hold integer token ids, got dtype torch.float32"),
        (dict(attention_mask=[[1] * 3] * 2), r"attention_mask must be a tensor of input_ids' shape \(2, 3\), got list"),
        (dict(attention_mask=torch.full((2, 3), -1)), "attention_mask must hold 1 .* and 0 .* only"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0, got 2.5"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 0, got True"),
        (dict(do_sample="no"), "do_sample must be True or False, got 'no'"),
        (dict(do_sample=True, temperature=float("nan")), "temperature must be a positive number, got nan"),
        (dict(do_sample=True, top_k=-1), "top_k must be None or an integer >= 0, got -1"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be None or a number in \(0, 1\], got 1.5"),
        (dict(do_sample=True, top_p=0), r"top_p must be None or a number in \(0, 1\], got 0"),
        (dict(pad_token_id=2.7), r"pad_token_id must be None or a token id \(an int\), got 2.7"),
        (dict(eos_token_id=[]), "eos_token_id must be a token id or a non-empty list of them"),
        (dict(eos_token_id=generator.tokens.placeholder), r"eos_token_id \[\d+\] is a compression token"),
        (dict(strategy=""), "strategy must be one of"),
    ]
    for kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            generator.generate(**{"input_ids": ids, **kwargs})
    for flag in ("compress_answer", "decode_kernels", "compile_decode", "direct_forward"):
        with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'no'"):
            CompressedGenerator(model, tokenizer, **{flag: "no"})
    with pytest.raises(ValueError, match="keep_last must be an integer >= 0, got True"):
        CompressedGenerator(model, tokenizer, keep_last=True)
    for strategy in STRATEGIES:  # an empty batch (an evaluation's empty shard) is no error, in either strategy
        empty = generator.generate(ids[:0], max_new_tokens=4, strategy=strategy, return_dict_in_generate=True)
        assert empty.sequences.shape == (0, 0) and empty.stop_reasons == []

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from hcr.compression import MissingTokenError

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                   unk_token="[UNK]")
    with pytest.raises(MissingTokenError, match="fim_pad"):
        CompressedGenerator(model, bare)


def test_any_of_several_eos_ids_ends_a_row(base, tokenizer):
    """``eos_token_id`` as ``model.generate`` takes it: one id, or a list / tuple / tensor of ids (a list was
    never matched, and the rows ran to max_new_tokens)."""
    generator = CompressedGenerator(compression_model(base, tokenizer, 2), tokenizer)
    ids, mask = prompts((5, 7), len(tokenizer))
    free = generator.generate(ids, mask, max_new_tokens=12, eos_token_id=-1)
    first = free[0, 3].item()  # row 0's fourth token: stop there by naming it among other ids
    for eos in ([-1, first], (first,), torch.tensor([first, -1])):
        out = generator.generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=-7,
                                 return_dict_in_generate=True)
        stop = free[0].tolist().index(first)
        assert out.sequences[0, : stop + 1].tolist() == free[0, : stop + 1].tolist()
        assert out.stop_reasons[0] == "eos" and (out.sequences[0, stop + 1:] == -7).all()


def greedy_with_think_end_at(step: int, think_end: int, seen: list):
    """A _sample replacement: greedy, records every step's logits, and writes </think> at ``step``."""
    counter = iter(range(10**6))

    def sample(logits, *args):
        seen.append(logits.clone())
        tokens = logits.argmax(-1)
        return torch.full_like(tokens, think_end) if next(counter) == step else tokens

    return sample


@pytest.mark.parametrize("window,keep_last,think_step", [(2, 1, 13), (3, 0, 10), (1, 4, 9), (2, 3, 4)])
def test_answer_compression_fast_path_equals_oracle_and_builder(base, tokenizer, monkeypatch, window, keep_last,
                                                                  think_step):
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    model = compression_model(base, tokenizer, window)
    ids, mask = prompts((6, 9, 4), len(tokenizer), seed=5)
    results = {}
    for strategy in ("cache", "recompute"):
        generator = CompressedGenerator(model, tokenizer, keep_last=keep_last, compress_answer=True)
        seen = []
        monkeypatch.setattr(generator, "_sample", greedy_with_think_end_at(think_step, tokens.think_end, seen))
        out = generator.generate(ids, mask, max_new_tokens=30, eos_token_id=-1, strategy=strategy,
                                 return_dict_in_generate=True)
        results[strategy] = (out, seen)
    (fast, fast_logits), (oracle, oracle_logits) = results["cache"], results["recompute"]
    assert torch.equal(fast.sequences, oracle.sequences) and fast.layouts == oracle.layouts
    for a, b in zip(fast_logits, oracle_logits):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    config = ExampleConfig(window=window, compress_answer=True)
    for row in range(3):
        generated = fast.sequences[row].tolist()
        prompt = ids[row][mask[row].bool()].tolist()
        think = generated.index(tokens.think_end)
        trace_ids = np.array(prompt + generated + [tokens.eos], dtype=np.int64)
        start = len(prompt)
        trace = TokenizedTrace(trace_ids, np.zeros(len(trace_ids), np.int8), start, start + think, start + think + 1,
                               start + len(generated))
        assert fast.compressions[row] > think // window  # the answer was compressed too
        built = build_compression_example(trace, fast.compressions[row], tokens, config)
        assert fast.layouts[row] == built["compressed_input_ids"][:-1].tolist()


RAGGED8 = (5, 9, 3, 12, 1, 6, 8, 4)


def test_decode_kernels_in_fp32_give_the_same_tokens(base, tokenizer, monkeypatch):
    """fp32 is where the native decode_linear runs (in float64, as above, every layer takes F.linear).

    Whether it is faster than F.linear for this tiny model is measured per machine; here it is
    made to win every measurement, so the kernel's tokens are what is compared.
    """
    from hcr_kernels import autotune
    from hcr_kernels.decode_linear import patch, takes_native

    monkeypatch.setattr(autotune, "compare", lambda *args: autotune.FASTER)
    autotune.forget()

    native_calls = []

    def spy(input, weight, bias, buckets):
        native_calls.append(takes_native(input.numel() // input.shape[-1], buckets))
        return original(input, weight, bias, buckets)

    original = patch.apply_decode_linear
    monkeypatch.setattr(patch, "apply_decode_linear", spy)
    model = compression_model(copy.deepcopy(base), tokenizer, 3).float()
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=4)
    kwargs = dict(max_new_tokens=30, eos_token_id=-1, return_dict_in_generate=True)
    routed = CompressedGenerator(model, tokenizer, keep_last=1).generate(ids, mask, **kwargs)
    # projections called through their modules took the native kernel (the native stack's calls, decode steps and
    # the pooler's windows, reach it from C++ and are not counted here)
    assert sum(native_calls) > 20
    native_calls.clear()
    plain = CompressedGenerator(model, tokenizer, keep_last=1, decode_kernels=False).generate(ids, mask, **kwargs)
    assert not native_calls
    assert torch.equal(routed.sequences, plain.sequences) and routed.layouts == plain.layouts
    assert not any("forward" in vars(m) for m in model.modules())  # every layer has its own forward back
    autotune.forget()


def test_time_split_is_disjoint_and_outputs_are_plain_tensors(base, tokenizer):
    model = compression_model(base, tokenizer, 2)
    for strategy in ("cache", "recompute"):
        out = CompressedGenerator(model, tokenizer, keep_last=1).generate(
            *prompts((5, 8), len(tokenizer)), max_new_tokens=20, eos_token_id=-1, strategy=strategy,
            return_dict_in_generate=True)
        split = out.time_split
        assert set(split) == {"prefill", "decode", "pooling", "re-encode", "other", "autotune"}
        assert min(split.values()) >= 0 and split["pooling"] > 0 and split["decode"] > 0
        # "other" is what the parts leave of the wall time: parts counted twice would push it below zero
        assert split["other"] > 0 and sum(split.values()) == pytest.approx(out.seconds)
        assert split["re-encode"] > 0  # the steps that compressed (every step re-encodes in the oracle)
        assert not out.sequences.is_inference()  # built outside inference mode: fine to use with autograd


def test_autotune_measurements_are_set_aside(base, tokenizer, monkeypatch, tmp_path):
    """A shape measured for the first time costs the generation ``time_split["autotune"]``, not decode time."""
    import time

    from hcr_kernels import _extension, autotune

    if not _extension.extension_loaded():
        pytest.skip("nothing is measured without the compiled kernels")
    monkeypatch.setenv(autotune.CACHE_DIR_ENV_VAR, str(tmp_path))  # nothing measured yet
    monkeypatch.delenv(autotune.AUTOTUNE_ENV_VAR, raising=False)
    autotune.forget()
    measured, real_measure = [], autotune.measure

    def slow_measure(fast, reference):
        measured.append(0.02)
        time.sleep(0.02)
        return real_measure(fast, reference)

    monkeypatch.setattr(autotune, "measure", slow_measure)
    model = compression_model(copy.deepcopy(base), tokenizer, 2).float()  # fp32: the decode kernels measure
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    kwargs = dict(max_new_tokens=12, eos_token_id=-1, return_dict_in_generate=True)
    first = generator.generate(*prompts((5, 8), len(tokenizer)), **kwargs)
    assert measured and first.time_split["autotune"] >= sum(measured)
    assert sum(first.time_split.values()) == pytest.approx(first.seconds)
    assert first.time_split["decode"] < first.time_split["autotune"]  # the sleeps did not land in a stage
    again = generator.generate(*prompts((5, 8), len(tokenizer)), **kwargs)
    assert again.time_split["autotune"] == 0.0 and torch.equal(again.sequences, first.sequences)
    autotune.forget()


def test_compiled_decode_equals_recompute_oracle(base, tokenizer):
    """compile_decode: prefill, decode and re-encode forwards through torch.compile (dynamic shapes)."""
    from torch._dynamo.utils import counters

    model = compression_model(base, tokenizer, 3)
    generator = CompressedGenerator(model, tokenizer, keep_last=1, compile_decode=True)
    graphs = counters["stats"]["unique_graphs"]
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=2)
    kwargs = dict(max_new_tokens=30, eos_token_id=-1, return_dict_in_generate=True)
    compiled = generator.generate(ids, mask, **kwargs)
    oracle = generator.generate(ids, mask, strategy="recompute", **kwargs)
    assert counters["stats"]["unique_graphs"] > graphs  # it really compiled
    assert torch.equal(compiled.sequences, oracle.sequences)
    assert compiled.layouts == oracle.layouts and min(compiled.compressions) > 0
    again = generator.generate(ids[:, 2:], mask[:, 2:], **dict(kwargs, max_new_tokens=25))  # other sizes, same graphs
    assert torch.equal(again.sequences, generator.generate(ids[:, 2:], mask[:, 2:], strategy="recompute",
                                                           **dict(kwargs, max_new_tokens=25)).sequences)


def test_compile_options_graph_decode_steps_on_cuda_only():
    from hcr.generation.generator import _compile_options, _uses_cuda_graphs

    cpu, cuda = _compile_options(torch.device("cpu")), _compile_options(torch.device("cuda", 0))
    assert cpu == {"dynamic": True} and not _uses_cuda_graphs(cpu)
    assert cuda == {"mode": "reduce-overhead"} and _uses_cuda_graphs(cuda)


def test_graphed_decode_steps_keep_their_shapes_and_cache(base, tokenizer, monkeypatch):
    """The CUDA-graph path's static-shape logic, run on the CPU: with the CUDA options forced and torch.compile
    replaced by a recorder (a CPU has no graph to record), every decode step feeds the same shapes, attends over
    the whole cache and writes to the same static-address cache tensors; the tokens are still the oracle's."""
    from torch._dynamo.utils import get_static_address_type

    from hcr.generation import generator as generator_module

    cuda_options = generator_module._compile_options(torch.device("cuda"))
    monkeypatch.setattr(generator_module, "_compile_options", lambda device: cuda_options)
    calls = []

    def recording_compile(fn, **options):
        def forward(base, embeds, positions, mask, cache, **forward_kwargs):
            tensors = (*cache.keys, *cache.values)
            calls.append({"options": options, "shapes": (embeds.shape, positions.shape, mask.shape),
                          "span": cache.get_seq_length(), "slots": cache.slots,
                          "addresses": [t.data_ptr() for t in tensors],
                          "static": all(get_static_address_type(t) == "unguarded" for t in tensors)})
            return fn(base, embeds, positions, mask, cache, **forward_kwargs)

        return forward

    monkeypatch.setattr(torch, "compile", recording_compile)
    model = compression_model(base, tokenizer, 3)
    generator = CompressedGenerator(model, tokenizer, keep_last=1, compile_decode=True)
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=2)
    kwargs = dict(max_new_tokens=30, eos_token_id=-1, return_dict_in_generate=True)
    graphed = generator.generate(ids, mask, **kwargs)
    oracle = generator.generate(ids, mask, strategy="recompute", **kwargs)
    assert torch.equal(graphed.sequences, oracle.sequences)
    assert graphed.layouts == oracle.layouts and min(graphed.compressions) > 0
    decode = [call for call in calls if call["options"] == cuda_options]
    others = [call for call in calls if call["options"] != cuda_options]  # prefill and re-encode
    assert len(decode) > 10 and others and all(call["options"] == {"dynamic": True} for call in others)
    first = decode[0]
    assert first["shapes"][0][1] == 1 and first["span"] == first["slots"] == first["shapes"][2][-1]
    assert all(call["shapes"] == first["shapes"] and call["span"] == first["span"] for call in decode)
    assert all(call["static"] and call["addresses"] == first["addresses"] for call in calls)


@pytest.mark.gpu
def test_compiled_decode_on_gpu_replays_cuda_graphs(base, tokenizer, monkeypatch):
    """compile_decode on CUDA: the decode steps are recorded as CUDA graphs once and replayed (nothing
    skipped), and the tokens are the oracle's."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    recorded = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def spy(self, new_inputs, function_id):
        recorded.append(function_id)
        return record(self, new_inputs, function_id)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", spy)
    model = compression_model(copy.deepcopy(base), tokenizer, 3).to("cuda")
    generator = CompressedGenerator(model, tokenizer, keep_last=1, compile_decode=True)
    skips = counters["inductor"]["cudagraph_skips"]
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=2)
    kwargs = dict(max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True)
    graphed = generator.generate(ids.cuda(), mask.cuda(), **kwargs)
    oracle = generator.generate(ids.cuda(), mask.cuda(), strategy="recompute", **kwargs)
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert 0 < len(recorded) <= 4  # one graph for the decode steps (about 30 of them), replayed
    assert torch.equal(graphed.sequences, oracle.sequences)
    assert graphed.layouts == oracle.layouts and min(graphed.compressions) > 0


@pytest.mark.gpu
def test_fast_path_equals_recompute_oracle_on_gpu(base, tokenizer):
    """The same equality on CUDA, where the ragged cache write is the extension's CUDA kernel."""
    model = compression_model(copy.deepcopy(base), tokenizer, 3).to("cuda")
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=2)
    kwargs = dict(max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True)
    fast = generator.generate(ids.cuda(), mask.cuda(), strategy="cache", **kwargs)
    oracle = generator.generate(ids.cuda(), mask.cuda(), strategy="recompute", **kwargs)
    assert torch.equal(fast.sequences, oracle.sequences)
    assert fast.layouts == oracle.layouts and min(fast.compressions) > 0


# ----------------------------------------------------------------- reserved tokens, bad ids, context (issue 12)


def rig_compression_logits(model, tokens, value):
    """A hook on the base's lm_head: the compression tokens' logits get ``value`` added (-inf: set, masked by hand)."""
    columns = [tokens.placeholder, tokens.block_start, tokens.block_end]

    def hook(module, args, output):
        output = output.clone()
        output[..., columns] = value if value == float("-inf") else output[..., columns] + value
        return output

    return model.base.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("strategy", ["cache", "recompute"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_compression_tokens_are_never_written(base, tokenizer, strategy, do_sample):
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    reserved = {tokens.placeholder, tokens.block_start, tokens.block_end}
    model = compression_model(base, tokenizer, 2)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    ids, mask = prompts((5, 8), len(tokenizer), seed=8)
    kwargs = dict(max_new_tokens=16, eos_token_id=-1, do_sample=do_sample, top_k=50, top_p=0.9, strategy=strategy,
                  return_dict_in_generate=True)
    runs = []
    for value in (1e4, float("-inf")):
        handle = rig_compression_logits(model, tokens, value)
        try:
            if value > 0:  # the rig works: unmasked, the model would write a compression token
                assert int(model.base(ids[:1]).logits[0, -1].argmax()) in reserved
            runs.append(generator.generate(ids, mask, generator=torch.Generator().manual_seed(3), **kwargs))
        finally:
            handle.remove()
    rigged, by_hand = runs
    assert not reserved & set(rigged.sequences.flatten().tolist())
    assert torch.equal(rigged.sequences, by_hand.sequences)  # the mask changes only those choices
    assert rigged.layouts == by_hand.layouts and max(rigged.compressions) > 0


def test_bad_token_ids_are_named(base, tokenizer):
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    model = compression_model(base, tokenizer, 2)
    generator = CompressedGenerator(model, tokenizer)
    vocab = model.base.get_input_embeddings().num_embeddings
    ids, mask = prompts((4, 6), len(tokenizer), seed=9)
    for bad in (70000, vocab, -3):
        wrong = ids.clone()
        wrong[1, 4] = bad
        message = f"input_ids[1, 4] = {bad} is not a token id of the model (vocab {vocab})"
        with pytest.raises(ValueError, match=re.escape(message)):
            generator.generate(wrong, mask, max_new_tokens=2)
    for token in (tokens.placeholder, tokens.block_start, tokens.block_end):
        wrong = ids.clone()
        wrong[0, 3] = token
        with pytest.raises(ValueError, match=re.escape(f"input_ids[0, 3] = {token} is a compression token")):
            generator.generate(wrong, mask, max_new_tokens=2)
    masked = ids.clone()
    masked[0, :2] = torch.tensor([-1, tokens.block_start])  # under the mask: never read, so allowed
    kwargs = dict(max_new_tokens=3, eos_token_id=-1)
    assert torch.equal(generator.generate(masked, mask, **kwargs), generator.generate(ids, mask, **kwargs))


CONTEXT = 40


@pytest.fixture(scope="module")
def short_base(tokenizer):
    torch.manual_seed(1)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=CONTEXT)
    return transformers.Qwen2ForCausalLM(config).double().eval()


def generate_both(generator, ids, mask, **kwargs):
    """Both strategies, each warning once at most about the context; checks they agree, returns the cache one."""
    outs, warned = {}, []
    for strategy in ("cache", "recompute"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            outs[strategy] = generator.generate(ids, mask, eos_token_id=-1, strategy=strategy,
                                                return_dict_in_generate=True, **kwargs)
        warned.append(sum("stopped at the model's context" in str(w.message) for w in record))
    fast, oracle = outs["cache"], outs["recompute"]
    assert torch.equal(fast.sequences, oracle.sequences) and fast.layouts == oracle.layouts
    assert fast.stop_reasons == oracle.stop_reasons and fast.compressions == oracle.compressions
    assert fast.final_cache_length == oracle.final_cache_length
    assert warned[0] == warned[1] == int("context" in fast.stop_reasons)
    return fast


@pytest.mark.parametrize("window,keep_last", [(10, 4), (2, 1), (1, 0), (3, 2)])
def test_generation_stops_at_the_models_context(short_base, tokenizer, window, keep_last):
    model = compression_model(short_base, tokenizer, window)
    generator = CompressedGenerator(model, tokenizer, keep_last=keep_last)
    ids, mask = prompts((30,), len(tokenizer), seed=6)
    out = generate_both(generator, ids, mask, max_new_tokens=80)
    assert out.stop_reasons == ["context"]
    written = out.sequences.shape[1]
    assert len(out.layouts[0]) <= CONTEXT and out.peak_cache_length[0] < CONTEXT
    assert out.final_cache_length[0] == len(out.layouts[0]) - 1
    if window + keep_last > CONTEXT - 30:  # nothing compressed: exactly the 10 tokens that fit
        assert written == CONTEXT - 30 and out.compressions == [0] and len(out.layouts[0]) == CONTEXT
    elif window == 1:  # W = 1 shortens nothing and its block's two markers take room
        assert written == CONTEXT - 30 - 2 and out.compressions[0] > 0 and len(out.layouts[0]) == CONTEXT
    else:  # the compressed layout is shorter, so the same context holds more tokens
        assert written > CONTEXT - 30 and out.compressions[0] > 0
        # the last token stays uncompressed (it is never fed back); compressing it would have left no room
        assert len(out.layouts[0]) >= CONTEXT - 2


def test_stop_reasons_per_row(short_base, tokenizer, monkeypatch):
    model = compression_model(short_base, tokenizer, 10)
    generator = CompressedGenerator(model, tokenizer, keep_last=4)
    ids, mask = prompts((30, 5, CONTEXT), len(tokenizer), seed=7)
    out = generate_both(generator, ids, mask, max_new_tokens=12, pad_token_id=-5)
    assert out.stop_reasons == ["context", "max_new_tokens", "context"]  # a full prompt leaves room for nothing
    assert out.sequences.shape == (3, 12) and (out.sequences[2] == -5).all() and (out.sequences[0, 10:] == -5).all()
    assert out.layouts[2] == ids[2].tolist()
    short = ids[1:2, mask[1].bool()]
    assert generator.generate(short, max_new_tokens=0, return_dict_in_generate=True).stop_reasons == [
        "max_new_tokens"]
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    monkeypatch.setattr(generator, "_sample", scripted([30, 31, tokens.eos, 32]))
    out = generator.generate(short, max_new_tokens=10, return_dict_in_generate=True)
    assert out.stop_reasons == ["eos"] and out.sequences[0].tolist() == [30, 31, tokens.eos]


def test_layout_length_counts_the_layout(base, tokenizer):
    from hcr.generation.generator import RowState

    tokens = CompressionTokens.from_tokenizer(tokenizer)
    for window in (1, 2, 3):
        generator = CompressedGenerator(compression_model(base, tokenizer, window), tokenizer, compress_answer=True)
        for windows, think_at, answer_windows in ((0, None, 0), (2, None, 0), (2, 7, 0), (0, 7, 1), (1, 7, 2)):
            generated = list(range(40, 60))
            if think_at is not None:
                generated[think_at] = tokens.think_end
            row = RowState(prompt=[30, 31, 32], generated=generated, reasoning_windows=windows, think_at=think_at,
                           answer_windows=answer_windows)
            assert generator._layout_length(row) == len(generator.layout(row))


@pytest.fixture(scope="module")
def models_by_window(base, tokenizer):
    return {window: compression_model(base, tokenizer, window) for window in (1, 2, 3)}


@settings(max_examples=80, deadline=None)
@given(window=st.sampled_from((1, 2, 3)), keep_last=st.integers(0, 3), compress_answer=st.booleans(),
       prompt=st.integers(1, 4), written=st.lists(st.integers(0, 6), min_size=1, max_size=40))
def test_compress_decision_returns_the_slot_the_layout_changed_from(models_by_window, tokenizer, window, keep_last,
                                                                     compress_answer, prompt, written):
    """The crop slot a compression returns is the first position where the layout differs from the one
    the cache would hold had the token only been decoded; no compression, no difference."""
    from hcr.generation.generator import RowState

    generator = CompressedGenerator(models_by_window[window], tokenizer, keep_last=keep_last,
                                    compress_answer=compress_answer)
    row = RowState(prompt=list(range(30, 30 + prompt)))
    for choice in written:
        token = generator.tokens.think_end if choice == 0 else 40 + choice
        decoded = generator.layout(row) + [token]
        row.generated.append(token)
        crop = generator._write(row, token, eos=(-1,), max_new_tokens=10**6, context=generator._context)
        layout = generator.layout(row)
        if crop is None:
            assert layout == decoded
        else:
            changed = next(i for i, (a, b) in enumerate(zip(layout, decoded)) if a != b)
            assert crop == changed <= len(decoded) - 1  # within what the cache holds: all but the new token


def sliding_base(tokenizer, sliding_window):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=256, use_sliding_window=sliding_window is not None,
                                      sliding_window=sliding_window, max_window_layers=1)
    return transformers.Qwen2ForCausalLM(config).double().eval()


def test_sliding_window_layers_attend_within_their_window(tokenizer):
    """A config with sliding-attention layers: the cached path builds their windowed mask, as the model
    itself does in the recompute oracle, and the window changes what is generated."""
    sliding = sliding_base(tokenizer, 5)
    assert sliding.config.layer_types == ["full_attention", "sliding_attention"]
    generator = CompressedGenerator(compression_model(sliding, tokenizer, 2), tokenizer, keep_last=1)
    assert generator.layer_types == ("full_attention", "sliding_attention")
    ids, mask = prompts((6, 9, 3), len(tokenizer), seed=4)
    kwargs = dict(max_new_tokens=24, eos_token_id=-1, return_dict_in_generate=True)
    fast = generator.generate(ids, mask, strategy="cache", **kwargs)
    oracle = generator.generate(ids, mask, strategy="recompute", **kwargs)
    assert torch.equal(fast.sequences, oracle.sequences) and fast.layouts == oracle.layouts
    full = sliding_base(tokenizer, None)
    full.load_state_dict(sliding.state_dict())
    unwindowed = CompressedGenerator(compression_model(full, tokenizer, 2), tokenizer, keep_last=1)
    assert unwindowed.layer_types == ("full_attention",)
    assert not torch.equal(unwindowed.generate(ids, mask, strategy="cache", **kwargs).sequences, fast.sequences)


def test_attention_kinds_without_a_mask_here_are_refused():
    from types import SimpleNamespace

    from hcr.generation.generator import attention_layer_types

    assert attention_layer_types(SimpleNamespace()) is None  # transformers < 4.53: the one 4D mask
    assert attention_layer_types(SimpleNamespace(layer_types=["full_attention"] * 3)) == ("full_attention",)
    with pytest.raises(ValueError, match=r"chunked_attention.*builds masks for"):
        attention_layer_types(SimpleNamespace(layer_types=["full_attention", "chunked_attention"]))
    with pytest.raises(ValueError, match="no sliding_window"):
        attention_layer_types(SimpleNamespace(layer_types=["sliding_attention"], sliding_window=None))
    with pytest.raises(ValueError, match="layer_types"):
        attention_layer_types(SimpleNamespace(use_sliding_window=True, sliding_window=8))


def test_ragged_cache_grow_keeps_what_was_written():
    from hcr.generation import RaggedStaticCache

    cache = RaggedStaticCache(2, 3, 2, 5, 4, dtype=torch.float64, device="cpu")
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn_like(tensor))
    before = [tensor.clone() for tensor in (*cache.keys, *cache.values)]
    cache.grow(12)
    assert cache.slots == 12
    for old, new in zip(before, (*cache.keys, *cache.values)):
        assert new.shape == (3, 2, 12, 4) and torch.equal(new[:, :, :5], old) and not new[:, :, 5:].any()
    cache.grow(7)  # never shrinks
    assert cache.slots == 12 and cache.keys[0].shape[2] == 12


@pytest.mark.parametrize("compress_answer", [False, True])
def test_cache_starts_small_and_grows_as_layouts_lengthen(base, tokenizer, monkeypatch, compress_answer):
    """A cache started at one slot past the longest prompt grows by doubling (never past the bound) and
    still gives the oracle's tokens; by default it starts near what a compressing row holds, not at
    prompt + every new token."""
    from hcr.generation import RaggedStaticCache
    from hcr.generation import generator as generator_module

    grown, allocated = [], []
    grow, for_model = RaggedStaticCache.grow, RaggedStaticCache.for_model.__func__

    def recording_grow(self, slots):
        grown.append((self.slots, slots))
        grow(self, slots)

    def recording_for_model(cls, model, batch, slots):
        allocated.append(slots)
        return for_model(cls, model, batch, slots)

    monkeypatch.setattr(RaggedStaticCache, "grow", recording_grow)
    monkeypatch.setattr(RaggedStaticCache, "for_model", classmethod(recording_for_model))
    model = compression_model(base, tokenizer, 3)
    generator = CompressedGenerator(model, tokenizer, keep_last=1, compress_answer=compress_answer)
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=5)
    kwargs = dict(max_new_tokens=60, eos_token_id=-1, return_dict_in_generate=True)
    default = generator.generate(ids, mask, **kwargs)
    bound = max(RAGGED8) + 60 + 4
    assert allocated == [max(RAGGED8) + 4 + 60 // 3 + 3 + 1] and allocated[0] < bound
    with monkeypatch.context() as patch:
        patch.setattr(generator_module, "_initial_slots", lambda longest, *rest: longest + 1)
        tiny = generator.generate(ids, mask, **kwargs)
    oracle = generator.generate(ids, mask, strategy="recompute", **kwargs)
    assert torch.equal(tiny.sequences, oracle.sequences) and tiny.layouts == oracle.layouts
    assert torch.equal(default.sequences, oracle.sequences)
    assert len(grown) >= 2 and all(new > old and (new >= 2 * old or new == bound) for old, new in grown)
    assert all(new <= bound for _, new in grown)


@pytest.mark.parametrize("sliding_window", [None, 5], ids=["full", "sliding5"])
def test_decode_attention_route_gives_the_oracles_tokens(tokenizer, monkeypatch, sliding_window):
    """fp32, where the native decode attention runs (made to win every measurement here): decode and re-encode
    steps take it, prefills keep the model's attention, and the tokens are the recompute oracle's and those
    of a generator without hcr's kernels. The config's attention implementation is restored."""
    from hcr_kernels import autotune
    from hcr_kernels.decode_attention import native
    from hcr_kernels.decoder_step import native as native_step

    monkeypatch.setattr(autotune, "compare", lambda *args: autotune.FASTER)
    steps_seen = []  # the query steps of each layer's call of the kernel

    def spy(query, *args):
        steps_seen.append(query.shape[2])
        return original(query, *args)

    def step_spy(embeds, *args):  # the native step: every layer's attention through the kernel, in C++
        steps_seen.extend([embeds.shape[1]] * model.base.config.num_hidden_layers)
        return original_step(embeds, *args)

    original, original_step = native.decode_attention, native_step.qwen2_decoder_step
    monkeypatch.setattr(native, "decode_attention", spy)
    monkeypatch.setattr(native_step, "qwen2_decoder_step", step_spy)
    # the pooler's forward, whose attention is not the base's (its native pass: tests/test_native_pooling.py)
    monkeypatch.setattr(NativePooling, "for_model", lambda model: None)
    model = compression_model(sliding_base(tokenizer, sliding_window), tokenizer, 3).float()
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=4)
    kwargs = dict(max_new_tokens=30, eos_token_id=-1, return_dict_in_generate=True)
    routed = CompressedGenerator(model, tokenizer, keep_last=1).generate(ids, mask, **kwargs)
    layers = model.base.config.num_hidden_layers
    # 29 cached steps after the prefill (the last token is never fed): decode steps and re-encodes (rows compress
    # every few steps at W = 3, k = 1) of at most 16 / G = 8 queries take the kernel, in every layer
    assert steps_seen.count(1) >= layers and any(steps > 1 for steps in steps_seen)
    assert len(steps_seen) >= layers * 25 and len(steps_seen) % layers == 0
    assert max(steps_seen) < max(RAGGED8)  # no prefill
    assert model.base.config._attn_implementation == "sdpa"
    steps_seen.clear()
    plain = CompressedGenerator(model, tokenizer, keep_last=1, decode_kernels=False).generate(ids, mask, **kwargs)
    oracle = CompressedGenerator(model, tokenizer, keep_last=1).generate(ids, mask, strategy="recompute", **kwargs)
    assert not steps_seen
    assert torch.equal(routed.sequences, plain.sequences) and torch.equal(routed.sequences, oracle.sequences)
    assert routed.layouts == plain.layouts == oracle.layouts


def test_decode_attention_route_with_rows_that_finish_first(tokenizer, monkeypatch):
    """Rows that end early (EOS) keep feeding filler queries at positions past their slots; where such a row
    holds the longest cache those positions pass the step's span. The kernel (made to win every measurement)
    must still give the tokens of a generator without hcr's kernels and of the oracle (it had raised
    'positions[...] must be a slot of the cache' in `hcr demo`)."""
    from hcr_kernels import autotune

    monkeypatch.setattr(autotune, "compare", lambda *args: autotune.FASTER)
    model = compression_model(sliding_base(tokenizer, None), tokenizer, 3).float()
    ids, mask = prompts(RAGGED8, len(tokenizer), seed=4)
    longest = max(range(len(RAGGED8)), key=RAGGED8.__getitem__)
    kwargs = dict(max_new_tokens=30, return_dict_in_generate=True)
    unbounded = CompressedGenerator(model, tokenizer, keep_last=1).generate(ids, mask, eos_token_id=-1, **kwargs)
    eos = int(unbounded.sequences[longest, ids.shape[1] + 3])  # the longest row ends within 4 new tokens
    routed = CompressedGenerator(model, tokenizer, keep_last=1).generate(ids, mask, eos_token_id=eos, **kwargs)
    plain = CompressedGenerator(model, tokenizer, keep_last=1, decode_kernels=False).generate(
        ids, mask, eos_token_id=eos, **kwargs)
    oracle = CompressedGenerator(model, tokenizer, keep_last=1).generate(
        ids, mask, eos_token_id=eos, strategy="recompute", **kwargs)
    assert (routed.sequences[longest, ids.shape[1]:] == eos).nonzero()[0].item() <= 3
    assert torch.equal(routed.sequences, plain.sequences) and torch.equal(routed.sequences, oracle.sequences)


def test_decode_attention_route_is_measured_and_restores_the_config(base, tokenizer, monkeypatch):
    """Without a forced win the route is measured (a decision per shape class, cached), and an error in the
    middle of a generation leaves the model's own attention implementation in its config."""
    from hcr_kernels import autotune

    autotune.forget()
    model = compression_model(copy.deepcopy(base), tokenizer, 2).float()
    ids, mask = prompts((5, 9), len(tokenizer), seed=1)
    kwargs = dict(max_new_tokens=12, eos_token_id=-1)
    CompressedGenerator(model, tokenizer, keep_last=1).generate(ids, mask, **kwargs)
    decisions = {k: v for k, v in autotune.cached_decisions().items() if k.startswith("decode_attention")}
    assert any("T=1 " in key for key in decisions), decisions
    assert all(v["fast_s"] > 0 and v["reference_s"] > 0 for v in decisions.values())
    assert model.base.config._attn_implementation == "sdpa"

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(CompressedGenerator, "_write", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        CompressedGenerator(model, tokenizer, keep_last=1).generate(ids, mask, **kwargs)
    assert model.base.config._attn_implementation == "sdpa"
    autotune.forget()
