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
* ``"recompute"``: re-encodes every row's whole layout every step (the seed's
  approach with its slips fixed): slow, simple, the correctness oracle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hcr.compression.tokens import CompressionTokens
from hcr.generation.cache import RaggedStaticCache

STRATEGIES = ("cache", "recompute")


@dataclass
class RowState:
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    windows: int = 0  # m: reasoning windows compressed so far
    answer_windows: int = 0  # windows of the answer (compress_answer only)
    think_at: int | None = None  # index of </think> in ``generated``
    done: bool = False
    cached_ids: list[int] = field(default_factory=list)  # the layout the cache holds
    peak_cache_length: int = 0

    @property
    def cache_length(self) -> int:
        return len(self.cached_ids)

    def hold(self, ids: list[int]) -> None:
        """Record that the cache now holds the layout ``ids``."""
        self.cached_ids = ids
        self.peak_cache_length = max(self.peak_cache_length, len(ids))


@dataclass
class GenerationOutput:
    """``sequences``: the generated tokens ``[B, n]`` (uncompressed, padded with ``pad_token_id``);
    per row: compressions done, peak and final cache length (slots), final layout; wall time and its split."""

    sequences: torch.Tensor
    compressions: list[int]
    peak_cache_length: list[int]
    final_cache_length: list[int]
    layouts: list[list[int]]
    seconds: float
    time_split: dict[str, float]


