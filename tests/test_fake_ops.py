"""Every ``torch.ops.hcr`` op has a fake (meta) implementation, so torch.compile can trace it.

``opcheck`` runs its default sub-tests (schema, autograd registration, fake tensor,
aot dispatch) on each op; the op list comes from the dispatcher, so a new op
without a case (and a fake) fails here. Then patched Mamba and the compression
model (its splice alone, then the whole model) train under ``torch.compile(fullgraph=True)`` and match eager.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from hcr_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.extension_loaded(), reason="the compiled extension is not loaded")


def registered_ops() -> list[str]:
    """Every op ``_C`` registers under ``hcr::`` (``dir(torch.ops.hcr)`` only lists ops already looked up)."""
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("hcr::"))


def _scan_inputs(z=True):
    batch, length, channels, state, groups = 2, 9, 6, 4, 2  # kernel layout: [batch, L, channels], B/C [b, G, L, N]
    return (
        torch.randn(batch, length, channels), torch.randn(batch, length, channels) * 0.5,
        -torch.rand(channels, state) - 0.05, torch.randn(batch, groups, length, state),
        torch.randn(batch, groups, length, state), torch.randn(channels),
        torch.randn(batch, length, channels) if z else None, torch.randn(channels) * 0.3,
    )


def _scan_bwd_args(z):
    fwd = (*_scan_inputs(z), True, 4)  # segment 4 < L: several checkpoints
    _, checkpoints = torch.ops.hcr.selective_scan_fwd(*fwd)
    batch, length, channels = fwd[0].shape
    return (torch.randn(batch, length, channels), *fwd, checkpoints, torch.randn(batch, fwd[2].shape[1], channels))


def _conv_inputs():
    return torch.randn(2, 7, 6), torch.randn(4, 6), torch.randn(6)  # x [batch, L, channels], weight [K, channels]


WINDOW_OF_ROW = torch.tensor([0, -1, 1, -1, 2, -1])  # rows 0, 2, 4 pool windows 0..2; the others copy the template


def _decoder_step_args(native_buckets: int):
    """One Qwen2 layer (hidden 8, 2 query heads over 1 key/value head of 4, MLP 6), two rows, one step; a final
    norm where the kernel takes some row counts."""
    hidden, head_dim, intermediate = 8, 4, 6
    weights = [1 + torch.rand(hidden), torch.randn(8, hidden), torch.randn(8), torch.randn(4, hidden), torch.randn(4),
               torch.randn(4, hidden), torch.randn(4), torch.randn(hidden, 8), 1 + torch.rand(hidden),
               torch.randn(intermediate, hidden), torch.randn(intermediate, hidden), torch.randn(hidden, intermediate)]
    caches = [[torch.randn(2, 1, 5, head_dim)] for _ in range(2)]
    return (torch.randn(2, 1, hidden), torch.randn(2, 1, head_dim), torch.randn(2, 1, head_dim), weights, *caches,
            torch.tensor([0, 3]), torch.tensor([1, 1]), 4, torch.tensor([[0], [3]]), [native_buckets] * 7, [1e-6, 1e-5],
            [0.5], [0], head_dim, 1 + torch.rand(hidden) if native_buckets else None, 1e-6)


def op_cases():
    """op -> [(args, indices of the args that may require grad)]; mutated arguments never do."""
    logits = lambda: torch.randn(5, 11)  # noqa: E731
    labels, weights = torch.tensor([1, -100, 3, 10, 0]), torch.rand(5)
    conv = _conv_inputs()
    return {
        "decode_linear": [((torch.randn(2, 1, 7), torch.randn(5, 7), torch.randn(5)), (0, 1, 2)),
                          ((torch.randn(3, 7), torch.randn(5, 7), None), (0, 1))],
        "decode_attention": [((torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8),
                               torch.tensor([[0, 1, 2], [3, 4, 5]]), 0.35, 0), ()),
                              ((torch.randn(1, 2, 1, 5), torch.randn(1, 1, 4, 5), torch.randn(1, 1, 4, 5),
                                torch.tensor([[3]]), 1.0, 2), ())],
        "qwen2_decoder_step": [(_decoder_step_args(0), ()), (_decoder_step_args(-1), ())],
        "ragged_cache_write_": [((torch.zeros(2, 1, 6, 3), torch.zeros(2, 1, 6, 3), torch.randn(2, 1, 2, 3),
                                  torch.randn(2, 1, 2, 3), torch.tensor([0, 3]), torch.tensor([2, 1])), (2, 3))],
        "pool_rows_": [((torch.randn(6, 5), WINDOW_OF_ROW, torch.randn(3, 4, 5), torch.empty(6, 5)), (0, 2)),
                       ((None, torch.arange(3), torch.randn(3, 4, 5), torch.empty(3, 5)), (2,))],
        "pool_rows_backward_": [((torch.randn(6, 5), WINDOW_OF_ROW, torch.empty(3, 4, 5), torch.empty(6, 5)), (0,)),
                                ((torch.randn(6, 5), WINDOW_OF_ROW, torch.empty(3, 4, 5), None), (0,))],
        "weighted_cross_entropy_fwd_": [
            ((logits(), labels, weights, -100, torch.empty(5), torch.empty(5, 11)), (0, 2)),
            ((logits(), labels, weights, -100, torch.empty(5), None), (0, 2)),
        ],
        "selective_scan_fwd": [((*_scan_inputs(z), True, 4), range(8) if z else (0, 1, 2, 3, 4, 5, 7))
                               for z in (True, False)],
        "selective_scan_bwd": [(_scan_bwd_args(z), (0,)) for z in (True, False)],
        "causal_conv1d_fwd": [((*conv, True), (0, 1, 2)), ((*conv, False), (0, 1, 2))],
        "causal_conv1d_bwd": [((torch.randn(2, 7, 6), *conv, True), (0,))],
    }


def test_every_registered_op_has_a_case():
    assert set(registered_ops()) == set(op_cases()), "add opcheck inputs (and a register_fake) for the new op"


@pytest.mark.parametrize("name", registered_ops())
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck(name, requires_grad):
    """All four default sub-tests on inputs without grad. With inputs requiring grad, test_aot_dispatch_dynamic
    is skipped: no op has an autograd formula (callers wrap fwd/bwd pairs in autograd.Functions, traced by the
    compile tests below), so it would only backprop through torch's deprecated autograd-not-implemented
    fallback; test_autograd_registration then checks that the ops claim no autograd they do not have."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    utils = utils if requires_grad else (*utils, "test_aot_dispatch_dynamic")
    cases = op_cases().get(name)
    assert cases, f"hcr::{name} has no opcheck case"
    op = getattr(torch.ops.hcr, name).default
    for args, grad_args in cases:
        args = tuple(
            a.clone().requires_grad_(requires_grad and i in grad_args and a.is_floating_point())
            if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)
        )
        torch.library.opcheck(op, args, test_utils=utils)


