"""Generating the held-out answers for every configuration of the demo, and the constant-vector control."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hcr.evaluation.answers import answers_match, extract_answer
from hcr.generation import CompressedGenerator
from hcr.generation.prompts import left_pad


@dataclass
class Answers:
    """One configuration's outputs on the held-out prompts, item by item, plus the wall time."""

    outputs: list[list[int]]  # generated tokens, up to and including EOS
    compressions: list[int]
    peak_cache: list[int]
    seconds: float
    time_split: dict[str, float] | None = None  # CompressedGenerator's stages, summed over the batches

    def accuracy(self, tokenizer, golds: list[str]) -> tuple[float, list[bool]]:
        correct = [answers_match(extract_answer(tokenizer.decode(out)), gold) for out, gold in zip(self.outputs, golds)]
        return (sum(correct) / len(correct) if correct else 0.0), correct

    @property
    def autotune_seconds(self) -> float:
        """Time the autotuner spent measuring shapes this machine had not seen (once: then cached)."""
        return (self.time_split or {}).get("autotune", 0.0)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of generation, the autotuner's one-time measurements set aside."""
        seconds = self.seconds - self.autotune_seconds
        return sum(len(o) for o in self.outputs) / seconds if seconds > 0 else 0.0


def _until_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def generate_uncompressed(base, prompts: list[list[int]], *, eos: int, pad: int, max_new_tokens: int,
                          batch_size: int, desc: str = "generate() uncompressed") -> Answers:
    """Greedy answers of the plain model through transformers' ``generate()`` (its own dynamic KV cache)."""
    outputs, peaks, seconds = [], [], 0.0
    for first in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[first : first + batch_size]
        ids, mask = left_pad(batch, pad, base.device)
        began = time.perf_counter()
        with torch.inference_mode():
            out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=pad)
        seconds += time.perf_counter() - began
        for prompt, row in zip(batch, out[:, ids.shape[1] :].tolist()):
            written = _until_eos(row, eos)
            outputs.append(written)
            peaks.append(len(prompt) + len(written) - 1)  # the last token written is never fed back
    return Answers(outputs, [0] * len(outputs), peaks, seconds)


def generate_compressed(generator: CompressedGenerator, prompts: list[list[int]], *, eos: int, pad: int,
                        max_new_tokens: int, batch_size: int, strategy: str = "cache", desc: str = "") -> Answers:
    """Greedy answers through CompressedGenerator, which compresses the reasoning as it goes."""
    outputs, compressions, peaks, seconds, split = [], [], [], 0.0, {}
    for first in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        ids, mask = left_pad(prompts[first : first + batch_size], pad, generator.model.device)
        out = generator.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                 return_dict_in_generate=True, strategy=strategy)
        seconds += out.seconds
        for stage, spent in out.time_split.items():
            split[stage] = split.get(stage, 0.0) + spent
        outputs.extend(_until_eos(row, eos) for row in out.sequences.tolist())
        compressions.extend(out.compressions)
        peaks.extend(out.peak_cache_length)
    return Answers(outputs, compressions, peaks, seconds, split)


class ConstantPooler(torch.nn.Module):
    """Stands in for a trained pooler so that every window pools to one fixed vector: the control.

    The block markers still come from the real pooler's table, so the layout the
    model reads is unchanged; only what the slots carry is gone.
    """

    def __init__(self, pooler, vector: torch.Tensor, window: int):
        super().__init__()
        self.pooler, self.window = pooler, window
        self.register_buffer("vector", vector.detach().clone())

    def get_input_embeddings(self):
        return self.pooler.get_input_embeddings()

    def window_hidden_states(self, window_ids=None, window_embeds=None):
        count = (window_ids if window_ids is not None else window_embeds).shape[0]
        return self.vector.expand(count, self.window, -1)  # its mean over the window is the vector itself


class TokenEmbeddingPooler(torch.nn.Module):
    """A pooler for W = 1 that hands each slot its own token's embedding, and the markers the base's rows.

    The layout check: the compressed layout with nothing lost, so whatever accuracy it
    costs is the layout's (the markers, the shifted positions), not the pooling's.
    """

    def __init__(self, base):
        super().__init__()
        self.table = base.get_input_embeddings()

    def get_input_embeddings(self):
        return self.table

    def window_hidden_states(self, window_ids=None, window_embeds=None):
        return self.table(window_ids) if window_embeds is None else window_embeds


def layout_check_model(base, tokenizer):
    """A W = 1 compression model whose slots hold their own tokens' embeddings (``TokenEmbeddingPooler``)."""
    from hcr.compression.train import PoolerSettings, build_compression_model

    model = build_compression_model(base, tokenizer, 1, pooler=PoolerSettings(num_hidden_layers=1), lora=None)
    model.pooler = TokenEmbeddingPooler(base)
    return model.eval()


@contextlib.contextmanager
def constant_pooling(model, vector: torch.Tensor):
    """Inside the block ``model`` pools every window to ``vector``; its own pooler is back afterwards."""
    pooler = model.pooler
    model.pooler = ConstantPooler(pooler, vector.to(model.base.dtype), model.config.window)
    try:
        yield model
    finally:
        model.pooler = pooler


def mean_pooled_vector(model, windows: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The mean of the pooled vectors of ``windows`` ``[N, W]`` (the training set's, for the control)."""
    total = None
    with torch.inference_mode():
        for first in range(0, windows.shape[0], batch_size):
            pooled = model.pooled_windows(windows[first : first + batch_size].to(model.base.device)).float()
            total = pooled.sum(0) if total is None else total + pooled.sum(0)
    return total / windows.shape[0]
