"""direct_forward: bit for bit the logits of transformers' own Qwen2 forward; the generator's check of it."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hcr.compression.tiny_tokenizer import tiny_tokenizer  # noqa: E402
from hcr.compression.train import PoolerSettings, build_compression_model  # noqa: E402
from hcr.generation import CompressedGenerator, RaggedStaticCache  # noqa: E402
from hcr.generation import direct_forward as direct  # noqa: E402
from hcr.generation.attention import RaggedAttention, causal_mask  # noqa: E402
from hcr.generation.generator import layer_masks  # noqa: E402
from hcr_kernels import decode_linears  # noqa: E402


def qwen2(dtype=torch.float32, sliding=False):
    torch.manual_seed(0)
    settings = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, max_position_embeddings=256)
    if sliding:  # layers 1 and 2 slide over 5 positions
        settings.update(use_sliding_window=True, sliding_window=5, max_window_layers=1)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**settings)).to(dtype).eval()


def both_forwards(base, cache_slots=40, routed=False):
    """A prefill of ragged rows, a decode step and a re-encode step (a crop, logits at chosen positions), each
    through base(...) and direct_forward, every one against its own cache: the pairs of logits."""
    batch, dtype = 3, base.dtype
    caches = [RaggedStaticCache.for_model(base, batch, cache_slots) for _ in range(2)]
    generator = torch.Generator().manual_seed(1)
    steps = [  # (first slot per row, states fed per row, T, logits_to_keep)
        ([0, 0, 0], [9, 4, 7], 9, 0),
        ([9, 4, 7], [1, 1, 1], 1, 0),
        ([6, 4, 3], [5, 3, 0], 5, torch.tensor([2, 4])),
    ]
    pairs = []
    attention = RaggedAttention(base) if routed else None
    with torch.inference_mode(), (attention or contextlib.nullcontext()):
        for starts, counts, steps_, keep in steps:
            embeds = torch.randn(batch, steps_, base.config.hidden_size, generator=generator).to(dtype)
            start, count = torch.tensor(starts), torch.tensor(counts)
            positions = start[:, None] + torch.arange(steps_)
            span = int((start + count).max())
            mask = causal_mask(positions, span, dtype)
            extra = attention.step_kwargs(positions.clamp(max=span - 1)) if attention else {}
            logits = []
            for cache, forward in zip(caches, ("model", "direct")):
                cache.begin_step(start, count, span)
                masks = layer_masks(base.config, mask, positions)
                if forward == "model":
                    logits.append(base(inputs_embeds=embeds, position_ids=positions, use_cache=True,
                                       attention_mask=masks, logits_to_keep=keep,
                                       **{cache.model_keyword: cache}, **extra).logits)
                else:
                    logits.append(direct.direct_forward(base, embeds, positions, masks, cache, logits_to_keep=keep,
                                                        **extra))
            pairs.append(logits)
        for layer in range(base.config.num_hidden_layers):
            assert torch.equal(caches[0].keys[layer], caches[1].keys[layer])
            assert torch.equal(caches[0].values[layer], caches[1].values[layer])
    return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sliding", [False, True], ids=["full", "sliding"])
def test_logits_bit_for_bit(dtype, sliding):
    base = qwen2(dtype, sliding)
    assert direct.supports(base)
    for model_logits, direct_logits in both_forwards(base):
        assert model_logits.shape == direct_logits.shape
        assert torch.equal(model_logits, direct_logits)


def test_logits_bit_for_bit_with_eager_attention():
    """The attention function comes from the config, as in transformers' own forward (here its eager one)."""
    base = qwen2()
    base.config._attn_implementation = "eager"
    for model_logits, direct_logits in both_forwards(base):
        assert torch.equal(model_logits, direct_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_bit_for_bit_with_decode_kernels(dtype):
    """Under decode_linears and RaggedAttention (the generator's default on CPU) the two still agree."""
    base = qwen2(dtype)
    with decode_linears(base):
        for model_logits, direct_logits in both_forwards(base, routed=True):
            assert torch.equal(model_logits, direct_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding", [False, True], ids=["full", "sliding"])
def test_native_step_gives_the_models_logits(monkeypatch, dtype, sliding):
    """With every layer plain and the attention kernel winning (made to win here), decode and re-encode
    steps run as one native call (hcr_kernels' qwen2_decoder_step): transformers' logits and cache writes,
    bit for bit. The prefill (9 steps x 2 query heads per key/value head: more than one query block) does not."""
    from hcr_kernels import autotune
    from hcr_kernels.decoder_step import native as native_step

    monkeypatch.setattr(autotune, "compare", lambda *args: autotune.FASTER)
    steps_fused = []
    original = native_step.qwen2_decoder_step
    monkeypatch.setattr(native_step, "qwen2_decoder_step",
                        lambda embeds, *args: steps_fused.append(embeds.shape[1]) or original(embeds, *args))
    base = qwen2(dtype, sliding)
    with decode_linears(base):
        assert direct.StepPlan(base).stack.final_norm is base.model.norm.weight  # the last norm in the call too
        for model_logits, direct_logits in both_forwards(base, routed=True):
            assert torch.equal(model_logits, direct_logits)
    assert steps_fused == [1, 5]
    steps_fused.clear()
    calls = []
    base.model.norm.register_forward_hook(lambda *args: calls.append(1))  # the last norm is then called after it
    assert direct.StepPlan(base).stack.final_norm is None
    for model_logits, direct_logits in both_forwards(base, routed=True):
        assert torch.equal(model_logits, direct_logits)
    assert steps_fused == [1, 5] and len(calls) == 6


def test_native_step_only_for_plain_layers():
    """A hook on a projection or activation, a projection of another class (as a LoRA layer is), another
    activation or a dtype the kernels lack: the plan calls the modules (and still gives the model's logits)."""
    assert direct.StepPlan(qwen2()).stack is not None
    assert direct.StepPlan(qwen2(torch.float64)).stack is None

    class Subclassed(torch.nn.Linear):
        pass

    changes = [
        lambda base: base.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *args: None),
        lambda base: base.model.layers[0].mlp.act_fn.register_forward_pre_hook(lambda *args: None),
        lambda base: setattr(base.model.layers[0].mlp, "act_fn", torch.nn.GELU()),
        lambda base: setattr(base.model.layers[2].mlp, "up_proj", Subclassed(64, 96, bias=False)),
        lambda base: setattr(base.model.layers[0].self_attn.o_proj, "forward", lambda x: x),
    ]
    for change in changes:
        base = qwen2()
        change(base)
        assert direct.StepPlan(base).stack is None


def test_hooks_on_the_modules_it_calls_still_run():
    """A StepPlan skips ``nn.Module.__call__`` only where nothing hooks a module: a hook that changes a
    projection's output and one on a norm run as in the model's own forward."""
    base = qwen2()
    calls = []
    base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda module, args, out: out * 2)
    base.model.layers[1].post_attention_layernorm.register_forward_pre_hook(lambda *args: calls.append(1))
    assert direct.supports(base)
    for model_logits, direct_logits in both_forwards(base):
        assert torch.equal(model_logits, direct_logits)
    assert len(calls) == 6  # 3 steps, each through both forwards