# ----------------------------------------------------------------------------- torch.compile


def _recording_backend(seen: set):
    """aot_eager that records which hcr ops reach the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(part):
        def compiler(gm, example_inputs):
            for node in gm.graph.nodes:
                if node.op != "call_function":
                    continue
                # A mutating op appears as auto_functionalized(op, ...) after functionalization.
                for target in (node.target, *node.args[:1]):
                    if isinstance(target, torch._ops.OpOverload) and target.namespace == "hcr":
                        seen.add((part, target._opname))
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))


def _train_step(model, loss_fn, *args):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, *args)
    loss.backward()  # runs AOTAutograd's compiled backward for the compiled loss_fn
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(eager, compiled, atol=1e-5, rtol=1e-4):
    (loss, grads), (closs, cgrads) = eager, compiled
    torch.testing.assert_close(closs, loss, atol=atol, rtol=rtol)
    assert grads.keys() == cgrads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(cgrads[name], grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_compiled_mamba_training_step_matches_eager():
    """Patched Mamba (causal_conv1d + selective_scan, forward and backward) in one fullgraph graph."""
    transformers = pytest.importorskip("transformers")
    from hcr_kernels.mamba_patch import apply_hcr_kernels_to_mamba

    torch._dynamo.reset()
    config = transformers.MambaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, state_size=16, expand=2,
                                      conv_kernel=4, time_step_rank=4)
    model = apply_hcr_kernels_to_mamba(transformers.MambaForCausalLM(config))
    ids = torch.randint(0, 32, (3, 21))

    def loss_fn(m, ids):
        return m(ids, labels=ids).loss

    seen = set()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=_recording_backend(seen))
    eager_step = _train_step(copy.deepcopy(model), loss_fn, ids)
    _assert_same_step(eager_step, _train_step(model, compiled, ids))
    assert {("fw", "causal_conv1d_fwd"), ("fw", "selective_scan_fwd"),
            ("bw", "causal_conv1d_bwd"), ("bw", "selective_scan_bwd")} <= seen, seen
    torch._dynamo.reset()


WINDOW = 4


@pytest.fixture(scope="module")
def compression(tmp_path_factory):
    """A tiny untrained Qwen2 base, its compression model (one-layer pooler) and one collated batch."""
    transformers = pytest.importorskip("transformers")
    from hcr.compression import (CompressionCollator, CompressionExampleDataset, CompressionTokens, ExampleConfig,
                                 arithmetic_trace, tiny_tokenizer, tokenize_trace)
    from hcr.compression.train import PoolerSettings, build_compression_model

    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=256))
    model = build_compression_model(base, tokenizer, WINDOW, pooler=PoolerSettings(num_hidden_layers=1), lora=None)
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    traces = [tokenize_trace(tokenizer, *arithmetic_trace(random.Random(i))) for i in range(6)]
    dataset = CompressionExampleDataset(traces, tokens, ExampleConfig(window=WINDOW, every_nth=3))
    batch = CompressionCollator(tokens, WINDOW, tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    return model, batch


def test_compiled_compression_splice_training_step_matches_eager(compression):
    """Pooler + pool_rows_ splice + the base's own loss in one fullgraph graph: the splice alone, without
    ``pool_scatter``'s checks or the marker rows, so that a failure of the whole-model test below is localised."""
    from hcr_kernels.pool_scatter.op import PoolRowsFunction, _window_of_row

    torch._dynamo.reset()
    model, batch = compression
    window_of_row, slots = _window_of_row(batch["slot_mask"])
    assert int(slots) == batch["window_ids"].shape[0] > 0

    def loss_fn(m, input_ids, window_ids, window_of_row, attention_mask, labels):
        template = m.base.get_input_embeddings()(input_ids)
        hidden = m._window_hidden_states(window_ids).to(template.dtype)
        batch_size, length, dim = template.shape
        embeds = PoolRowsFunction.apply(template.reshape(-1, dim), window_of_row, hidden.contiguous(), "native")
        out = m.base(inputs_embeds=embeds.view(batch_size, length, dim), attention_mask=attention_mask,
                     labels=labels, use_cache=False)
        return out.loss

    args = (batch["input_ids"], batch["window_ids"], window_of_row, batch["attention_mask"], batch["labels"])
    seen = set()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=_recording_backend(seen))
    eager_step = _train_step(model, loss_fn, *args)
    _assert_same_step(eager_step, _train_step(model, compiled, *args))
    assert {("fw", "pool_rows_"), ("bw", "pool_rows_backward_")} <= seen, seen
    torch._dynamo.reset()


