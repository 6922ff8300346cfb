"""The public op: argument checks, the backend choice per layer, the autograd Function."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from hcr_kernels import _dispatch, _extension, autotune
from hcr_kernels._validate import check_same_device, check_same_dtype, check_tensor
from hcr_kernels.decode_linear import native
from hcr_kernels.decode_linear.reference import decode_linear_ref

__all__ = ["decode_linear", "apply_decode_linear", "native_buckets", "measured_buckets", "tied_buckets", "stack_buckets",
           "row_bucket", "takes_native", "weight_rotation", "DecodeLinearFunction", "BACKEND_CHECKS", "NATIVE_DTYPES",
           "ROW_LADDER", "EVERY_ROW_COUNT", "ROTATION_LIMIT"]

BACKEND_CHECKS = {
    "reference": _dispatch.require_nothing,
    "native": _dispatch.native_cpu_check("decode_linear", "reference"),
}

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Row counts at which the automatic choice measures the native kernel against F.linear.
# Which wins depends on the CPU: on an AVX2-only EPYC the native kernel was 1.3-4.8x
# F.linear in fp32/bf16 but 0.7x for one fp16 row (F.linear has a fast fp16 one-row
# path there); a limit tuned on one CPU was slower than F.linear on another.
ROW_LADDER = (1, 2, 4, 8, 16, 32)  # powers of two: ``row_bucket`` is a bit length
EVERY_ROW_COUNT = -1  # the bucket mask with every bit set: backend="native" takes the kernel at any row count
ROTATION_LIMIT = 256  # matrices in weight_rotation: a 64 KiB layer's 256 copies still fill 16 MiB


class DecodeLinearFunction(torch.autograd.Function):
    """The native forward; the backward is two matmuls and a sum in plain PyTorch (training never decodes)."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        return native.decode_linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_out @ weight
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t() @ input.reshape(-1, input.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_input, grad_weight, grad_bias


def decode_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """``input @ weight.T + bias`` (``F.linear``'s contract): ``[..., K]``, ``[N, K]``, ``[N]`` -> ``[..., N]``.

    Differentiable. ``backend``: None (``HCR_BACKEND`` or the automatic choice: native
    for CPU tensors of a native dtype with weight rows contiguous and a row count at
    which the native kernel was measured faster on this machine, see
    ``measured_buckets``; else reference), ``"reference"`` or ``"native"`` (any row
    count; a dtype it lacks is an error).

    Where the choice is already known (named ``"native"``, or this weight's remembered) and the
    arguments are plain CPU tensors that fit, the call is one call into ``_C``
    (``_extension.decode_linear_chosen``): its Python had cost more than the kernel on a small
    layer (AMD EPYC, Zen 3: 6.9-8.1 us a call on a 1 x 32 fp32 weight against 2.6-2.9 us for the
    op alone; in one call 1.5-1.8 us).
    """
    if backend is None or backend == "native":  # a choice already made: one call into _C
        out = _extension.decode_linear_chosen(input, weight, bias, None if backend is None else EVERY_ROW_COUNT)
        if out is not None:
            return out
    _check_args(input, weight, bias)
    return apply_decode_linear(input, weight, bias, native_buckets(weight, backend))


def row_bucket(rows: int) -> int:
    """Which rung of ``ROW_LADDER`` decides for ``rows`` input rows: the smallest rung >= ``rows`` (its
    index; beyond the ladder the index goes on, 6 for 33-64 rows, ..., so no bucket mask of the ladder has it)."""
    return max(rows - 1, 0).bit_length()


def takes_native(rows: int, buckets: int) -> bool:
    """Whether a call with ``rows`` input rows takes the native kernel under the bucket mask ``buckets``."""
    return (buckets >> row_bucket(rows)) & 1 == 1


def native_buckets(weight: torch.Tensor, backend: str | None = None) -> int:
    """For which row counts a linear with this weight takes the native kernel: a bit mask over
    ``row_bucket``s (bit i: rows in ``(ROW_LADDER[i-1], ROW_LADDER[i]]``); 0 never, ``EVERY_ROW_COUNT`` always.

    A named ``backend`` decides without measuring (and ``HCR_BACKEND`` does not apply), so it
    is worked out on the spot: that costs less than a lookup. The automatic choice depends on
    the layer, not on the call (device, dtype, shape, whether the weight's rows are
    contiguous, ``HCR_BACKEND``; the extension's presence cannot change in a process), so it
    is worked out once per such key (``autotune.remembered``, which adds the ISA, the thread
    count and ``HCR_AUTOTUNE``) and a direct call costs a lookup in ``_C``'s table of the same
    key (``_extension.weight_choice``: 0.46 us on the Intel Xeon, against 1.7-1.9 us for
    building the key in Python, and 0.6 us for a named backend's choice); ``decode_linears`` asks
    once per layer.
    """
    if backend is not None:
        return _derive_buckets(weight, backend)
    found = _extension.weight_choice(weight)
    if found is not None:
        return found
    key = ("decode_linear row buckets", weight.device, weight.dtype, weight.shape, _rows_contiguous(weight),
           _extension.environment_variable(_dispatch.BACKEND_ENV_VAR))
    buckets = autotune.remembered(key, lambda: _derive_buckets(weight, backend))
    _extension.remember_weight_choice(weight, buckets)
    return buckets


# The key of the per-call lookup (weight_choice): what native_buckets' key and autotune.remembered's add to it
# read from the environment.
_extension.set_weight_choice_environment(_dispatch.BACKEND_ENV_VAR, autotune.AUTOTUNE_ENV_VAR)


def _rows_contiguous(weight: torch.Tensor) -> bool:
    return weight.shape[-1] <= 1 or weight.stride(-1) == 1


def _derive_buckets(weight: torch.Tensor, backend: str | None) -> int:
    if backend is None:  # automatic or HCR_BACKEND: native only where it is the faster path
        return measured_buckets(weight) if _measured_layer(weight) else 0
    if _dispatch.choose_backend("decode_linear", weight.device, backend, BACKEND_CHECKS) == "reference":
        return 0
    if weight.dtype not in NATIVE_DTYPES:
        raise TypeError(f"decode_linear: backend 'native' supports {NATIVE_DTYPES}, got {weight.dtype}; "
                        "use backend='reference'")
    return EVERY_ROW_COUNT


def measured_buckets(weight: torch.Tensor) -> int:
    """The bucket mask of the ``ROW_LADDER`` rungs at which the native kernel beat F.linear on this weight's shape.

    Measured on this machine at first use (``hcr_kernels.autotune``, cached per CPU, ISA,
    thread count and shape), each timed round calling the weight and copies of it in turn
    (``weight_rotation``), every rung on its own: the winner need not change once. On an
    Intel Xeon, MKL's fp32 F.linear on a 151,936 x 256 lm_head took 4.6 ms for 1-2 rows but
    9.0 at 4 and 15.5 at 8, where the kernel took 5.4 / 7.4 / 8.8 ms at 2 / 4 / 8: a limit
    that stopped at the first loss (2 rows) kept F.linear at 8 rows, 1.8x slower. A tie
    (within ``autotune.MARGIN`` either way) keeps F.linear, as a loss does. 0 when autotuning is off.
    """
    return _measured_verdicts(weight)[0]


def tied_buckets(weight: torch.Tensor) -> int:
    """The bucket mask of the rungs at which the native kernel and F.linear tied on this weight's shape (within
    ``autotune.MARGIN``: F.linear kept): where ``stack_buckets`` times the stack of layers again."""
    return _measured_verdicts(weight)[1]


def _measured_verdicts(weight: torch.Tensor) -> tuple[int, int]:
    """(``measured_buckets``, ``tied_buckets``): one measurement, remembered."""
    return autotune.remembered(("decode_linear", weight.dtype, *weight.shape), lambda: _measure_buckets(weight))


def _measure_buckets(weight: torch.Tensor) -> tuple[int, int]:
    out_features, in_features = weight.shape
    rotation = weight_rotation(weight)
    won = tied = 0
    for rows in ROW_LADDER:
        x = _measurement_input(rows, in_features, weight.dtype)
        shape_class = f"{str(weight.dtype).removeprefix('torch.')} N={out_features} K={in_features} rows={rows}"
        verdict = autotune.compare("decode_linear", shape_class, _each_in_turn(_kernel, x, rotation),
                                   _each_in_turn(decode_linear_ref, x, rotation))
        if verdict is None:  # autotuning off
            return 0, 0
        if verdict == autotune.FASTER:
            won |= 1 << row_bucket(rows)
        elif verdict == autotune.TIE:
            tied |= 1 << row_bucket(rows)
    return won, tied


def _measurement_input(rows: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The seeded input rows both paths of a measurement see."""
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)


def weight_rotation(weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` and copies of it, ``autotune.core_caches_bytes()`` in all or more (at most ``ROTATION_LIMIT``
    matrices), called in turn by each timed round of ``measured_buckets``.

    Each call then finds its weights out of the cores' caches, as in a decode step where the other layers
    run between two calls of a layer, while the code of the call stays hot, as it does there. Timing one
    call after the caches were written over (``autotune.measure`` does that before each round) also pushed
    out the code: on an Intel Xeon (2 threads) that added ~8 us to both paths of a small layer and made
    ties of what the tiny model's stack showed as wins (fp16 256 x 256, one row: 14.8 vs 15.7 us alone, 6.2
    vs 9.4 in the stack); ties keep F.linear, so the stack's automatic choice had run 1.1-1.3x the kernel's
    time. With the rotation its fp16 stack went from 0.93-1.07x to 1.16-1.24x the reference, fp32 from
    0.58-0.87x to 0.87-0.97x (two runs each).
    """
    count = min(ROTATION_LIMIT, -(-autotune.core_caches_bytes() // max(weight.nbytes, 1)))
    return [weight] + [weight.detach().clone() for _ in range(count - 1)]


def _each_in_turn(linear, x: torch.Tensor, rotation: list[torch.Tensor]):
    """A timed round of ``measured_buckets``: ``linear`` of ``x`` with each weight of ``rotation``, results dropped."""
    def run():
        for weight in rotation:
            linear(x, weight, None)
    return run


def stack_buckets(weights: list[torch.Tensor], masks: list[int]) -> list[int]:
    """The automatic bucket masks ``masks`` of a model's linears (called in the order of ``weights``), with every
    rung of ``ROW_LADDER`` at which they mix the two paths decided again for the stack as a whole.

    Each layer's own measurement (``measured_buckets``) calls one path over copies of one weight, so it never
    sees what a switch of path costs: in a stack each path's code and data go cold while the other runs. On an
    Intel Xeon (2 threads) a switch cost about 1 us at 1 row and 3 us at 8-32 rows, and the tiny Qwen2's fp32
    layers, on which the kernel and MKL's F.linear tie, took a mix of the two at 4-8 rows that ran 1.03-1.16x
    the time of F.linear everywhere (``benchmarks/HISTORY.md``). So where the layers' masks differ at a rung,
    the stack's linears are timed in order three ways, each measured choice against F.linear everywhere: the
    layers' own mix, the kernel everywhere, and (where both win) the mix against the kernel everywhere; a tie
    keeps the simpler plan (F.linear, then the kernel everywhere). A rung at which no layer won but some tied
    (``tied_buckets``) is timed too, the kernel everywhere against F.linear: a tie is a difference of less than
    the noise of one layer's measurement, which the whole stack's adds up (AMD EPYC, Zen 3, at a0542ba: the
    layers' own choices ran the tiny Qwen2's stack at 32 rows 1.00x as fast as F.linear, the kernel everywhere
    1.66x, in the same benchmark run). Only layers whose masks were measured take part (the others keep
    theirs); remembered per stack, and cached per machine as every measured choice.
    """
    chosen = [i for i, weight in enumerate(weights) if _measured_layer(weight)]
    if len(chosen) < 2:
        return list(masks)
    ties = [tied_buckets(weights[i]) for i in chosen]
    plan = tuple((weights[i].dtype, tuple(weights[i].shape), masks[i], tie) for i, tie in zip(chosen, ties))
    stacked = autotune.remembered(("decode_linear stack", plan),
                                  lambda: _measure_stack([weights[i] for i in chosen], [masks[i] for i in chosen],
                                                         ties))
    out = list(masks)
    for i, mask in zip(chosen, stacked):
        out[i] = mask
    return out


def _measured_layer(weight: torch.Tensor) -> bool:
    """Whether the automatic choice measures this weight (rather than keeping F.linear without measuring)."""
    return (_dispatch.choose_backend("decode_linear", weight.device, None, BACKEND_CHECKS) == "native" and
            _rows_contiguous(weight) and weight.dtype in NATIVE_DTYPES and autotune.enabled())


def _measure_stack(weights: list[torch.Tensor], masks: list[int], ties: list[int]) -> list[int]:
    masks = list(masks)
    layers = hashlib.sha1(repr([(str(w.dtype), tuple(w.shape)) for w in weights]).encode()).hexdigest()[:12]
    everywhere, nowhere = [True] * len(weights), [False] * len(weights)
    kinds = {(weight.dtype, weight.shape[1]) for weight in weights}  # one input per kind, at each rung
    for rows in ROW_LADDER:
        bit = 1 << row_bucket(rows)
        own = [mask & bit != 0 for mask in masks]
        if all(own) or not (any(own) or any(tie & bit for tie in ties)):
            continue
        inputs = {(dtype, k): _measurement_input(rows, k, dtype) for dtype, k in kinds}

        def stack(native_at):
            def run():
                for weight, takes in zip(weights, native_at):
                    linear = _kernel if takes else decode_linear_ref
                    linear(inputs[weight.dtype, weight.shape[1]], weight, None)
            return run

        shape_class = f"{len(weights)} linears {layers}, own choices {''.join('1' if t else '0' for t in own)}"
        mix = autotune.TIE if not any(own) else (  # no layer won, some tied: the mix is F.linear everywhere
            autotune.compare("decode_linear stack", f"{shape_class}: mix vs F.linear, rows={rows}", stack(own),
                             stack(nowhere)))
        kernel = autotune.compare("decode_linear stack", f"{shape_class}: kernel vs F.linear, rows={rows}",
                                  stack(everywhere), stack(nowhere))
        if mix is None or kernel is None:  # autotuning off
            return masks
        if mix == autotune.FASTER and kernel == autotune.FASTER:
            mix_over_kernel = autotune.compare("decode_linear stack", f"{shape_class}: mix vs kernel, rows={rows}",
                                               stack(own), stack(everywhere))
            native_at = own if mix_over_kernel == autotune.FASTER else everywhere
        else:
            native_at = own if mix == autotune.FASTER else everywhere if kernel == autotune.FASTER else nowhere
        masks = [mask | bit if takes else mask & ~bit for mask, takes in zip(masks, native_at)]
    return masks


def apply_decode_linear(input, weight, bias, buckets: int) -> torch.Tensor:
    """The linear, native when ``input``'s row count is in the bucket mask ``buckets``, else ``F.linear`` (what
    ``decode_linear_ref`` calls, called here directly).

    Every call of a routed layer and every direct ``decode_linear()`` call passes here, so ``takes_native`` is
    inline and nothing else is called before ``F.linear``: on an Intel Xeon (16 x 32 fp32, one row) a call
    that takes ``F.linear`` cost 1.1 us above ``F.linear``'s 1.5 us through the two functions, 0.5 us so. An
    input ``F.linear`` refuses (0-d, not a tensor) gets ``F.linear``'s error."""
    try:  # takes_native(rows, buckets), with the ladder's bucket of `rows` rows: the bit length of rows - 1
        takes = (buckets == EVERY_ROW_COUNT or buckets >> ((input.numel() // (input.shape[-1] or 1) or 1) - 1)
                 .bit_length() & 1) and input.dtype == weight.dtype
    except (AttributeError, IndexError):  # not a tensor, or 0-d: F.linear's own error says what is wrong
        takes = False
    if not takes:
        return F.linear(input, weight, bias)
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return DecodeLinearFunction.apply(input, weight, bias)
    return _kernel(input, weight, bias)


def _kernel(input, weight, bias) -> torch.Tensor:
    """The native kernel as a call without autograd runs it (and as the automatic choice measures it): one call
    into ``_C`` (``_extension.decode_linear_chosen``), else the op through torch's dispatcher."""
    out = _extension.decode_linear_chosen(input, weight, bias, EVERY_ROW_COUNT)
    return out if out is not None else native.decode_linear(input, weight, bias)


def _check_args(input, weight, bias) -> None:
    # The common case in one expression (a direct call per layer per decode step pays for
    # these checks); anything else goes through the checks that name what is wrong.
    if (bias is None and isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and input.dim() > 0 and input.shape[-1] == weight.shape[1] and input.dtype == weight.dtype
            and input.device == weight.device):
        return
    check_tensor("input", input)
    check_tensor("weight", weight, dim=2)
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"decode_linear: input must be [..., K] with K = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(input.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"decode_linear: bias must be None or [N] = [{weight.shape[0]}], got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    tensors = {"input": input, "weight": weight} if bias is None else {"input": input, "weight": weight, "bias": bias}
    check_same_device(**tensors)
    check_same_dtype(**tensors)
