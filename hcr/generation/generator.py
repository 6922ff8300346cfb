"""CompressedGenerator: batched generation that compresses its own reasoning as it goes.

Layout (the training builder's, ``hcr.compression.examples``): a row is its prompt,
then, once something is compressed, one block ``<|vision_start|> v1 … vm <|vision_end|>``,
then the uncompressed tail of what it generated. Whenever the tail holds at least
``W + k`` tokens (``k = keep_last``), its oldest W tokens are pooled into v(m+1).
Writing ``</think>`` ends the reasoning. By default compression stops there. With
``compress_answer`` (the builder's option of the same name) the full windows still
in the reasoning tail are pooled at once (so the reasoning ends as in the
builder's last reasoning stage, ``r // W`` windows), and the answer is compressed
by the same rule into a second block after ``</think>``.

Strategies share every decision (sampling, when to compress) and differ only in
how the next-token logits are computed:

* ``"cache"`` (default): a static KV cache with per-row lengths. An ordinary step
  decodes one token per row against the cache; a compression crops that row back
  to its end marker and re-encodes only ``v(m+1)``, the end marker and the kept
  tail. Positions stay contiguous, exactly as in a full re-encode. The 4D mask
  and the position ids are built once per step, for all rows at once.
* ``"recompute"``: re-encodes every row's whole layout every step: slow,
  simple, the correctness oracle.

Both run under ``torch.inference_mode`` and, by default (``decode_kernels``), with
the model's ``nn.Linear`` layers routed through ``hcr_kernels.decode_linear``: on CPU
the few-row matmuls of a decode step are bound by how fast the weights stream, which
the native kernel does faster than the BLAS ``F.linear`` calls on most CPUs; each
layer takes it only at row counts where it was measured faster on this machine
(``hcr_kernels.autotune``), so the routing never makes a step slower.

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
import time
import warnings
from dataclasses import dataclass, field

import torch

from hcr.compression.tokens import CompressionTokens
from hcr.generation.cache import RaggedStaticCache
from hcr_kernels import decode_linears

STRATEGIES = ("cache", "recompute")


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


def _decoder_forward(base, embeds, positions, mask, cache):
    """One forward of the base model against the ragged cache (explicit positions, a ready 4D mask): the logits."""
    return base(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
                attention_mask={"full_attention": mask, "sliding_attention": mask}).logits


@dataclass
class RowState:
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    windows: int = 0  # m: reasoning windows compressed so far
    answer_windows: int = 0  # windows of the answer (compress_answer only)
    think_at: int | None = None  # index of </think> in ``generated``
    done: bool = False
    stop_reason: str | None = None  # "eos", "max_new_tokens" or "context", once done
    cached_ids: list[int] = field(default_factory=list)  # the layout the cache holds
    peak_cache_length: int = 0

    @property
    def cache_length(self) -> int:
        return len(self.cached_ids)

    def hold(self, first: int, ids: list[int]) -> None:
        """Record that the cache now holds what it held before slot ``first``, then ``ids`` (in place: O(len(ids)))."""
        del self.cached_ids[first:]
        self.cached_ids.extend(ids)
        self.peak_cache_length = max(self.peak_cache_length, len(self.cached_ids))


@dataclass
class GenerationOutput:
    """``sequences``: the generated tokens ``[B, n]`` (uncompressed, padded with ``pad_token_id``);
    per row: compressions done, peak and final cache length (slots), final layout; wall time and its
    split (seconds, disjoint, summing to ``seconds``): ``prefill``, ``decode`` (ordinary steps),
    ``pooling`` (the pooler and the splice), ``re-encode`` (the rest of the steps that compressed),
    ``other`` (sampling and bookkeeping); per row, why it stopped (``stop_reasons``: ``"eos"``,
    ``"max_new_tokens"``, or ``"context"``: its next token would have sat past the model's context)."""

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
                 compress_answer: bool = False, decode_kernels: bool = True, compile_decode: bool = False):
        if not hasattr(model, "compressed_embeddings") or getattr(model, "pooler", None) is None:
            raise ValueError("model must be a CompressionModel (a base model with an embed pooler)")
        window_size = model.config.window if window_size is None else window_size
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an int >= 1, got {window_size!r}")
        if window_size != model.config.window:
            raise ValueError(f"window_size={window_size} but the model's pooler was trained on windows of "
                             f"{model.config.window}")
        if not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.model, self.tokenizer = model, tokenizer
        self.tokens = CompressionTokens.from_tokenizer(tokenizer)
        self.window, self.keep_last, self.strategy = window_size, keep_last, strategy
        self.compress_answer = compress_answer
        self.decode_kernels = decode_kernels
        self.compile_decode = compile_decode
        self._compiled = {}  # torch.compile'd _decoder_forward per set of options, made on first use

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
        """
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        rows = self._rows(input_ids, attention_mask)
        if streamer is not None and len(rows) != 1:
            raise ValueError("a streamer needs batch size 1")
        eos = self.tokens.eos if eos_token_id is None else eos_token_id
        if pad_token_id is None:  # a pad id of 0 is a real id, not a missing one
            pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        split = dict.fromkeys(("prefill", "decode", "pooling", "re-encode", "other"), 0.0)
        # A written <|vision_start|> (or end marker, or placeholder) would have its embedding swapped for
        # the pooler's marker row (the training convention), silently changing what the model reads;
        # untrained or badly trained models do write them. -inf in 3 columns of a vocabulary that also
        # holds eos and the template tokens cannot empty a row.
        reserved = torch.tensor(self._reserved, dtype=torch.long, device=self.model.device)

        def sample(logits):
            return self._sample(logits.index_fill_(-1, reserved, float("-inf")), do_sample, temperature, top_k,
                                top_p, generator)

        began = time.perf_counter()
        kernels = decode_linears(self.model) if self.decode_kernels else contextlib.nullcontext()
        with torch.inference_mode(), kernels:
            for row, token in self._steps(rows, strategy, max_new_tokens, eos, split, sample):
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
        if streamer is not None:
            streamer.end()
        stopped = sum(row.stop_reason == "context" for row in rows)
        if stopped:
            warnings.warn(f"{stopped} of {len(rows)} rows stopped at the model's context "
                          f"(max_position_embeddings={self._context})", stacklevel=2)
        seconds = time.perf_counter() - began
        split["other"] = max(0.0, seconds - sum(split.values()))
        sequences = self._pad([row.generated for row in rows], pad_token_id)  # outside inference mode: usable with autograd
        if not return_dict_in_generate:
            return sequences
        return GenerationOutput(
            sequences=sequences,
            compressions=[row.windows + row.answer_windows for row in rows],
            peak_cache_length=[row.peak_cache_length for row in rows],
            final_cache_length=[row.cache_length for row in rows],
            layouts=[self.layout(row) for row in rows],
            seconds=seconds,
            time_split=split,
            stop_reasons=[row.stop_reason for row in rows],
        )

    @property
    def _reserved(self) -> tuple[int, int, int]:
        """The compression tokens: the generator never writes them and a prompt may not hold them."""
        return self.tokens.placeholder, self.tokens.block_start, self.tokens.block_end

    @property
    def _context(self) -> int | None:
        return getattr(self.model.base.config, "max_position_embeddings", None)

    def _steps(self, rows, strategy, max_new_tokens, eos, split, sample):
        """The generation loop; yields ``(row, token)`` for every token a row writes, in order."""
        if not max_new_tokens or all(row.done for row in rows):
            for row in rows:
                row.stop_reason = row.stop_reason or "max_new_tokens"
            return
        cache = None
        if strategy == "cache":
            longest = max(len(r.prompt) for r in rows)
            # a layout never exceeds prompt + tokens written + 2 markers per block (W = 1 pools nothing away)
            cache = RaggedStaticCache.for_model(self.model.base, len(rows), longest + max_new_tokens + 4)
            if self._graphed_decode:  # written in place by the graphs: their addresses must not change
                for tensor in (*cache.keys, *cache.values):
                    torch._dynamo.mark_static_address(tensor)
        logits = self._first_logits(rows, cache, split)
        for _ in range(max_new_tokens):
            chosen = sample(logits).tolist()
            changed = set()
            for index, row in enumerate(rows):
                if row.done:
                    continue
                token = chosen[index]
                row.generated.append(token)
                yield row, token
                if self._advance(row, token, eos, max_new_tokens):
                    changed.add(index)
            if all(row.done for row in rows):
                return
            logits = self._next_logits(rows, changed, cache, split)

    def layout(self, row: RowState) -> list[int]:
        """A row's compressed layout, placeholders standing for the pooled vectors."""
        return self._layout(row)[0]

    def _layout(self, row: RowState) -> tuple[list[int], list[list[int]], list[int]]:
        """(layout ids, the windows pooled into its slots, the slots' positions), in slot order."""
        W, t, generated = self.window, self.tokens, row.generated
        ids, windows, slots = list(row.prompt), [], []

        def block(first: int, count: int) -> None:  # count windows of generated, from index first
            if count:
                ids.append(t.block_start)
                for i in range(count):
                    slots.append(len(ids))
                    ids.append(t.placeholder)
                    windows.append(generated[first + i * W : first + (i + 1) * W])
                ids.append(t.block_end)

        reasoning_end = row.think_at if row.think_at is not None else len(generated)
        block(0, row.windows)
        ids.extend(generated[row.windows * W : reasoning_end])
        if row.think_at is not None:
            answer = row.think_at + 1
            ids.append(generated[row.think_at])
            block(answer, row.answer_windows)
            ids.extend(generated[answer + row.answer_windows * W :])
        return ids, windows, slots

    def _layout_length(self, row: RowState) -> int:
        """``len(self.layout(row))`` without building it: each window of W tokens became one slot."""
        pooled = row.windows + row.answer_windows
        markers = 2 * (row.windows > 0) + 2 * (row.answer_windows > 0)
        return len(row.prompt) + len(row.generated) - (self.window - 1) * pooled + markers

    def _advance(self, row: RowState, token: int, eos: int, max_new_tokens: int) -> bool:
        """Update a row after it wrote ``token``; True when that changed its compressed layout."""
        W, due = self.window, self.window + self.keep_last
        windows, answer_windows = row.windows, row.answer_windows
        before = row.windows + row.answer_windows
        if token == self.tokens.think_end and row.think_at is None:
            row.think_at = len(row.generated) - 1
            if self.compress_answer:  # the reasoning ends with all its full windows pooled
                row.windows += (row.think_at - row.windows * W) // W
        if token == eos or len(row.generated) >= max_new_tokens:
            row.done, row.stop_reason = True, "eos" if token == eos else "max_new_tokens"
            return False
        if row.think_at is None:
            if len(row.generated) - row.windows * W >= due:
                row.windows += 1
        elif self.compress_answer:
            if len(row.generated) - (row.think_at + 1) - row.answer_windows * W >= due:
                row.answer_windows += 1
        limit = self._context
        if limit is not None and self._layout_length(row) + 1 > limit:
            # the next token would sit at position >= limit. Like every row that stops, this one leaves
            # its last token uncompressed (it is never fed back): the layout it ends with fits, since
            # the previous step's check left room for this token
            row.windows, row.answer_windows = windows, answer_windows
            row.done, row.stop_reason = True, "context"
            return False
        return row.windows + row.answer_windows != before

    # ----------------------------------------------------------------- decisions

    def _rows(self, input_ids, attention_mask) -> list[RowState]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, length] tensor of token ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}")
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

    # ----------------------------------------------------------------- logits

    @property
    def _graphed_decode(self) -> bool:
        """Whether decode steps run as CUDA graphs: static shapes (the whole cache attended), static cache."""
        return self.compile_decode and _uses_cuda_graphs(_compile_options(self.model.device))

    def _forward(self, decode: bool):
        """The forward of a cached step: eager, or compiled (a decode step with ``_compile_options``,
        prefill and re-encode, whose lengths change from step to step, with dynamic shapes)."""
        if not self.compile_decode:
            return _decoder_forward
        options = _compile_options(self.model.device) if decode else DYNAMIC
        key = tuple(sorted(options.items()))
        if key not in self._compiled:
            self._compiled[key] = torch.compile(_decoder_forward, **options)
        return self._compiled[key]

    def _first_logits(self, rows, cache, split):
        return self._timed(split, "prefill", lambda: self._recompute(rows, split) if cache is None else
                           self._cached_step(rows, [(0, [] if row.done else list(row.prompt), [], []) for row in rows],
                                             cache, split))

    def _next_logits(self, rows, changed, cache, split):
        def step():
            if cache is None:
                return self._recompute(rows, split)
            chunks = [(row.cache_length, [], [], []) if row.done else self._chunk(row, index in changed)
                      for index, row in enumerate(rows)]
            return self._cached_step(rows, chunks, cache, split)

        return self._timed(split, "re-encode" if changed else "decode", step)

    @staticmethod
    def _timed(split, key, step):
        """Run ``step``, adding its time to ``split[key]`` less what it added to ``split["pooling"]``."""
        began, pooled = time.perf_counter(), split["pooling"]
        result = step()
        split[key] += time.perf_counter() - began - (split["pooling"] - pooled)
        return result

    def _chunk(self, row: RowState, changed: bool):
        """(first slot, ids, windows, slot offsets) to feed: the row's layout from where it leaves the cache.

        A decode step (``changed`` False: the layout only grew by the token just
        written) feeds that token. A compression crops the row back to the first
        position its layout changed (its block's end marker, or where a block opens)
        and re-encodes from there: the new vectors, the end marker, the kept tail.
        """
        if not changed:
            return row.cache_length, row.generated[-1:], [], []
        ids, windows, slots = self._layout(row)
        cached = row.cached_ids
        first = len(cached)
        if ids[:first] != cached:
            first = next(i for i, (a, b) in enumerate(zip(ids, cached)) if a != b)
        kept = [i for i, slot in enumerate(slots) if slot >= first]
        return first, ids[first:], [windows[i] for i in kept], [slots[i] - first for i in kept]

    def _recompute(self, rows, split):
        """The oracle: every active row's whole layout, re-encoded."""
        logits = []
        for row in rows:
            if row.done:
                logits.append(None)
                continue
            layout, windows, slots = self._layout(row)
            ids = torch.tensor([layout], device=self.model.device)
            window_ids = torch.tensor(windows, dtype=torch.long, device=ids.device).view(-1, self.window)
            slot_mask = torch.zeros_like(ids, dtype=torch.bool)  # the blocks' slots only, not a written placeholder
            slot_mask[0, slots] = True
            began = time.perf_counter()
            embeds = self.model.compressed_embeddings(ids, window_ids, slot_mask)
            split["pooling"] += time.perf_counter() - began
            row.hold(0, layout)
            logits.append(self.model.base(inputs_embeds=embeds, use_cache=False).logits[0, -1])
        width = next(x for x in logits if x is not None)
        return torch.stack([x if x is not None else torch.zeros_like(width) for x in logits])

    def _cached_step(self, rows, chunks, cache, split):
        """One forward of every row's chunk against the cache; returns each row's next-token logits."""
        device = self.model.device
        firsts = [first for first, _, _, _ in chunks]
        lengths = [len(chunk) for _, chunk, _, _ in chunks]
        steps = max(1, max(lengths))
        filler = self.tokens.eos  # under the mask, never attended to, never written to the cache
        ids = torch.tensor([chunk + [filler] * (steps - len(chunk)) for _, chunk, _, _ in chunks], device=device)
        windows = [window for _, _, chunk_windows, _ in chunks for window in chunk_windows]
        markers = self.tokens.markers
        pooled = bool(windows) or any(token in markers for _, chunk, _, _ in chunks for token in chunk)
        decode = steps == 1
        # attention reads slots [0, span); a CUDA graph needs the same span at every decode step: all slots
        span = cache.slots if decode and self._graphed_decode else max(f + n for f, n in zip(firsts, lengths))
        if pooled:
            began = time.perf_counter()
            slot_mask = torch.zeros_like(ids, dtype=torch.bool)
            for index, (_, _, _, chunk_slots) in enumerate(chunks):
                slot_mask[index, chunk_slots] = True
            window_ids = torch.tensor(windows, dtype=torch.long, device=device).view(-1, self.window)
            embeds = self.model.compressed_embeddings(ids, window_ids, slot_mask)
            split["pooling"] += time.perf_counter() - began
        else:  # an ordinary decode step: plain token embeddings
            embeds = self.model.base.get_input_embeddings()(ids)
        starts = torch.tensor(firsts, dtype=torch.long, device=device)
        counts = torch.tensor(lengths, dtype=torch.long, device=device)
        positions = starts[:, None] + torch.arange(steps, device=device)
        visible = torch.arange(span, device=device)[None, None, :] <= positions[:, :, None]  # causal, per row
        mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=device).masked_fill(
            ~visible, torch.finfo(embeds.dtype).min
        )[:, None]
        cache.begin_step(starts, counts, span)
        logits = self._forward(decode)(self.model.base, embeds, positions, mask, cache)
        for row, (first, chunk, _, _) in zip(rows, chunks):
            if chunk:
                row.hold(first, chunk)
        if steps == 1:
            return logits[:, 0]
        return logits[torch.arange(len(rows), device=device), (counts - 1).clamp(min=0)]