class CompressedGenerator:
    def __init__(self, model, tokenizer, window_size: int | None = None, keep_last: int = 4, strategy: str = "cache",
                 compress_answer: bool = False):
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

    # ----------------------------------------------------------------- public

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, streamer=None,
                 generator: torch.Generator | None = None, return_dict_in_generate: bool = False,
                 strategy: str | None = None):
        """Like ``model.generate``: returns the generated ids ``[B, n]`` (or a GenerationOutput)."""
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
        pad = pad_token_id if pad_token_id is not None else (self.tokenizer.pad_token_id or eos)
        split = {"decode": 0.0, "pooling": 0.0, "re-encode": 0.0, "prefill": 0.0}
        began = time.perf_counter()
        cache = None
        if strategy == "cache" and max_new_tokens:
            longest = max(len(r.prompt) for r in rows)
            # a layout never exceeds prompt + tokens written + 2 markers per block (W = 1 pools nothing away)
            cache = RaggedStaticCache.for_model(self.model.base, len(rows), longest + max_new_tokens + 4)
        logits = self._first_logits(rows, cache, split) if max_new_tokens else None
        for _ in range(max_new_tokens):
            chosen = self._sample(logits, do_sample, temperature, top_k, top_p, generator)
            compressed = []
            for index, row in enumerate(rows):
                if row.done:
                    continue
                token = int(chosen[index])
                row.generated.append(token)
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if self._advance(row, token, eos, max_new_tokens):
                    compressed.append(index)
            if all(row.done for row in rows):
                break
            logits = self._next_logits(rows, compressed, cache, split)
        if streamer is not None:
            streamer.end()
        sequences = self._pad([row.generated for row in rows], pad)
        if not return_dict_in_generate:
            return sequences
        return GenerationOutput(
            sequences=sequences,
            compressions=[row.windows + row.answer_windows for row in rows],
            peak_cache_length=[row.peak_cache_length for row in rows],
            final_cache_length=[row.cache_length for row in rows],
            layouts=[self.layout(row) for row in rows],
            seconds=time.perf_counter() - began,
            time_split=split,
        )

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

    def _advance(self, row: RowState, token: int, eos: int, max_new_tokens: int) -> bool:
        """Update a row after it wrote ``token``; True when that changed its compressed layout."""
        W, due = self.window, self.window + self.keep_last
        before = row.windows + row.answer_windows
        if token == self.tokens.think_end and row.think_at is None:
            row.think_at = len(row.generated) - 1
            if self.compress_answer:  # the reasoning ends with all its full windows pooled
                row.windows += (row.think_at - row.windows * W) // W
        if token == eos or len(row.generated) >= max_new_tokens:
            row.done = True
        elif row.think_at is None:
            if len(row.generated) - row.windows * W >= due:
                row.windows += 1
        elif self.compress_answer:
            if len(row.generated) - (row.think_at + 1) - row.answer_windows * W >= due:
                row.answer_windows += 1
        return not row.done and row.windows + row.answer_windows != before

    # ----------------------------------------------------------------- decisions

    def _rows(self, input_ids, attention_mask) -> list[RowState]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, length] tensor of token ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}")
        limit = getattr(self.model.base.config, "max_position_embeddings", None)
        rows = []
        for index, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.bool().tolist())):
            prompt = [t for t, keep in zip(ids, mask) if keep]
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
            if limit is not None and len(prompt) > limit:
                raise ValueError(f"prompt {index} has {len(prompt)} tokens, more than the model's context of {limit}")
            rows.append(RowState(prompt=prompt))
        return rows

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

    def _first_logits(self, rows, cache, split):
        began = time.perf_counter()
        if cache is None:
            logits = self._recompute(rows)
        else:
            chunks = [(0, list(row.prompt), [], []) for row in rows]
            logits = self._cached_step(rows, chunks, cache)
        split["prefill"] += time.perf_counter() - began
        return logits

    def _next_logits(self, rows, compressed, cache, split):
        began = time.perf_counter()
        if cache is None:
            logits = self._recompute(rows)
        else:
            chunks = [(row.cache_length, [], [], []) if row.done else self._chunk(row) for row in rows]
            logits = self._cached_step(rows, chunks, cache, split if compressed else None)
        split["re-encode" if compressed else "decode"] += time.perf_counter() - began
        return logits

    def _chunk(self, row: RowState):
        """(first slot, ids, windows, slot offsets) to feed: the row's layout from where it leaves the cache.

        A decode step feeds the one new token; a compression crops the row back to the
        first position its layout changed (its block's end marker, or where a block
        opens) and re-encodes from there: the new vectors, the end marker, the kept tail.
        """
        ids, windows, slots = self._layout(row)
        cached = row.cached_ids
        first = len(cached)
        if ids[:first] != cached:
            first = next(i for i, (a, b) in enumerate(zip(ids, cached)) if a != b)
        kept = [i for i, slot in enumerate(slots) if slot >= first]
        return first, ids[first:], [windows[i] for i in kept], [slots[i] - first for i in kept]

    def _recompute(self, rows):
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
            embeds = self.model.compressed_embeddings(ids, window_ids, slot_mask)
            row.hold(layout)
            logits.append(self.model.base(inputs_embeds=embeds, use_cache=False).logits[0, -1])
        width = next(x for x in logits if x is not None)
        return torch.stack([x if x is not None else torch.zeros_like(width) for x in logits])

    def _cached_step(self, rows, chunks, cache, split=None):
        """One forward of every row's chunk against the cache; returns each row's next-token logits."""
        device = self.model.device
        counts = torch.tensor([len(ids) for _, ids, _, _ in chunks], dtype=torch.long, device=device)
        starts = torch.tensor([first for first, _, _, _ in chunks], dtype=torch.long, device=device)
        steps = max(1, int(counts.max()))
        ids = torch.full((len(rows), steps), self.tokens.eos, dtype=torch.long, device=device)
        slot_mask = torch.zeros_like(ids, dtype=torch.bool)
        windows = []
        for index, (_, chunk, chunk_windows, chunk_slots) in enumerate(chunks):
            if chunk:
                ids[index, : len(chunk)] = torch.tensor(chunk, device=device)
                slot_mask[index, chunk_slots] = True
                windows.extend(chunk_windows)
        window_ids = torch.tensor(windows, dtype=torch.long, device=device).view(-1, self.window)
        began = time.perf_counter()
        markers = set(self.tokens.markers)
        if windows or any(token in markers for _, chunk, _, _ in chunks for token in chunk):
            embeds = self.model.compressed_embeddings(ids, window_ids, slot_mask)
        else:  # an ordinary decode step: plain token embeddings
            embeds = self.model.base.get_input_embeddings()(ids)
        if split is not None:
            split["pooling"] += time.perf_counter() - began
        positions = starts[:, None] + torch.arange(steps, device=device)
        span = int((starts + counts).max())
        visible = torch.arange(span, device=device)[None, None, :] <= positions[:, :, None]  # causal, per row
        mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=device).masked_fill(
            ~visible, torch.finfo(embeds.dtype).min
        )[:, None]
        cache.begin_step(starts, counts, span)
        out = self.model.base(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
                              attention_mask={"full_attention": mask, "sliding_attention": mask})
        for row, (first, chunk, _, _) in zip(rows, chunks):
            if chunk:
                row.hold(row.cached_ids[:first] + chunk)
        last = (counts - 1).clamp(min=0)
        return out.logits[torch.arange(len(rows), device=device), last]