def test_supports_only_transformers_own_qwen2():
    base = qwen2()
    assert direct.supports(base)

    class Subclassed(transformers.Qwen2ForCausalLM):
        pass

    assert not direct.supports(Subclassed(base.config))
    changed = qwen2()
    changed.model.layers[1].mlp = torch.nn.Identity()
    assert not direct.supports(changed)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96))
    assert not direct.supports(llama)


@pytest.fixture(scope="module")
def compression(tmp_path_factory):
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256)).eval()
    model = build_compression_model(base, tokenizer, 3, pooler=PoolerSettings(num_hidden_layers=1), lora=None).eval()
    return model, tokenizer


def prompt(tokenizer, batch=2):
    return torch.randint(20, len(tokenizer), (batch, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("decode_kernels", [True, False])
def test_generator_uses_and_checks_it(compression, decode_kernels):
    model, tokenizer = compression
    ids = prompt(tokenizer)
    directly = CompressedGenerator(model, tokenizer, keep_last=1, decode_kernels=decode_kernels)
    plainly = CompressedGenerator(model, tokenizer, keep_last=1, decode_kernels=decode_kernels, direct_forward=False)
    assert directly._direct_checked is None  # unchecked until the first decode step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = directly.generate(ids, max_new_tokens=20, eos_token_id=-1, return_dict_in_generate=True)
    theirs = plainly.generate(ids, max_new_tokens=20, eos_token_id=-1, return_dict_in_generate=True)
    assert directly._direct_checked is True and plainly._direct_checked is None
    assert max(ours.compressions) > 0  # re-encode steps ran through it too
    assert torch.equal(ours.sequences, theirs.sequences) and ours.layouts == theirs.layouts


@pytest.mark.parametrize("failure", ["other logits", "an exception"])
def test_generator_falls_back_when_it_differs(compression, monkeypatch, failure):
    model, tokenizer = compression
    ids = prompt(tokenizer)
    expected = CompressedGenerator(model, tokenizer, keep_last=1, direct_forward=False).generate(
        ids, max_new_tokens=12, eos_token_id=-1)
    real = direct.StepPlan.__call__
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if failure == "an exception":
            raise AttributeError("'Qwen2Attention' object has no attribute 'scaling'")
        return real(*args, **kwargs) + 1.0

    monkeypatch.setattr(direct.StepPlan, "__call__", broken)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    with pytest.warns(UserWarning, match="uses the model's forward"):
        produced = generator.generate(ids, max_new_tokens=12, eos_token_id=-1)
    assert generator._direct_checked is False and len(calls) == 1  # tried once, at the first decode step
    assert torch.equal(produced, expected)


def test_supports_refuses_hooks_it_would_skip():
    """A hook on a module direct_forward does not call would silently not run: such a model is refused, and
    accepted again once the hook is gone. Hooks on the modules it does call (norms, projections) still run."""
    base = qwen2()
    noop = lambda *args: None  # noqa: E731
    for module, register in [(base, "register_forward_hook"), (base.model, "register_forward_pre_hook"),
                             (base.model.layers[2], "register_forward_hook"),
                             (base.model.layers[0].self_attn, "register_forward_pre_hook"),
                             (base.model.layers[1].mlp, "register_forward_hook")]:
        handle = getattr(module, register)(noop)
        assert not direct.supports(base), (type(module).__name__, register)
        handle.remove()
        assert direct.supports(base)
    assert direct.supports(base)
    handle = torch.nn.modules.module.register_module_forward_hook(noop)
    try:
        assert not direct.supports(base)
    finally:
        handle.remove()
    attention = base.model.layers[1].self_attn
    attention.forward = attention.forward  # replaced on the instance, as accelerate's offloading hooks do
    assert not direct.supports(base)
    handle = base.model.layers[0].input_layernorm.register_forward_hook(noop)
    del attention.forward
    assert direct.supports(base)
    handle.remove()


def test_generator_keeps_a_hook_registered_after_it_was_made(compression):
    """The check runs at every generate() call: a hook on the model added later fires at every step."""
    model, tokenizer = compression
    ids = prompt(tokenizer)
    generator = CompressedGenerator(model, tokenizer, keep_last=1)
    first = generator.generate(ids, max_new_tokens=12, eos_token_id=-1)
    assert generator._direct_checked is True
    calls = []
    handle = model.base.register_forward_hook(lambda *args: calls.append(1))
    try:
        second = generator.generate(ids, max_new_tokens=12, eos_token_id=-1)
    finally:
        handle.remove()
    assert len(calls) == 12  # the prefill and 11 steps, each through the model's own forward
    assert torch.equal(first, second)
