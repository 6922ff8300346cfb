"""The demo's measurements on the held-out questions, uncompressed and at every window W."""

from __future__ import annotations

import statistics

import torch

from hcr.compression.layout import compressed_length
from hcr.demo.corpus import needed_value_compressed, windows_pooled
from hcr.demo.evaluate import (constant_pooling, generate_compressed, generate_uncompressed, layout_check_model,
                               mean_pooled_vector)
from hcr.generation import CompressedGenerator

CONTROL_TRACES = 300  # training traces whose windows make the control's mean pooled vector


def value_token_positions(tokenizer, task) -> list[int]:
    """Index, within the tokenized reasoning, of the token that writes each step's value."""
    encoded = tokenizer(task.reasoning() + "\n", add_special_tokens=False, return_offsets_mapping=True)
    positions = []
    for offset in task.value_offsets():
        positions.append(next(i for i, (start, end) in enumerate(encoded["offset_mapping"]) if start <= offset < end))
    return positions


def layout_lengths(prompt: int, reasoning: int, written: int, window: int | None, keep_last: int) -> list[int]:
    """Slots a row's cache holds after each of ``written`` tokens, by the generator's rule.

    The oldest W tokens are pooled once ``W + keep_last`` reasoning tokens are
    uncompressed; a block costs its two markers; nothing is compressed after
    ``</think>`` (which follows the ``reasoning`` tokens). ``window=None``: uncompressed.
    """
    lengths = []
    for t in range(1, written + 1):
        if window is None:
            lengths.append(prompt + t)
            continue
        pooled = windows_pooled(min(t, reasoning), window, keep_last)
        lengths.append(compressed_length(prompt + t, window, pooled, 0))
    return lengths


def _training_windows(traces, window: int) -> torch.Tensor:
    rows = []
    for trace in traces[:CONTROL_TRACES]:
        reasoning = trace.ids[trace.reasoning_start : trace.reasoning_end]
        full = len(reasoning) // window * window
        rows.extend(reasoning[:full].reshape(-1, window).tolist())
    return torch.tensor(rows, dtype=torch.long).view(-1, window)


def _summary(answers, correct) -> dict:
    return {
        "accuracy": sum(correct) / len(correct),
        "mean_output_tokens": statistics.fmean(len(o) for o in answers.outputs),
        "mean_peak_cache": statistics.fmean(answers.peak_cache),
        "max_peak_cache": max(answers.peak_cache),
        "mean_compressions": statistics.fmean(answers.compressions),
        "tokens_per_second": answers.tokens_per_second,
        "seconds": answers.seconds,
        "autotune_seconds": answers.autotune_seconds,
        **({"time_split": answers.time_split} if answers.time_split else {}),
    }


def _compressed_entry(generator, vector, prompts, golds, value_positions, common, plain, oracle_items) -> dict:
    """One (W, keep_last): accuracy, the constant-vector control, the needed-value rate, the oracle's agreement."""
    window, keep_last, model = generator.window, generator.keep_last, generator.model
    name = f"W={window} k={keep_last}"
    answers = generate_compressed(generator, prompts, desc=f"compressed {name}", **common)
    accuracy, correct = answers.accuracy(generator.tokenizer, golds)
    with constant_pooling(model, vector):
        control = generate_compressed(generator, prompts, desc=f"control {name}", **common)
    control_accuracy, _ = control.accuracy(generator.tokenizer, golds)
    hidden = [needed_value_compressed(p, window, keep_last) for p in value_positions]
    steps = sum(total for _, total in hidden)
    entry = {"window": window, "keep_last": keep_last, **_summary(answers, correct)}
    entry.update(
        control_accuracy=control_accuracy,
        carried_by_vectors=accuracy - control_accuracy,
        needed_value_compressed=sum(h for h, _ in hidden) / steps if steps else 0.0,
        speed_vs_generate=answers.tokens_per_second / plain.tokens_per_second if plain.tokens_per_second else None,
    )
    if oracle_items:
        oracle = generate_compressed(generator, prompts[:oracle_items], desc=f"recompute {name}",
                                     strategy="recompute", **common)
        _, oracle_correct = oracle.accuracy(generator.tokenizer, golds[:oracle_items])
        entry["recompute"] = {"items": oracle_items,
                              "identical_outputs": sum(a == b for a, b in zip(oracle.outputs, answers.outputs)),
                              "same_correctness": sum(a == b for a, b in zip(oracle_correct, correct))}
    return entry


def evaluate_all(settings, base, compressors, tokenizer, tokens, heldout, heldout_traces, train_traces) -> dict:
    prompts = [trace.ids[: trace.reasoning_start].tolist() for trace in heldout_traces]
    golds = [str(task.answer) for task in heldout]
    longest = max(len(trace.ids) - trace.reasoning_start for trace in heldout_traces)
    common = dict(eos=tokens.eos, pad=tokenizer.pad_token_id, max_new_tokens=longest + 8,
                  batch_size=settings.batch_size)

    plain = generate_uncompressed(base, prompts, **common)
    _, plain_correct = plain.accuracy(tokenizer, golds)
    results = {"heldout_items": len(prompts), "max_new_tokens": common["max_new_tokens"],
               "uncompressed": _summary(plain, plain_correct), "compressed": []}
    check = generate_compressed(CompressedGenerator(layout_check_model(base, tokenizer), tokenizer,
                                                    keep_last=settings.keep_last[0]),
                                prompts, desc="layout check (W=1, token embeddings)", **common)
    results["layout_check"] = {"window": 1, "keep_last": settings.keep_last[0],
                               **_summary(check, check.accuracy(tokenizer, golds)[1])}
    value_positions = [value_token_positions(tokenizer, task) for task in heldout]
    example = max(range(len(heldout_traces)), key=lambda i: len(heldout_traces[i].ids))
    shape = heldout_traces[example]
    reasoning_length, written = shape.reasoning_end - shape.reasoning_start, len(shape.ids) - shape.reasoning_start
    curves = {"uncompressed": layout_lengths(shape.reasoning_start, reasoning_length, written, None, 0)}

    for window, model in compressors.items():
        vector = mean_pooled_vector(model, _training_windows(train_traces, window))
        for keep_last in settings.keep_last:
            generator = CompressedGenerator(model, tokenizer, keep_last=keep_last)
            oracle_items = settings.recompute_items if keep_last == settings.keep_last[0] else 0
            entry = _compressed_entry(generator, vector, prompts, golds, value_positions, common, plain, oracle_items)
            entry["cache_saving"] = results["uncompressed"]["mean_peak_cache"] / entry["mean_peak_cache"]
            results["compressed"].append(entry)
            curves[f"W={window}, k={keep_last}"] = layout_lengths(shape.reasoning_start, reasoning_length, written,
                                                                  window, keep_last)
    results["cache_curves"] = curves
    return results
