"""Prompts for generation: the R1 chat layout of a question, and left-padded batches of them."""

from __future__ import annotations

import torch

from hcr.compression.tokens import CompressionTokens
from hcr.compression.traces import tokenize_traces_batch


def prompt_ids(tokenizer, questions: list[str], tokens: CompressionTokens | None = None) -> list[list[int]]:
    """``<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\\n`` for each question, tokenized the way
    training tokenizes traces (each part on its own), so generation starts where training's reasoning does."""
    tokens = tokens or CompressionTokens.from_tokenizer(tokenizer)
    traces = tokenize_traces_batch(tokenizer, tokens, list(questions), ["</think>"] * len(questions))
    for index, trace in enumerate(traces):
        if trace is None:
            raise ValueError(f"question {index} holds a compression token or </think>, which a prompt cannot: "
                             f"{questions[index][:80]!r}")
    return [trace.ids[: trace.reasoning_start].tolist() for trace in traces]


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``input_ids``, ``attention_mask``), left-padded: what ``generate()`` and CompressedGenerator take."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)
