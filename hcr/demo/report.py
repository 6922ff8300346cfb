"""The demo's outputs: ``results.json``, ``report.md``, the plots, and the table printed at the end."""

from __future__ import annotations

import json
from pathlib import Path

from hcr.files import atomic_path, write_atomic

PLOTS = {
    "accuracy": "accuracy_vs_window.png",
    "cache": "cache_vs_tokens.png",
    "loss": "training_loss.png",
}


def table(results: dict) -> str:
    """The results as a markdown table: one row uncompressed, one per (W, keep_last)."""
    plain = results["uncompressed"]
    lines = [
        "| W | keep_last | accuracy | control (constant vectors) | carried by the vectors | needed value compressed "
        "| compressions / item | mean peak cache | cache saving | tokens/s | vs generate() | recompute agrees |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| ∞ (uncompressed, generate()) | | {plain['accuracy']:.3f} | | | | 0 | {plain['mean_peak_cache']:.1f} "
        f"| 1.00× | {plain['tokens_per_second']:.0f} | 1.00× | |",
    ]
    check = results["layout_check"]
    lines.append(
        f"| 1, layout check: each slot its own token's embedding | {check['keep_last']} | {check['accuracy']:.3f} "
        f"| | | | {check['mean_compressions']:.1f} | {check['mean_peak_cache']:.1f} | | "
        f"{check['tokens_per_second']:.0f} | | |"
    )
    for entry in results["compressed"]:
        recompute = entry.get("recompute")
        agrees = f"{recompute['identical_outputs']}/{recompute['items']}" if recompute else ""
        lines.append(
            f"| {entry['window']} | {entry['keep_last']} | {entry['accuracy']:.3f} | {entry['control_accuracy']:.3f} "
            f"| {entry['carried_by_vectors']:+.3f} | {entry['needed_value_compressed']:.0%} "
            f"| {entry['mean_compressions']:.1f} | {entry['mean_peak_cache']:.1f} | {entry['cache_saving']:.2f}× "
            f"| {entry['tokens_per_second']:.0f} | {entry['speed_vs_generate']:.2f}× | {agrees} |"
        )
    return "\n".join(lines)


TIME_STAGES = ("prefill", "decode", "re-encode", "pooling", "other", "autotune")


