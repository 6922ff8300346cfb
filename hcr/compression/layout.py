"""The compressed layout of a row: the one definition that training and generation share.

A row is its tokens cut into five parts: prompt, reasoning, separator (``</think>``
and anything up to the answer), answer, tail (EOS). Compressing k windows of the
reasoning replaces its first k·W tokens by one block
``<|vision_start|> placeholder×k <|vision_end|>``; j windows of the answer make a
second block after the separator; no windows, no block. The training builder
(``hcr.compression.examples``) derives its views and labels from this layout and
the generator (``hcr.generation``) feeds it to the model, so what a model learns
to read and what it is given at inference cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hcr.compression.tokens import CompressionTokens


@dataclass(frozen=True)
class CompressedLayout:
    """``ids``: the compressed row, one placeholder per compressed window; ``windows``: ``[slots, W]``,
    the tokens under each placeholder, in slot order (a padded last window ends in ``pad_id``);
    ``reasoning_block``, ``answer_block``: each block's span of ``ids``, markers included (an empty
    slice where the block is, when it has no windows)."""

    ids: np.ndarray
    windows: np.ndarray
    reasoning_block: slice
    answer_block: slice

    @property
    def blocks(self) -> tuple[slice, slice]:
        return self.reasoning_block, self.answer_block

    @property
    def slots(self) -> np.ndarray:
        """Positions of the placeholders in ``ids``, in the order of ``windows``."""
        return np.concatenate([np.arange(block.start + 1, block.stop - 1, dtype=np.int64) for block in self.blocks])

    def expand(self, per_slot: np.ndarray) -> np.ndarray:
        """``ids`` with each slot replaced by its row of ``per_slot`` (``[slots, W]``): ``windows`` gives
        the uncompressed row (markers kept), a full array of placeholders the training's replaced view."""
        pieces, previous, first_slot = [], 0, 0
        for block in self.blocks:
            count = block.stop - block.start - 2
            if count > 0:
                pieces += (self.ids[previous : block.start + 1], per_slot[first_slot : first_slot + count].reshape(-1))
                previous, first_slot = block.stop - 1, first_slot + count
        pieces.append(self.ids[previous:])
        return np.concatenate(pieces)


def compressed_layout(ids, *, reasoning_start: int, reasoning_end: int, answer_start: int, answer_end: int,
                      reasoning_windows: int, answer_windows: int, window: int, tokens: CompressionTokens,
                      pad_id: int | None = None) -> CompressedLayout:
    """The layout of the row ``ids`` with its first ``reasoning_windows`` (and ``answer_windows``)
    windows of ``window`` tokens compressed.

    The parts are ``ids[:reasoning_start]`` (prompt), ``ids[reasoning_start:reasoning_end]``
    (reasoning), ``ids[reasoning_end:answer_start]`` (separator), ``ids[answer_start:answer_end]``
    (answer) and the rest (tail). A part's last window may be partial only with ``pad_id``, which
    fills it up to W (training's ``pad_last_window``; the generator only compresses full windows).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not 0 <= reasoning_start <= reasoning_end <= answer_start <= answer_end <= len(ids):
        raise ValueError(f"the parts must follow each other within the row's {len(ids)} tokens, got reasoning "
                         f"[{reasoning_start}, {reasoning_end}) and answer [{answer_start}, {answer_end})")
    reasoning, reasoning_rest = _compressed_windows(ids[reasoning_start:reasoning_end], reasoning_windows, window,
                                                    pad_id, "reasoning")
    answer, answer_rest = _compressed_windows(ids[answer_start:answer_end], answer_windows, window, pad_id, "answer")
    reasoning_ids, answer_ids = _block(reasoning_windows, tokens), _block(answer_windows, tokens)
    compressed = np.concatenate((ids[:reasoning_start], reasoning_ids, reasoning_rest,
                                 ids[reasoning_end:answer_start], answer_ids, answer_rest, ids[answer_end:]))
    answer_block_start = reasoning_start + len(reasoning_ids) + len(reasoning_rest) + answer_start - reasoning_end
    windows = np.concatenate((reasoning, answer)) if len(answer) else reasoning  # mostly a view of ``ids``: no copy
    return CompressedLayout(compressed, windows, slice(reasoning_start, reasoning_start + len(reasoning_ids)),
                            slice(answer_block_start, answer_block_start + len(answer_ids)))


def compressed_length(length: int, window: int, reasoning_windows: int, answer_windows: int) -> int:
    """``len(compressed_layout(...).ids)`` of a row of ``length`` tokens whose windows are all full (the
    generator's, which checks it every step), without building it: each window of W tokens becomes one
    slot, each non-empty block adds its two markers."""
    markers = 2 * (reasoning_windows > 0) + 2 * (answer_windows > 0)
    return length - (window - 1) * (reasoning_windows + answer_windows) + markers


def _compressed_windows(part: np.ndarray, count: int, window: int, pad_id: int | None, name: str):
    """(the first ``count`` windows of ``part`` as ``[count, W]``, the rest of ``part``)."""
    if count < 0:
        raise ValueError(f"{name} windows must be >= 0, got {count}")
    covered = count * window
    real = part[:covered]
    if len(real) < covered:  # a partial last window, padded
        if covered - len(part) >= window:
            raise ValueError(f"{count} windows of {window} do not fit the {len(part)} {name} tokens")
        if pad_id is None:
            raise ValueError(f"the last of {count} windows of {window} over {len(part)} {name} tokens is partial: "
                             f"padding it needs pad_id")
        real = np.concatenate((real, filled(covered - len(real), pad_id)))
    return real.reshape(count, window), part[covered:]


def _block(count: int, tokens: CompressionTokens) -> np.ndarray:
    """``<|vision_start|> placeholder×count <|vision_end|>``, or nothing for no windows."""
    block = filled(count + 2 if count else 0, tokens.placeholder)
    if count:
        block[0], block[-1] = tokens.block_start, tokens.block_end
    return block


def filled(shape, token: int) -> np.ndarray:
    """An int64 array of ``token`` (``np.full`` is several times slower, and a stage is a few µs of work)."""
    out = np.empty(shape, dtype=np.int64)
    out.fill(token)
    return out
