"""Training examples of compressed reasoning: every stage of every trace, built lazily.

Stage k of a trace compresses the first k windows of W reasoning tokens: its
``compressed_layout`` (``hcr.compression.layout``, the one the generator feeds the
model). Three aligned views of that layout:

* ``compressed_input_ids``: prefix, ``<|vision_start|>``, k placeholders, ``<|vision_end|>``, the rest
* ``replaced_original_tokens``: the same with k·W placeholders (one per compressed token)
* ``original_tokens``: the same with the real tokens in place of the placeholders

plus ``labels`` aligned with ``compressed_input_ids``. With ``compress_answer`` the
stages go on after the whole reasoning is compressed, into a second block after
``</think>``. Labels supervise what the model writes (the
uncompressed reasoning tail, ``</think>``, the answer, EOS) and never the prompt,
a placeholder or a marker.

Materialising all stages is quadratic in the trace length (a 2k-token trace at
W = 2 has ~1,000 stages), so ``CompressionExampleDataset`` keeps only the traces
(O(total tokens)) and builds a stage on demand, in O(its length) numpy work.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from hcr.argtypes import NON_NEGATIVE_INT, POSITIVE_INT, check_fields, optional
from hcr.compression.layout import CompressedLayout, compressed_layout, filled
from hcr.compression.tokens import CompressionTokens
from hcr.compression.traces import TokenizedTrace
from hcr_kernels import IGNORE_INDEX


@dataclass(frozen=True)
class ExampleConfig:
    """How stages are made.

    ``window``: tokens per compressed vector (W). ``compress_answer``: continue into
    the answer after the reasoning is compressed. ``every_nth``: keep stages 1,
    1 + n, 1 + 2n, ... of each trace (fewer, less correlated examples per trace). ``pad_last_window``:
    a last partial window becomes one more stage, padded to W with ``pad_id``
    (the pooler learns a "nothing here" embedding for it); off by default, since at
    inference only full windows are ever compressed.
    """

    window: int
    compress_answer: bool = False
    every_nth: int = 1
    pad_last_window: bool = False
    pad_id: int | None = None

    def __post_init__(self):
        check_fields(self, window=POSITIVE_INT, every_nth=POSITIVE_INT, pad_id=optional(NON_NEGATIVE_INT))
        if self.pad_last_window and self.pad_id is None:
            raise ValueError("pad_last_window needs pad_id (e.g. tokenizer.pad_token_id)")

    def windows(self, length: int) -> int:
        """Compressible windows in a part of ``length`` tokens."""
        full, partial = divmod(length, self.window)
        return full + (1 if partial and self.pad_last_window else 0)


def stage_count(trace: TokenizedTrace, config: ExampleConfig) -> int:
    """Stages of a trace before ``every_nth`` thinning."""
    stages = config.windows(trace.reasoning_end - trace.reasoning_start)
    if config.compress_answer:
        stages += config.windows(trace.answer_end - trace.answer_start)
    return stages


def kept_stages(trace: TokenizedTrace, config: ExampleConfig) -> int:
    """Stages kept after thinning: 1, 1 + n, 1 + 2n, ..."""
    return -(-stage_count(trace, config) // config.every_nth)


def stage_layout(trace: TokenizedTrace, stage: int, tokens: CompressionTokens,
                 config: ExampleConfig) -> CompressedLayout:
    """The compressed layout of stage ``stage``: the reasoning's windows first, then the answer's."""
    reasoning_windows = min(stage, config.windows(trace.reasoning_end - trace.reasoning_start))
    return compressed_layout(trace.ids, reasoning_start=trace.reasoning_start, reasoning_end=trace.reasoning_end,
                             answer_start=trace.answer_start, answer_end=trace.answer_end,
                             reasoning_windows=reasoning_windows, answer_windows=stage - reasoning_windows,
                             window=config.window, tokens=tokens, pad_id=config.pad_id)


def _build(trace: TokenizedTrace, stage: int, tokens: CompressionTokens,
           config: ExampleConfig) -> dict[str, np.ndarray]:
    """The three views and the labels of a stage, all from its layout."""
    layout = stage_layout(trace, stage, tokens, config)
    labels = layout.ids.copy()
    labels[: layout.reasoning_block.stop] = IGNORE_INDEX  # the prompt and the reasoning block
    labels[layout.answer_block] = IGNORE_INDEX
    return {
        "compressed_input_ids": layout.ids,
        "replaced_original_tokens": layout.expand(filled(layout.windows.shape, tokens.placeholder)),
        "original_tokens": layout.expand(layout.windows),
        "labels": labels,
    }


def window_tokens(replaced, original, placeholder: int, window: int, *, slots: int | None = None, context: str = ""):
    """The real tokens under the placeholders of ``replaced`` (two aligned views of a stage), as ``[N, W]``.

    Works on numpy arrays and torch tensors alike. ``slots``, when given, is the number
    of windows the tokens must make; otherwise they must make whole windows.
    """
    if replaced.shape != original.shape:
        raise ValueError(f"{context}replaced_original_tokens and original_tokens must have one shape, got "
                         f"{tuple(replaced.shape)} and {tuple(original.shape)}")
    real = original[replaced == placeholder]
    if slots is not None and len(real) != slots * window:
        raise ValueError(f"{context}{slots} placeholders need {slots * window} window tokens at window {window}, "
                         f"but replaced_original_tokens marks {len(real)}")
    if len(real) % window:
        raise ValueError(f"{context}{len(real)} placeholder tokens are not whole windows of {window}")
    return real.reshape(-1, window)


def build_compression_example(trace: TokenizedTrace, stage: int, tokens: CompressionTokens, config: ExampleConfig):
    """Stage ``stage`` (1-based, before thinning) of one trace as a dict of int64 arrays."""
    total = stage_count(trace, config)
    if not 1 <= stage <= total:
        raise ValueError(f"stage must be in [1, {total}] for this trace and window {config.window}, got {stage}")
    return _build(trace, stage, tokens, config)


def build_compression_examples(trace: TokenizedTrace, tokens: CompressionTokens, config: ExampleConfig):
    """All kept stages of one trace (eager: fine for one trace, use the dataset for many)."""
    stages = range(1, stage_count(trace, config) + 1, config.every_nth)
    return [_build(trace, stage, tokens, config) for stage in stages]


class CompressionExampleDataset:
    """(trace, stage) examples of a tokenized trace dataset, built on demand.

    ``traces``: the output of ``tokenize_dataset`` (a ``datasets.Dataset``) or a list of
    ``TokenizedTrace``. The token ids are held once, flat; indexing maps a global
    example index to (trace, stage) by a binary search over cumulative stage counts.
    Works as a ``torch.utils.data.Dataset`` (len and integer indexing).
    """

    def __init__(self, traces, tokens: CompressionTokens, config: ExampleConfig):
        self.tokens, self.config = tokens, config
        self.traces = _as_traces(traces)
        counts = [kept_stages(trace, config) for trace in self.traces]
        self._ends = np.cumsum(counts, dtype=np.int64).tolist()
        self.skipped_traces = sum(1 for c in counts if c == 0)  # shorter than one window

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(trace index, stage) of example ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"example index {index} out of range for {len(self)} examples")
        index %= len(self)
        trace = bisect.bisect_right(self._ends, index)
        first = self._ends[trace - 1] if trace else 0
        return trace, 1 + (index - first) * self.config.every_nth

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        trace, stage = self.locate(index)
        return _build(self.traces[trace], stage, self.tokens, self.config)


def _as_traces(traces) -> list[TokenizedTrace]:
    if isinstance(traces, list) and all(isinstance(t, TokenizedTrace) for t in traces):
        return traces
    columns = traces.with_format("numpy")
    ids, kinds = columns["input_ids"], columns["content_kinds"]
    starts, ends = columns["reasoning_start"], columns["reasoning_end"]
    a_starts, a_ends = columns["answer_start"], columns["answer_end"]
    return [
        TokenizedTrace(np.asarray(ids[i], dtype=np.int64), np.asarray(kinds[i], dtype=np.int8),
                       int(starts[i]), int(ends[i]), int(a_starts[i]), int(a_ends[i]))
        for i in range(len(starts))
    ]