def test_compiled_compression_model_fullgraph(compression):
    """The whole ``CompressionModel`` (fused loss included) in one graph, forward and backward, matching eager.
    Its input checks stay in the graph as asserts: a wrong slot count or label raises, with the shapes unchanged
    (so no recompilation)."""
    torch._dynamo.reset()
    model, batch = compression

    def loss_fn(m, batch):
        return m(**batch).loss

    seen = set()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=_recording_backend(seen))
    eager_step = _train_step(model, loss_fn, batch)
    _assert_same_step(eager_step, _train_step(model, compiled, batch))
    assert {("fw", "pool_rows_"), ("bw", "pool_rows_backward_"), ("fw", "weighted_cross_entropy_fwd_")} <= seen, seen
    slot_mask = batch["slot_mask"].clone()
    slot_mask.view(-1)[slot_mask.view(-1).nonzero()[0]] = False  # one window more than slots
    with pytest.raises(RuntimeError, match="True slots must equal hidden's N windows"):
        compiled(model, {**batch, "slot_mask": slot_mask})
    labels = batch["labels"].clone()
    labels[0, -1] = model.base.config.vocab_size
    with pytest.raises(RuntimeError, match="labels must be in"):
        compiled(model, {**batch, "labels": labels})
    torch._dynamo.reset()