def time_table(results: dict) -> str:
    """Each stage's share of the fast path's generation time (``GenerationOutput.time_split``) and the
    work the compression rule implies: a compressing row re-encodes its new vector, end marker and kept
    tail (whose keys and values depend on what precedes them), ``(W + keep_last + 1) / W`` reasoner
    positions per token written."""
    lines = ["| W | keep_last | " + " | ".join(TIME_STAGES) + " | reasoner positions per token (generate(): 1) |",
             "|---|---|" + "---|" * len(TIME_STAGES) + "---|"]
    entries = [results["layout_check"], *results["compressed"]]
    for entry in entries:
        split = entry.get("time_split")
        if not split:
            continue
        total = sum(split.values()) or 1.0
        shares = " | ".join(f"{split.get(stage, 0.0) / total:.0%}" for stage in TIME_STAGES)
        window, keep_last = entry["window"], entry["keep_last"]
        lines.append(f"| {window} | {keep_last} | {shares} | {(window + keep_last + 1) / window:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else "(no time split recorded)"


def plot_accuracy(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for keep_last in sorted({e["keep_last"] for e in results["compressed"]}):
        entries = [e for e in results["compressed"] if e["keep_last"] == keep_last]
        windows = [e["window"] for e in entries]
        line, = axis.plot(windows, [e["accuracy"] for e in entries], "o-", label=f"compressed, keep_last={keep_last}")
        axis.plot(windows, [e["control_accuracy"] for e in entries], "s--", color=line.get_color(), alpha=0.6,
                  label=f"control (constant vector), keep_last={keep_last}")
    check = results["layout_check"]
    axis.plot([1], [check["accuracy"]], "D", color="black",
              label=f"layout check: W=1, slots hold their tokens' embeddings (keep_last={check['keep_last']})")
    windows = sorted({1} | {e["window"] for e in results["compressed"]})
    axis.axhline(results["uncompressed"]["accuracy"], color="gray", linestyle=":", label="uncompressed")
    axis.set_xscale("log", base=2)
    axis.set_xticks(windows, [str(w) for w in windows])
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("window W (tokens per pooled vector)")
    axis.set_ylabel("held-out answer accuracy")
    axis.set_title(f"{results['heldout_items']} held-out questions, greedy")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_cache(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, lengths in results["cache_curves"].items():
        axis.plot(range(1, len(lengths) + 1), lengths, label=name)
    axis.set_xlabel("tokens generated")
    axis.set_ylabel("KV-cache length (slots)")
    axis.set_title("longest held-out question, by the generator's compression rule")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_losses(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    reasoner = results["loss_curves"]["reasoner"]
    axes[0].plot([s for s, _ in reasoner], [v for _, v in reasoner])
    axes[0].set_title("reasoner (uncompressed traces)")
    for name, curve in results["loss_curves"].items():
        if name != "reasoner":
            axes[1].plot([s for s, _ in curve], [v for _, v in curve], label=name)
    axes[1].set_title("compressors (frozen reasoner, pooler + LoRA)")
    for axis in axes:
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown(results: dict) -> str:
    settings, machine = results["settings"], results["machine"]
    stages = "\n".join(f"| {name} | {seconds:.1f} s |" for name, seconds in results["stage_seconds"].items())
    windows = ", ".join(str(w) for w in settings["windows"])
    keep = ", ".join(str(k) for k in settings["keep_last"])
    return f"""# hcr demo

A tiny Qwen2 reasoner ({settings['reasoner']['layers']} layers, hidden {settings['reasoner']['hidden_size']}) was
trained from scratch on {settings['train_items']:,} chained-arithmetic traces (mod 10, {settings['min_steps']}–{settings['max_steps']}
steps), then frozen; an embed pooler ({settings['pooler_layers']} layers, LoRA r={settings['lora_r']}) was trained for each
window W in {windows}; both were evaluated on {results['heldout_items']} held-out questions by greedy generation,
compressing the reasoning as it is written (keep_last k in {keep}: the reasoning tokens left
uncompressed after the last window).

Command: `{results['command']}`

## Results

{table(results)}

- **accuracy**: the final boxed answer equals the gold one.
- **layout check**: W = 1 with every slot holding its own token's embedding: the compressed layout
  with nothing lost, so what it costs is the layout's (markers, shifted positions), not the pooling's.
- **control**: the same generation with every pooled vector replaced by the mean pooled vector of
  the training windows; **carried by the vectors** is accuracy minus control.
- **needed value compressed**: share of steps whose previous value (the one the step needs) was
  inside a compressed window when the step was written (from the gold traces and the compression rule).
- **cache saving**: uncompressed mean peak KV-cache length over the compressed one.
- **tokens/s**: generated tokens per second of the fast path (`CompressedGenerator`, static ragged cache)
  and of uncompressed `generate()`, batch {settings['batch_size']}; the fast path's figure leaves out the
  autotuner's one-time measurements of shapes this machine had not seen (`autotune` below, `autotune_seconds`
  in `results.json`; a second run reads them from its cache).
- **recompute agrees**: items of the first {settings['recompute_items']} whose tokens are identical under the
  `recompute` strategy (the correctness oracle), at the first keep_last.

### Where the fast path's time went

Share of each configuration's generation time per stage of `CompressedGenerator`
(`prefill`; `decode`: steps where no row compressed; `re-encode`: steps where one did, less
their `pooling`, the pooler's pass over the new windows; `autotune`: measuring which kernel wins at a
shape this machine had not seen, once). A compression re-encodes the new
vector, the end marker and the kept tail, so every W tokens cost W − 1 one-position decodes
and one (keep_last + 2)-position re-encode: the last column, against 1 for `generate()`,
before the pooler's own pass.

{time_table(results)}

![accuracy vs W]({PLOTS['accuracy']})
![cache vs tokens]({PLOTS['cache']})
![training loss]({PLOTS['loss']})

## Time per stage

| stage | wall time |
|---|---|
{stages}
| total | {results['total_seconds']:.1f} s |

## Machine

{machine['cpu']} ({machine['isa']}), {machine['cores']} torch threads, {machine['platform']},
Python {machine['python']}, torch {machine['torch']}{', GPU ' + machine['gpu'] if machine['gpu'] else ''}.
"""


def write_outputs(out: Path, results: dict) -> None:
    """``results.json``, the plots and ``report.md`` in ``out``; each file replaced whole."""
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    for kind, plot in (("accuracy", plot_accuracy), ("cache", plot_cache), ("loss", plot_losses)):
        with atomic_path(out / PLOTS[kind]) as temporary:
            plot(results, temporary)
    write_atomic(out / "report.md", markdown(results))
