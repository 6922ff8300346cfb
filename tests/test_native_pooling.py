"""NativePooling: the pooler's pass over a step's windows as one native Qwen2 step, against the pooler's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from hcr.compression.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from hcr.compression.train import LoraSettings, PoolerSettings, build_compression_model  # noqa: E402
from hcr.generation import CompressedGenerator  # noqa: E402
from hcr.generation.pooling import NativePooling  # noqa: E402
from hcr_kernels import _extension, autotune, decode_linears  # noqa: E402
from param_sets import assert_close_by_rule  # noqa: E402
from tiny_bases import tiny_qwen2  # noqa: E402

pytestmark = pytest.mark.skipif(not _extension.extension_loaded(), reason="needs the compiled kernels")



# ops of a layer from the attention's output on whose result a 16-bit pass rounds to its dtype: the attention
# output, o_proj, the residual add, the norm, gate, up, the activation, its product with up, down, the add
ROUNDINGS_PER_LAYER = 10


def assert_close_to_the_forward(native, reference, model):
    """The tolerance rule (``param_sets.tolerance``) for the longest reduction of a layer, the MLP's down
    projection: only the attention's sums run in another order than SDPA's. In fp32 every later op carries
    that difference at fp32's precision. In bf16 the attention's output may round to the other side of a
    bf16 step (half a step of itself) and every later rounding may do the same: the rule's intermediate
    rounding term, once per rounding after the first attention (``ROUNDINGS_PER_LAYER`` per layer)."""
    config = model.pooler.config
    rounded = {} if native.dtype == torch.float32 else dict(
        rounded_to=native.dtype, condition=ROUNDINGS_PER_LAYER * config.num_hidden_layers)
    assert_close_by_rule(native, reference, config.intermediate_size, what="hidden states", **rounded)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_qwen2(len(tokenizer))


def compression_model(base, tokenizer, window, dtype=torch.float32, **pooler):
    model = build_compression_model(copy.deepcopy(base), tokenizer, window, lora=None,
                                    pooler=PoolerSettings(num_hidden_layers=2, **pooler))
    return model.to(dtype).eval()


@pytest.fixture
def fresh_autotune(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_DIR_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV_VAR, raising=False)
    autotune.forget()
    yield
    autotune.forget()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [1, 2, 3, 10])
@pytest.mark.parametrize("count", [1, 5])
@pytest.mark.parametrize("variant", [{}, {"projection": True}, {"own_embeddings": False}],
                         ids=["plain", "projection", "base-embeddings"])
def test_native_pass_matches_the_poolers_forward(base, tokenizer, dtype, window, count, variant):
    model = compression_model(base, tokenizer, window, dtype, **variant)
    if variant.get("projection"):  # not the identity it starts as: the projection must really run
        torch.nn.init.normal_(model.pooler.projection.weight, std=0.2)
    windows = torch.randint(20, len(tokenizer), (count, window), generator=torch.Generator().manual_seed(count))
    with torch.inference_mode(), decode_linears(model):
        pooling = NativePooling.for_model(model)
        assert pooling is not None
        native, reference = pooling.native(windows), model._window_hidden_states(windows)
    assert native.shape == reference.shape == (count, window, 32) and native.dtype == reference.dtype == dtype
    assert_close_to_the_forward(native, reference, model)


def test_final_norm_hooked_runs_after_the_native_call(base, tokenizer):
    model = compression_model(base, tokenizer, 3)
    seen = []
    model.pooler.model.norm.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out * 2)
    windows = torch.randint(20, len(tokenizer), (4, 3))
    with torch.inference_mode():
        pooling = NativePooling.for_model(model)
        native, reference = pooling.native(windows), model._window_hidden_states(windows)
    assert pooling.final_norm is not None and len(seen) == 2  # the hook ran on both paths
    assert_close_to_the_forward(native, reference, model)


def test_a_routed_and_hooked_projection_still_runs(base, tokenizer, monkeypatch, fresh_autotune):
    """The projection after the stack is called as a module: decode_linears' route and its hooks take part
    (a routed projection had made the pooler refuse the native pass, depending on what was measured)."""
    monkeypatch.setattr(autotune, "compare", lambda *args: autotune.FASTER)
    model = compression_model(base, tokenizer, 3, projection=True)
    torch.nn.init.normal_(model.pooler.projection.weight, std=0.2)
    seen = []
    model.pooler.projection.register_forward_hook(lambda *args: seen.append(1))
    windows = torch.randint(20, len(tokenizer), (4, 3))
    with torch.inference_mode(), decode_linears(model):
        assert "forward" in vars(model.pooler.projection)  # routed through decode_linear
        pooling = NativePooling.for_model(model)
        native, reference = pooling.native(windows), model._window_hidden_states(windows)
    assert len(seen) == 2
    assert_close_to_the_forward(native, reference, model)


def test_poolers_the_native_call_does_not_take(base, tokenizer):
    def hooked(model):
        model.pooler.model.layers[0].mlp.register_forward_hook(lambda *args: None)
        return model

    cases = {
        "float64": compression_model(base, tokenizer, 2, torch.float64),
        "unmerged LoRA": build_compression_model(copy.deepcopy(base), tokenizer, 2, lora=LoraSettings(r=2),
                                                 pooler=PoolerSettings(num_hidden_layers=1)),
        "a hook on a bypassed module": hooked(compression_model(base, tokenizer, 2)),
    }
    for name, model in cases.items():
        assert NativePooling.for_model(model) is None, name
    assert NativePooling.for_model(cases["unmerged LoRA"].merge_adapter()) is not None  # merged: plain layers


def test_the_measured_path_is_taken(base, tokenizer, monkeypatch, fresh_autotune):
    model = compression_model(base, tokenizer, 2)
    verdicts, asked = {}, []

    def compare(op, shape_class, fast, reference):
        asked.append(shape_class)
        return autotune.FASTER if verdicts[shape_class.split()[1]] else autotune.SLOWER

    monkeypatch.setattr(autotune, "compare", compare)
    verdicts.update({"N=4": True, "N=8": False})
    with torch.inference_mode():
        pooling = NativePooling.for_model(model)
        native_calls = []
        native = pooling.native
        monkeypatch.setattr(pooling, "native", lambda ids: native_calls.append(len(ids)) or native(ids))
        for count in (3, 4, 5, 8, 3):  # classes N=4, 4, 8, 8, 4: each measured once
            pooling(torch.randint(20, len(tokenizer), (count, 2)))
        assert pooling(torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2, 32)
    assert [shape.split()[1] for shape in asked] == ["N=4", "N=8"]
    assert native_calls == [3, 4, 3]


def test_generation_pools_natively_and_still_equals_the_oracle(base, tokenizer, monkeypatch, fresh_autotune):
    """Both strategies pool through the native call; their tokens and layouts stay identical."""
    monkeypatch.setattr(autotune, "compare", lambda *args: autotune.FASTER)
    calls = []
    native = NativePooling.native
    monkeypatch.setattr(NativePooling, "native", lambda self, ids: calls.append(len(ids)) or native(self, ids))
    model = compression_model(base, tokenizer, 2)
    ids = torch.randint(20, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=24, eos_token_id=-1, return_dict_in_generate=True)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    fast = generator.generate(ids, **kwargs)
    pooled_fast = len(calls)
    oracle = generator.generate(ids, strategy="recompute", **kwargs)
    assert pooled_fast > 0 and len(calls) > pooled_fast and min(fast.compressions) > 0
    assert torch.equal(fast.sequences, oracle.sequences) and fast.layouts == oracle.layouts
    calls.clear()
    CompressedGenerator(model, tokenizer, keep_last=1, decode_kernels=False).generate(ids, **kwargs)
    assert not calls  # without the decode kernels the pooler's own forward runs


@settings(max_examples=25, deadline=None)
@given(kv_heads=st.integers(1, 2), group=st.integers(1, 3), head_dim=st.sampled_from([4, 8, 16]),
       layers=st.integers(1, 2), window=st.integers(1, 6), count=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_native_pass_matches_on_any_small_qwen2(tokenizer, kv_heads, group, head_dim, layers, window, count, seed):
    """Any head layout, head size, depth, window and number of windows: the pooler's forward, to rounding."""
    torch.manual_seed(seed)
    heads = kv_heads * group
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=heads * head_dim, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      intermediate_size=3 * head_dim, max_position_embeddings=64)
    base = transformers.Qwen2ForCausalLM(config).eval()
    model = build_compression_model(base, tokenizer, window, lora=None, pooler=PoolerSettings(num_hidden_layers=layers))
    windows = torch.randint(0, len(tokenizer), (count, window), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        pooling = NativePooling.for_model(model.eval())
        native, reference = pooling.native(windows), model._window_hidden_states(windows)
    assert_close_to_the_forward(native, reference, model)
