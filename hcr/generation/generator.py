"""CompressedGenerator: batched generation that compresses its own reasoning as it goes.

Layout (``hcr.compression.layout``, the one the training examples are built from):
a row is its prompt, then, once something is compressed, one block
``<|vision_start|> v1 … vm <|vision_end|>``, then the uncompressed tail of what it
generated. Whenever the tail holds at least ``W + k`` tokens (``k = keep_last``),
its oldest W tokens are pooled into v(m+1). Writing ``</think>`` ends the
reasoning. By default compression stops there. With ``compress_answer`` (the
builder's option of the same name) the full windows still in the reasoning tail
are pooled at once (so the reasoning ends as in the builder's last reasoning
stage, ``r // W`` windows), and the answer is compressed by the same rule into a
second block after ``</think>``.

The algorithm, in named stages (``GenerationOutput.time_split`` times them):

* **prefill**: encode every row's prompt; the logits of its first token.
* then, per step: sample one token per active row and write it (``_write``); the
  **compress** decision may pool a window, and then returns the cache slot the
  row's layout changed from (its block's end marker, or where a block opens);
* **decode**: a row whose layout only grew by that token feeds just that token;
* **re-encode**: a row that compressed is cropped back to its slot and fed its
  layout from there: the new vector, the end marker, the kept tail. Positions
  stay contiguous, exactly as in a full re-encode. **pooling** is the pooler's
  share of prefill and re-encode. A trained pooler with a LoRA adapter pools
  faster merged (``CompressionModel.merge_adapter()``, as ``hcr eval`` and the
  demo do); the generator leaves the model it is given as it is.

Two strategies (``CachedSteps``, ``RecomputedSteps``) share every decision and differ
only in how a step's logits are computed, each with ``prefill()`` and ``step(crops)``:

* ``"cache"`` (default): a static KV cache with per-row lengths; the 4D mask and the
  position ids are built once per step, for all rows at once; the logits only at each
  row's last fed position (``keeps_logits``).
* ``"recompute"``: re-encodes every row's whole layout every step: slow,
  simple, the correctness oracle.

Both run under ``torch.inference_mode`` and, by default (``decode_kernels``), with
the model's ``nn.Linear`` layers routed through ``hcr_kernels.decode_linear``: on CPU
the few-row matmuls of a decode step are bound by how fast the weights stream, which
the native kernel does faster than the BLAS ``F.linear`` calls on most CPUs; each
layer takes it only at row counts where it was measured faster on this machine
(``hcr_kernels.autotune``), so the routing never makes a step slower.

An eager cached step of a Qwen2 base (``direct_forward``, on by default) calls the
model's layers directly instead of ``base(...)``: the same arithmetic, bit for bit, without
transformers' wrappers, which are most of a small model's step on a CPU. The generator
checks the two against each other at its first decode step and keeps ``base(...)`` (with a
warning) if they differ.

With the decode kernels on, a merged ``EmbedPooler`` pools each step's windows as one native
call (``pooling.NativePooling``) where the autotuner measured that faster than its forward,
in both strategies: the pooled vectors agree with the forward's to rounding, not bit for bit
(its attention is hcr's kernel, not SDPA), and the two strategies still pool identically.

With ``compile_decode=True`` every forward of ``"cache"`` (prefill, decode,
re-encode) runs through ``torch.compile`` with dynamic shapes: on a small model a
decode step is mostly Python and per-op overhead, which compilation removes. Dynamic
shapes let every attention span and cache size share a graph (three per batch size:
prefill, decode, re-encode); compiling them costs tens of seconds once per process.
On a CUDA model the decode steps run as CUDA graphs instead (``_compile_options``):
they attend over the whole preallocated cache, so that every decode step of a
``generate`` call has the same shapes and addresses and replays one graph.

The generator never writes a compression token (placeholder, block start, block
end): their logits are masked before sampling. A prompt may not hold them either
(it cannot carry compressed blocks), nor ids outside the model's vocabulary.
A row stops at ``eos``, at ``max_new_tokens``, or when its next token would sit
past the model's ``max_position_embeddings`` (its compressed layout, not its
token count, is what must fit); ``GenerationOutput.stop_reasons`` says which.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field

import torch

from hcr.argtypes import (FLAG, NON_NEGATIVE_INT, POSITIVE_INT, POSITIVE_NUMBER, PROBABILITY, TOKEN_ID, check_values,
                          optional)
from hcr.compression.layout import CompressedLayout, compressed_layout, compressed_length
from hcr.compression.tokens import CompressionTokens
from hcr.generation import direct_forward as direct
from hcr.generation.attention import RaggedAttention, causal_mask
from hcr.generation.cache import RaggedStaticCache
from hcr.generation.pooling import NativePooling
from hcr.timing import StageClock
from hcr_kernels import autotune, decode_linears

STRATEGIES = ("cache", "recompute")
STAGES = ("prefill", "decode", "pooling", "re-encode")  # time_split's keys, with "other" and "autotune"
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")  # the attention kinds whose mask is built here

DYNAMIC = {"dynamic": True}  # torch.compile options of the forwards whose shapes change every step


def _compile_options(device: torch.device) -> dict:
    """``torch.compile`` options of a decode step's forward on ``device``.

    CUDA: ``mode="reduce-overhead"`` (CUDA graphs), as a small model's decode step is bound by kernel
    launches. A graph replays only the input shapes, and the addresses written in place, it was recorded
    with: so graphed decode steps attend over all the cache's slots (the mask hides the unwritten ones)
    and the cache tensors are marked static addresses (cudagraph trees do not graph in-place writes to
    other inputs); automatic dynamic shapes then give one graph per cache size. CPU: no graphs to
    replay; dynamic shapes let every attention span share one compiled graph.
    """
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    return dict(DYNAMIC)


def _uses_cuda_graphs(options: dict) -> bool:
    return options.get("mode") == "reduce-overhead"


def _initial_slots(longest_prompt: int, max_new_tokens: int, window: int, keep_last: int) -> int:
    """The cache slots to start with: the prompt, a block's markers and one slot per window of the new
    tokens, and the uncompressed tail (up to W + k tokens): what a row compressing its reasoning holds."""
    return longest_prompt + 4 + max_new_tokens // window + window + keep_last


def attention_layer_types(config) -> tuple[str, ...] | None:
    """The kinds of attention layer of a decoder config, each of which gets its own mask.

    transformers >= 4.53 reads ``attention_mask`` as a dict keyed by ``config.layer_types``
    (``{"full_attention": …, "sliding_attention": …}`` for Qwen2) when it is given a dict;
    older versions have no ``layer_types`` and take the one 4D mask (None here). A kind
    this generator cannot mask (chunked, linear attention) is refused rather than given a
    full causal mask it would misread.
    """
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ValueError("a sliding-window model config without layer_types (transformers < 4.53) is not "
                             "supported: upgrade transformers")
        return None
    if "sliding_attention" in types and not getattr(config, "sliding_window", None):
        raise ValueError("the model config has sliding_attention layers but no sliding_window")
    unknown = sorted(set(types) - set(MASKED_LAYER_TYPES))
    if unknown:
        raise ValueError(f"the model has attention layers of kind {unknown}; CompressedGenerator builds masks "
                         f"for {list(MASKED_LAYER_TYPES)} only")
    return tuple(sorted(set(types)))


def _model_forward(base, embeds, positions, mask, cache, **forward_kwargs):
    """One forward of the base model against the ragged cache (explicit positions, ready 4D masks): the logits.

    ``mask`` is the causal additive mask ``[B, 1, steps, span]``; ``layer_masks`` derives each layer kind's.
    ``forward_kwargs``: what a ``RaggedAttention`` block's attention calls need (``step_kwargs``), and
    ``logits_to_keep`` (see ``keeps_logits``).
    """
    return base(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{cache.model_keyword: cache},
                attention_mask=layer_masks(base.config, mask, positions), **forward_kwargs).logits


def _masked(forward, base, embeds, positions, mask, cache, **forward_kwargs):
    """``forward`` (``_model_forward`` or its compiled self) given the mask made by ``mask()``: a step's decoder
    takes a function making its mask, as a native Qwen2 step (``direct_forward``) reads none."""
    return forward(base, embeds, positions, mask(), cache, **forward_kwargs)


_decoder_forward = functools.partial(_masked, _model_forward)


def _direct_decoder_forward(plan, base, embeds, positions, mask, cache, **forward_kwargs):
    """``_decoder_forward``'s logits through ``plan``, a ``direct_forward.StepPlan`` of ``base`` (transformers'
    Qwen2 only; see its module), the masks made only if its step reads them."""
    return plan(embeds, positions, lambda: layer_masks(base.config, mask(), positions), cache, **forward_kwargs)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def keeps_logits(base) -> bool:
    """Whether ``base.forward`` takes ``logits_to_keep`` (transformers 4.50+): the positions whose logits to
    compute. A prefill or re-encode step needs one position per row, and the lm_head of a real
    vocabulary over all of them would cost more than the rest of the step (R1-Distill-Qwen-1.5B:
    152k x 1536 per position; a batch of 8 prompts of 512 tokens would return 2.5 GB of fp32 logits)."""
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def layer_masks(config, causal: torch.Tensor, positions: torch.Tensor):
    """The ``attention_mask`` argument of a step: the causal mask per kind of attention layer (cache slot i
    holds position i, so a sliding-attention layer also hides slots ``<= position - sliding_window``), or
    the one causal mask where the config has no ``layer_types``."""
    kinds = attention_layer_types(config)
    if kinds is None:
        return causal
    masks = {}
    for kind in kinds:
        if kind == "sliding_attention":
            slot = torch.arange(causal.shape[-1], device=causal.device)
            outside = slot[None, None, :] <= positions[:, :, None] - config.sliding_window
            masks[kind] = causal.masked_fill(outside[:, None], torch.finfo(causal.dtype).min)
        else:
            masks[kind] = causal
    return masks


@dataclass
class RowState:
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    reasoning_windows: int = 0  # m: windows of the reasoning compressed so far
    answer_windows: int = 0  # windows of the answer compressed so far (compress_answer only)
    think_at: int | None = None  # index of </think> in ``generated``
    done: bool = False
    stop_reason: str | None = None  # "eos", "max_new_tokens" or "context", once done
    cached_ids: list[int] = field(default_factory=list)  # the layout the cache holds
    peak_cache_length: int = 0

    @property
    def cache_length(self) -> int:
        return len(self.cached_ids)

    @property
    def compressions(self) -> int:
        return self.reasoning_windows + self.answer_windows

    def hold(self, first: int, ids: list[int]) -> None:
        """Record that the cache now holds what it held before slot ``first``, then ``ids`` (in place: O(len(ids)))."""
        del self.cached_ids[first:]
        self.cached_ids.extend(ids)
        self.peak_cache_length = max(self.peak_cache_length, len(self.cached_ids))


@dataclass(frozen=True)
class Feed:
    """What one cached forward feeds a row: its layout's ``ids`` from cache slot ``first`` on, of which
    those at offsets ``slots`` are pooled vectors, of the tokens ``windows`` (one list of W per slot)."""

    first: int
    ids: list[int]
    windows: list[list[int]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)


@dataclass
class GenerationOutput:
    """``sequences``: the generated tokens ``[B, n]`` (uncompressed, padded with ``pad_token_id``);
    per row: compressions done, peak and final cache length (slots), final layout; wall time and its
    split (seconds, disjoint, summing to ``seconds``): ``prefill``, ``decode`` (ordinary steps),
    ``pooling`` (the pooler and the splice), ``re-encode`` (the rest of the steps that compressed),
    ``other`` (sampling and bookkeeping), ``autotune`` (measuring which kernel wins at a shape this
    machine has not seen: once per machine and shape class, then read from the autotuner's cache); per
    row, why it stopped (``stop_reasons``: ``"eos"``, ``"max_new_tokens"``, or ``"context"``: its next
    token would have sat past the model's context)."""

    sequences: torch.Tensor
    compressions: list[int]
    peak_cache_length: list[int]
    final_cache_length: list[int]
    layouts: list[list[int]]
    seconds: float
    time_split: dict[str, float]
    stop_reasons: list[str] = field(default_factory=list)


class CompressedGenerator:
    def __init__(self, model, tokenizer, window_size: int | None = None, keep_last: int = 4, strategy: str = "cache",
                 compress_answer: bool = False, decode_kernels: bool = True, compile_decode: bool = False,
                 direct_forward: bool = True):
        if not hasattr(model, "compressed_embeddings") or getattr(model, "pooler", None) is None:
            raise ValueError("model must be a CompressionModel (a base model with an embed pooler)")
        window_size = model.config.window if window_size is None else window_size
        check_values(window_size=(window_size, POSITIVE_INT), keep_last=(keep_last, NON_NEGATIVE_INT))
        if window_size != model.config.window:
            raise ValueError(f"window_size={window_size} but the model's pooler was trained on windows of "
                             f"{model.config.window}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        check_values(compress_answer=(compress_answer, FLAG), decode_kernels=(decode_kernels, FLAG),
                     compile_decode=(compile_decode, FLAG), direct_forward=(direct_forward, FLAG))
        self.model, self.tokenizer = model, tokenizer
        self.tokens = CompressionTokens.from_tokenizer(tokenizer)
        self.window, self.keep_last, self.strategy = window_size, keep_last, strategy
        self.compress_answer = compress_answer
        self.decode_kernels = decode_kernels
        self.compile_decode = compile_decode
        self.direct_forward = direct_forward
        # whether direct_forward agreed with base(...) at this generator's first decode step (None: not yet)
        self._direct_checked: bool | None = None
        self._direct_now = False  # whether this generate() call may step through direct_forward
        self._step_plan = None  # that call's direct_forward.StepPlan
        self._pooling = None  # that call's NativePooling, if its pooler takes one
        self.layer_types = attention_layer_types(model.base.config)
        self.keeps_logits = keeps_logits(model.base)
        self._compiled = {}  # torch.compile'd _model_forward per set of options, made on first use

    # ----------------------------------------------------------------- public

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, streamer=None,
                 generator: torch.Generator | None = None, return_dict_in_generate: bool = False,
                 strategy: str | None = None):
        """Like ``model.generate``: returns the generated ids ``[B, n]`` (or a GenerationOutput).

        Compression tokens are never written (their logits are masked, before ``top_k``/``top_p``
        and the greedy argmax). A row also stops, with a warning, when its next token would sit
        past ``max_position_embeddings``: compression keeps the layout short, so that is checked
        on the layout's length, not on the tokens generated.

        As in ``model.generate``: ``eos_token_id`` one id or several (a list, tuple or 1-D tensor;
        default the tokenizer's EOS), any of which ends a row (an id the model never writes, such as
        -1, never does); ``top_k`` 0 or None keeps every token, ``top_p`` in (0, 1], both only when
        sampling; ``pad_token_id`` (default the tokenizer's pad, else the first EOS id) fills the
        returned rows after their end. A batch of no rows returns no rows.
        """
        strategy = self.strategy if strategy is None else strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        eos = self._eos_ids(eos_token_id)
        check_values(do_sample=(do_sample, FLAG), return_dict_in_generate=(return_dict_in_generate, FLAG),
                     max_new_tokens=(max_new_tokens, NON_NEGATIVE_INT), pad_token_id=(pad_token_id, optional(TOKEN_ID)))
        if do_sample:  # as model.generate, the sampling settings are read (and checked) only when sampling
            check_values(temperature=(temperature, POSITIVE_NUMBER), top_k=(top_k, optional(NON_NEGATIVE_INT)),
                         top_p=(top_p, optional(PROBABILITY)))
        rows = self._rows(input_ids, attention_mask)
        if streamer is not None and len(rows) != 1:
            raise ValueError("a streamer needs batch size 1")
        if pad_token_id is None:  # a pad id of 0 is a real id, not a missing one
            pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        # A written <|vision_start|> (or end marker, or placeholder) would have its embedding swapped for
        # the pooler's marker row (the training convention), silently changing what the model reads;
        # untrained or badly trained models do write them. -inf in 3 columns of a vocabulary that also
        # holds eos and the template tokens cannot empty a row.
        reserved = torch.tensor(self._reserved, dtype=torch.long, device=self.model.device)

        def sample(logits):
            return self._sample(logits.index_fill_(-1, reserved, float("-inf")), do_sample, temperature, top_k,
                                top_p, generator)

        # the autotuner's first measurements of a shape (a one-time cost, cached per machine) are set aside
        clock = StageClock(STAGES, set_aside=("autotune", autotune.measuring_seconds))
        with clock("other"):  # what the named stages leave: sampling, bookkeeping
            self._run(rows, strategy, max_new_tokens, eos, sample, streamer, clock)
        split = dict(clock.seconds)
        seconds = sum(split.values())  # the wall time of the block above: its stages are disjoint
        stopped = sum(row.stop_reason == "context" for row in rows)
        if stopped:
            warnings.warn(f"{stopped} of {len(rows)} rows stopped at the model's context "
                          f"(max_position_embeddings={self._context})", stacklevel=2)
        sequences = self._pad([row.generated for row in rows], pad_token_id)  # outside inference mode: usable with autograd
        if not return_dict_in_generate:
            return sequences
        return GenerationOutput(
            sequences=sequences,
            compressions=[row.compressions for row in rows],
            peak_cache_length=[row.peak_cache_length for row in rows],
            final_cache_length=[row.cache_length for row in rows],
            layouts=[self.layout(row) for row in rows],
            seconds=seconds,
            time_split=split,
            stop_reasons=[row.stop_reason for row in rows],
        )

    def _run(self, rows, strategy, max_new_tokens, eos, sample, streamer, clock) -> None:
        """The generation itself, inside the kernels' and attention's blocks."""
        if not rows:  # nothing to generate for (a shard of an evaluation may be empty)
            return
        kernels = decode_linears(self.model) if self.decode_kernels else contextlib.nullcontext()
        # the cached steps' attention through hcr_kernels.decode_attention where it wins (eager steps only: a
        # compiled step keeps the model's attention; the recompute oracle runs the model untouched)
        routed = self.decode_kernels and strategy == "cache" and not self.compile_decode
        # asked at every call: a hook registered since the last one makes the model's own forward necessary
        self._direct_now = (self.direct_forward and self._direct_checked is not False
                            and direct.supports(self.model.base))
        attention = RaggedAttention(self.model.base) if routed else None
        with torch.inference_mode(), kernels, attention or contextlib.nullcontext():
            self._step_plan = None  # looked up at the first direct step, once the blocks have routed the layers
            # the pooler as one native call where measured faster, in both strategies (they pool alike)
            self._pooling = NativePooling.for_model(self.model) if self.decode_kernels else None
            if strategy == "cache":
                steps = CachedSteps(self, rows, max_new_tokens, clock, attention)
            else:
                steps = RecomputedSteps(self, rows, max_new_tokens, clock)
            for row, token in self._loop(rows, steps, max_new_tokens, eos, sample):
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
        if streamer is not None:
            streamer.end()

    def layout(self, row: RowState) -> list[int]:
        """A row's compressed layout, placeholders standing for the pooled vectors."""
        return self._layout(row).ids.tolist()

    # ----------------------------------------------------------------- the loop and its decisions

    def _loop(self, rows, steps, max_new_tokens, eos, sample):
        """Prefill, then sample, write and step until every row is done; yields ``(row, token)`` for every
        token a row writes, in order."""
        if not max_new_tokens or all(row.done for row in rows):
            for row in rows:
                row.stop_reason = row.stop_reason or "max_new_tokens"
            return
        logits = steps.prefill()
        context = self._context  # looked up once: a walk through the model's attributes, per row it was ~4% of a step
        for _ in range(max_new_tokens):
            chosen = sample(logits).tolist()
            crops = {}  # row index -> the cache slot its layout changed from, for the rows that compressed
            for index, row in enumerate(rows):
                if row.done:
                    continue
                token = chosen[index]
                row.generated.append(token)
                yield row, token
                crop = self._write(row, token, eos, max_new_tokens, context)
                if crop is not None:
                    crops[index] = crop
            if all(row.done for row in rows):
                return
            logits = steps.step(crops)

    def _write(self, row: RowState, token: int, eos: tuple[int, ...], max_new_tokens: int,
               context: int | None) -> int | None:
        """Update a row after it wrote ``token`` (appended to ``row.generated``): ``</think>``, the stop
        rules (``context``: the model's ``max_position_embeddings``, None for none), the compress decision.
        Returns the cache slot its layout changed from if it compressed, None if the layout only grew by
        ``token`` (or the row is done)."""
        W, due = self.window, self.window + self.keep_last
        before = row.reasoning_windows, row.answer_windows
        crop = None
        if token == self.tokens.think_end and row.think_at is None:
            row.think_at = len(row.generated) - 1
            if self.compress_answer:  # the reasoning ends with all its full windows pooled
                crop = self._compress(row, "reasoning", (row.think_at - row.reasoning_windows * W) // W)
        if token in eos or len(row.generated) >= max_new_tokens:
            row.done, row.stop_reason = True, "eos" if token in eos else "max_new_tokens"
            return None
        if row.think_at is None:
            if len(row.generated) - row.reasoning_windows * W >= due:
                crop = self._compress(row, "reasoning", 1)
        elif self.compress_answer:
            if len(row.generated) - (row.think_at + 1) - row.answer_windows * W >= due:
                crop = self._compress(row, "answer", 1)
        if context is not None and self._layout_length(row) + 1 > context:
            # the next token would sit at position >= limit. Like every row that stops, this one leaves
            # its last token uncompressed (it is never fed back): the layout it ends with fits, since
            # the previous step's check left room for this token
            row.reasoning_windows, row.answer_windows = before
            row.done, row.stop_reason = True, "context"
            return None
        return crop

    def _compress(self, row: RowState, part: str, count: int) -> int | None:
        """Pool the next ``count`` windows of the row's ``"reasoning"`` or ``"answer"``; the slot of the
        layout the change starts at (a block's end marker, where the new slots go, or where a new block
        opens), from which the cache must be re-encoded. None for ``count`` 0."""
        if count <= 0:
            return None
        if part == "reasoning":
            block, pooled = len(row.prompt), row.reasoning_windows
            row.reasoning_windows += count
        else:  # the answer's block follows the prompt, the reasoning block and tail, and </think>
            reasoning_block = row.reasoning_windows + 2 if row.reasoning_windows else 0
            block = (len(row.prompt) + reasoning_block + row.think_at - row.reasoning_windows * self.window + 1)
            pooled = row.answer_windows
            row.answer_windows += count
        return block + 1 + pooled if pooled else block

    def _layout(self, row: RowState) -> CompressedLayout:
        """The row's layout by the training's definition: its prompt, reasoning, ``</think>`` and answer."""
        reasoning_start = len(row.prompt)
        end = reasoning_start + len(row.generated)
        if row.think_at is None:
            reasoning_end = answer_start = end
        else:
            reasoning_end = reasoning_start + row.think_at
            answer_start = reasoning_end + 1
        return compressed_layout(row.prompt + row.generated, reasoning_start=reasoning_start,
                                 reasoning_end=reasoning_end, answer_start=answer_start, answer_end=end,
                                 reasoning_windows=row.reasoning_windows, answer_windows=row.answer_windows,
                                 window=self.window, tokens=self.tokens)

    def _layout_length(self, row: RowState) -> int:
        """``len(self.layout(row))`` without building it (checked every step)."""
        return compressed_length(len(row.prompt) + len(row.generated), self.window, row.reasoning_windows,
                                 row.answer_windows)

    @property
    def _reserved(self) -> tuple[int, int, int]:
        """The compression tokens: the generator never writes them and a prompt may not hold them."""
        return self.tokens.placeholder, self.tokens.block_start, self.tokens.block_end

    @property
    def _context(self) -> int | None:
        return getattr(self.model.base.config, "max_position_embeddings", None)

    def _eos_ids(self, eos_token_id) -> tuple[int, ...]:
        """The ids that end a row: ``eos_token_id`` (an int, or several as ``model.generate`` takes them)."""
        if eos_token_id is None:
            return (self.tokens.eos,)
        ids = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
        ids = [ids] if not isinstance(ids, (list, tuple, set, frozenset)) else list(ids)
        if not ids or not all(TOKEN_ID[0](i) for i in ids):
            raise ValueError(f"eos_token_id must be a token id or a non-empty list of them, got {eos_token_id!r}")
        ids = [int(i) for i in ids]
        written_never = set(ids) & set(self._reserved)
        if written_never:
            raise ValueError(f"eos_token_id {sorted(written_never)} is a compression token, which the generator "
                             f"never writes: no row would stop at it")
        return tuple(dict.fromkeys(ids))  # in the order given: the first is the default pad

    def _rows(self, input_ids, attention_mask) -> list[RowState]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, length] tensor of token ids")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 1 (a prompt token) and 0 (padding) only")
        self._check_ids(input_ids, attention_mask.bool())
        limit = self._context
        rows = []
        for index, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.bool().tolist())):
            prompt = [t for t, keep in zip(ids, mask) if keep]
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            if limit is not None and len(prompt) > limit:
                raise ValueError(f"prompt {index} has {len(prompt)} tokens, more than the model's context of {limit}")
            full = limit is not None and len(prompt) == limit  # no room for a single token
            rows.append(RowState(prompt=prompt, done=full, stop_reason="context" if full else None))
        return rows

    def _check_ids(self, input_ids, keep) -> None:
        """A ValueError naming the first bad id among the unmasked ones (not an IndexError from the embedding).

        Compression tokens are refused too: a prompt cannot hold compressed blocks in this generator
        (a block-start id would be embedded as the pooler's marker, a placeholder as an unfilled slot).
        """
        vocab = self.model.base.get_input_embeddings().num_embeddings
        ids = input_ids.cpu()
        keep = keep.cpu()
        outside = ((ids < 0) | (ids >= vocab)) & keep
        reserved = torch.isin(ids, torch.tensor(self._reserved)) & keep
        for bad, why in ((outside, f"is not a token id of the model (vocab {vocab})"),
                         (reserved, "is a compression token: a prompt cannot hold compressed blocks")):
            if bad.any():
                row, position = bad.nonzero()[0].tolist()
                raise ValueError(f"input_ids[{row}, {position}] = {ids[row, position].item()} {why}")

    @staticmethod
    def _sample(logits, do_sample, temperature, top_k, top_p, generator):
        if not do_sample:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            beyond = ordered.softmax(-1).cumsum(-1) > top_p
            beyond[..., 1:] = beyond[..., :-1].clone()
            beyond[..., 0] = False  # the most likely token always stays
            logits = logits.masked_fill(beyond.scatter(-1, order, beyond), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    @staticmethod
    def _pad(sequences: list[list[int]], pad: int) -> torch.Tensor:
        width = max((len(s) for s in sequences), default=0)
        out = torch.full((len(sequences), width), pad, dtype=torch.long)
        for index, sequence in enumerate(sequences):
            out[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return out

    # ----------------------------------------------------------------- forwards

    @property
    def _graphed_decode(self) -> bool:
        """Whether decode steps run as CUDA graphs: static shapes (the whole cache attended), static cache."""
        return self.compile_decode and _uses_cuda_graphs(_compile_options(self.model.device))

    def _decoder(self, decode: bool):
        """The forward of a cached step: eager, or compiled (a decode step with ``_compile_options``,
        prefill and re-encode, whose lengths change from step to step, with dynamic shapes)."""
        if not self.compile_decode:
            if self._direct_now and self._direct_checked is None and decode:
                return self._checked_direct_forward
            if self._direct_now and self._direct_checked:
                return functools.partial(_direct_decoder_forward, self._plan())
            return _decoder_forward
        options = _compile_options(self.model.device) if decode else DYNAMIC
        key = tuple(sorted(options.items()))
        if key not in self._compiled:
            self._compiled[key] = functools.partial(_masked, torch.compile(_model_forward, **options))
        return self._compiled[key]

    def _compressed_embeddings(self, ids, window_ids, slot_mask) -> torch.Tensor:
        """The model's embeddings of a compressed feed, its windows pooled natively where this call may."""
        if self._pooling is None:
            return self.model.compressed_embeddings(ids, window_ids, slot_mask)
        return self.model.compressed_embeddings(ids, window_ids, slot_mask, window_hidden=self._pooling)

    def _plan(self) -> direct.StepPlan:
        """This generate() call's ``StepPlan`` of the base model, made at its first direct step."""
        if self._step_plan is None:
            self._step_plan = direct.StepPlan(self.model.base)
        return self._step_plan

    def _checked_direct_forward(self, base, embeds, positions, mask, cache, **forward_kwargs):
        """A decode step through both forwards, ``base(...)``'s last (its cache writes and logits are the
        step's); ``direct_forward`` is kept for the steps after only if its logits are the same, bit for bit."""
        why = "gave other logits than the model's own forward"
        try:
            direct_logits = _direct_decoder_forward(self._plan(), base, embeds, positions, mask, cache,
                                                    **forward_kwargs)
        except (AttributeError, TypeError, KeyError) as error:  # a transformers whose Qwen2 changed shape
            direct_logits, why = None, f"failed ({type(error).__name__}: {error})"
        logits = _decoder_forward(base, embeds, positions, mask, cache, **forward_kwargs)
        self._direct_checked = direct_logits is not None and torch.equal(direct_logits, logits)
        if not self._direct_checked:
            warnings.warn(f"hcr.generation.direct_forward {why} with transformers {_transformers_version()}: "
                          "CompressedGenerator uses the model's forward (slower on CPU)", stacklevel=2)
        return logits


class RecomputedSteps:
    """The oracle strategy: every step re-encodes each active row's whole layout, without a cache."""

    def __init__(self, generator: CompressedGenerator, rows: list[RowState], max_new_tokens: int, clock: StageClock):
        self.generator, self.rows, self.clock = generator, rows, clock

    def prefill(self) -> torch.Tensor:
        with self.clock("prefill"):
            return self._encode()

    def step(self, crops: dict[int, int]) -> torch.Tensor:
        with self.clock("re-encode" if crops else "decode"):
            return self._encode()

    def _encode(self) -> torch.Tensor:
        model = self.generator.model
        logits = []
        for row in self.rows:
            if row.done:
                logits.append(None)
                continue
            layout = self.generator._layout(row)
            ids = torch.from_numpy(layout.ids).to(model.device)[None]
            window_ids = torch.from_numpy(layout.windows).to(ids.device)
            slot_mask = torch.zeros_like(ids, dtype=torch.bool)  # the blocks' slots only, not a written placeholder
            slot_mask[0, torch.from_numpy(layout.slots).to(ids.device)] = True
            with self.clock("pooling"):
                embeds = self.generator._compressed_embeddings(ids, window_ids, slot_mask)
            row.hold(0, layout.ids.tolist())
            last = {"logits_to_keep": 1} if self.generator.keeps_logits else {}
            logits.append(model.base(inputs_embeds=embeds, use_cache=False, **last).logits[0, -1])
        width = next(x for x in logits if x is not None)
        return torch.stack([x if x is not None else torch.zeros_like(width) for x in logits])


class CachedSteps:
    """The fast strategy: a static ragged KV cache; a step feeds each row only what its cache lacks."""

    def __init__(self, generator: CompressedGenerator, rows: list[RowState], max_new_tokens: int, clock: StageClock,
                 attention: RaggedAttention | None = None):
        self.generator, self.rows, self.clock = generator, rows, clock
        self.attention = attention  # an open RaggedAttention block, or None: the model's own attention
        longest = max(len(row.prompt) for row in rows)
        # a layout never exceeds prompt + tokens written + 2 markers per block (W = 1 pools nothing away)
        self.bound = longest + max_new_tokens + 4
        # CUDA graphs replay fixed addresses: the bound up front. Otherwise what a row that compresses its
        # reasoning holds, grown by doubling when a layout needs more (an uncompressed answer, W = 1)
        slots = self.bound if generator._graphed_decode else min(
            self.bound, _initial_slots(longest, max_new_tokens, generator.window, generator.keep_last))
        self.cache = RaggedStaticCache.for_model(generator.model.base, len(rows), slots)
        # looked up once: a model's device is a walk to its first parameter, its embeddings a few lookups
        self.device, self.embed_tokens = generator.model.device, generator.model.base.get_input_embeddings()
        if generator._graphed_decode:  # written in place by the graphs: their addresses must not change
            for tensor in (*self.cache.keys, *self.cache.values):
                torch._dynamo.mark_static_address(tensor)

    def prefill(self) -> torch.Tensor:
        with self.clock("prefill"):
            return self._forward([Feed(0, [] if row.done else list(row.prompt)) for row in self.rows])

    def step(self, crops: dict[int, int]) -> torch.Tensor:
        """Decode the rows that only grew, re-encode from its crop slot each row that compressed."""
        feeds = []
        for index, row in enumerate(self.rows):
            if row.done:
                feeds.append(Feed(row.cache_length, []))
            elif index in crops:
                feeds.append(self._reencode_feed(row, crops[index]))
            else:
                feeds.append(Feed(row.cache_length, row.generated[-1:]))
        with self.clock("re-encode" if crops else "decode"):
            return self._forward(feeds)

    def _reencode_feed(self, row: RowState, crop: int) -> Feed:
        """The row's layout from slot ``crop`` on: the new vectors, the end marker, the kept tail."""
        if crop > row.cache_length:
            raise RuntimeError(f"compression crop slot {crop} is past the row's {row.cache_length} cached slots")
        layout = self.generator._layout(row)
        slots = layout.slots
        kept = slots >= crop
        return Feed(crop, layout.ids[crop:].tolist(), layout.windows[kept].tolist(), (slots[kept] - crop).tolist())

    def _forward(self, feeds: list[Feed]) -> torch.Tensor:
        """One forward of every row's feed against the cache; each row's next-token logits."""
        generator, rows = self.generator, self.rows
        model, tokens, device = generator.model, generator.tokens, self.device
        lengths = [len(feed.ids) for feed in feeds]
        steps = max(1, max(lengths))
        filler = tokens.eos  # under the mask, never attended to, never written to the cache
        ids = torch.tensor([feed.ids + [filler] * (steps - len(feed.ids)) for feed in feeds], device=device)
        windows = [window for feed in feeds for window in feed.windows]
        pooled = bool(windows) or any(token in tokens.markers for feed in feeds for token in feed.ids)
        decode = steps == 1
        needed = max(feed.first + n for feed, n in zip(feeds, lengths))
        if needed > self.cache.slots:
            self.cache.grow(min(self.bound, max(needed, 2 * self.cache.slots)))
        # attention reads slots [0, span); a CUDA graph needs the same span at every decode step: all slots
        if decode and generator._graphed_decode:
            span = self.cache.slots
        else:
            span = needed
        if pooled:
            with self.clock("pooling"):
                slot_mask = torch.zeros_like(ids, dtype=torch.bool)
                fed_rows = [index for index, feed in enumerate(feeds) for _ in feed.slots]
                if fed_rows:  # one indexed write for every row (one per row was ~3 % of the demo's W = 2 time)
                    slot_mask[fed_rows, [slot for feed in feeds for slot in feed.slots]] = True
                window_ids = torch.tensor(windows, dtype=torch.long, device=device).view(-1, generator.window)
                embeds = self.generator._compressed_embeddings(ids, window_ids, slot_mask)
        else:  # an ordinary decode step: plain token embeddings
            embeds = self.embed_tokens(ids)
        starts = torch.tensor([feed.first for feed in feeds], dtype=torch.long, device=device)
        counts = torch.tensor(lengths, dtype=torch.long, device=device)
        positions = starts[:, None] + torch.arange(steps, device=device)
        mask = functools.partial(causal_mask, positions, span, embeds.dtype)  # causal, per row; made where read
        self.cache.begin_step(starts, counts, span)
        # a feed shorter than `steps` (a finished row, a decode beside a re-encode) has filler queries at
        # positions past its slots, past the span where that row is the longest: their outputs are dropped,
        # and the attention kernel, which checks every position against the span, reads them at its last slot
        kernel_positions = positions.clamp(max=max(span - 1, 0))
        extra = self.attention.step_kwargs(kernel_positions) if self.attention is not None else {}
        last = (counts - 1).clamp(min=0)  # each row's last fed position (0 for a row fed nothing)
        if steps > 1 and generator.keeps_logits:  # the lm_head at the rows' last positions only
            kept, last = torch.unique(last, return_inverse=True)
            extra["logits_to_keep"] = kept
        logits = generator._decoder(decode)(model.base, embeds, positions, mask, self.cache, **extra)
        for row, feed in zip(rows, feeds):
            if feed.ids:
                row.hold(feed.first, feed.ids)
        if steps == 1:
            return logits[:, 0]
        return logits[torch.arange(len(rows), device=device), last]
