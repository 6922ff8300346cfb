"""``hcr demo``: a whole hidden-capacity experiment, offline, in minutes on a laptop CPU.

1. corpus: chained arithmetic mod 10 with a step-by-step trace (``corpus.py``), a seeded
   train / held-out split of distinct questions;
2. reasoner: a tiny Qwen2 trained from scratch on the uncompressed traces, its held-out
   accuracy measured by greedy generation;
3. compressors: the reasoner frozen, an embed pooler (LoRA) trained for each window W;
4. evaluation: held-out accuracy uncompressed and at each W, with the constant-vector
   control, at each ``keep_last`` k, how often the value a step needs was inside a compressed window, peak KV
   cache, tokens/s against ``generate()``, and the recompute oracle's agreement;
5. ``report.md``, ``results.json`` and plots in ``--out``.

Every trained stage is saved in ``--out`` with the settings that made it and reused by
a later run with the same settings (``fresh`` retrains).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hcr.argtypes import FLAG, NON_NEGATIVE_INT, POSITIVE_INT, POSITIVE_NUMBER, check_fields, non_empty_tuple_of, optional
from hcr.demo.corpus import split_corpus
from hcr.demo.reasoner import ReasonerSettings
from hcr.files import write_atomic
from hcr.timing import StageClock

STAGE_FILE = "hcr-stage.json"


@dataclass
class DemoSettings:
    """Every setting of the demo; ``hcr demo --help`` lists them as flags."""

    out: str = "hcr-demo"
    windows: tuple[int, ...] = (2, 4, 8)
    keep_last: tuple[int, ...] = (1, 4)
    train_items: int = 20000
    eval_items: int = 200
    min_steps: int = 6
    max_steps: int = 10
    reasoner: ReasonerSettings = field(default_factory=ReasonerSettings)
    pooler_steps: int = 150
    pooler_layers: int = 2
    pooler_batch_size: int = 16
    pooler_lr: float = 2e-3
    lora_r: int = 16
    batch_size: int = 50
    recompute_items: int = 16
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    fresh: bool = False

    def __post_init__(self):
        check_fields(self, windows=non_empty_tuple_of(POSITIVE_INT), keep_last=non_empty_tuple_of(NON_NEGATIVE_INT),
                     train_items=POSITIVE_INT, eval_items=POSITIVE_INT, min_steps=POSITIVE_INT,
                     max_steps=POSITIVE_INT, pooler_steps=POSITIVE_INT, pooler_layers=POSITIVE_INT,
                     pooler_batch_size=POSITIVE_INT, pooler_lr=POSITIVE_NUMBER, lora_r=NON_NEGATIVE_INT,
                     batch_size=POSITIVE_INT, recompute_items=NON_NEGATIVE_INT, threads=optional(POSITIVE_INT),
                     fresh=FLAG)
        if self.min_steps > self.max_steps:
            raise ValueError(f"DemoSettings.min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")

    @classmethod
    def quick(cls, **overrides) -> "DemoSettings":
        """A smoke-sized run (under a minute): every stage runs, the accuracies mean nothing."""
        small = dict(windows=(2, 4), train_items=400, eval_items=12, min_steps=3, max_steps=5,
                     reasoner=ReasonerSettings(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64,
                                               steps=20, batch_size=16, warmup_steps=5),
                     pooler_steps=4, pooler_layers=1, pooler_batch_size=4, recompute_items=4, batch_size=12)
        return cls(**{**small, **overrides})


def machine() -> dict:
    """What the figures were measured on: CPU model, vector ISA, cores, torch."""
    model, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "baseline" if flags else "unknown"
    return {"cpu": model, "isa": isa, "cores": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ---------------------------------------------------------------- cached stages


def _load_stage(folder: Path, key: dict, fresh: bool) -> dict | None:
    """The saved record of a stage made with exactly ``key``, or None (missing, other settings, or fresh).

    A stage to be made again loses its record here, before its files are written over: a run stopped
    halfway through them then finds no record and makes the stage again, never loads a mix of two.
    """
    path = folder / STAGE_FILE
    record = None if fresh or not path.exists() else json.loads(path.read_text())
    if record is not None and record.get("key") == key:
        return record
    if record is not None:
        print(f"hcr demo: {folder} was made with other settings; training it again")
    path.unlink(missing_ok=True)
    return None


def _save_stage(folder: Path, key: dict, **extra) -> None:
    """Written last, after the stage's files: a stage without it is redone, never half-loaded."""
    write_atomic(folder / STAGE_FILE, json.dumps({"key": key, **extra}, indent=1))


def corpus_stage(settings: DemoSettings, out: Path):
    """Train / held-out tasks and their jsonl files (what ``hcr train-compressor`` and ``hcr eval`` read)."""
    train, heldout = split_corpus(settings.train_items, settings.eval_items, min_steps=settings.min_steps,
                                  max_steps=settings.max_steps, seed=settings.seed)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, tasks in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        write_atomic(data / name, "".join(json.dumps(task.row()) + "\n" for task in tasks))
    return train, heldout


def corpus_key(settings: DemoSettings) -> dict:
    return {"train_items": settings.train_items, "eval_items": settings.eval_items, "min_steps": settings.min_steps,
            "max_steps": settings.max_steps, "seed": settings.seed}


def tokenizer_stage(settings: DemoSettings, out: Path, train):
    """A byte-level BPE trained on the training questions and traces, with the R1 special tokens."""
    from hcr.compression.tiny_tokenizer import tiny_tokenizer

    folder = out / "tokenizer"
    key = corpus_key(settings)
    if _load_stage(folder, key, settings.fresh) is None:
        texts = [text for task in train[:5000] for text in (task.question(), task.response())]
        tokenizer = tiny_tokenizer(None, texts=texts)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(folder))
        _save_stage(folder, key)
    return tiny_tokenizer(folder)


def reasoner_stage(settings: DemoSettings, out: Path, tokenizer, traces, tokens):
    """The tiny Qwen2 reasoner: loaded when saved with these settings, else trained and saved."""
    from transformers import AutoModelForCausalLM

    from hcr.demo.reasoner import build_reasoner, train_reasoner

    folder = out / "reasoner"
    key = {**corpus_key(settings), "reasoner": asdict(settings.reasoner)}
    record = _load_stage(folder, key, settings.fresh)
    if record is not None:
        return AutoModelForCausalLM.from_pretrained(str(folder)).to(settings.device).eval(), record["loss_curve"]
    torch.manual_seed(settings.seed)
    longest = max(len(t.ids) for t in traces)
    model = build_reasoner(len(tokenizer), settings.reasoner, max(256, 2 * longest), tokenizer.pad_token_id,
                           tokens.bos, tokens.eos).to(settings.device)
    curve = train_reasoner(model, traces, settings.reasoner, tokenizer.pad_token_id, settings.seed, tokens.markers)
    model.save_pretrained(str(folder))
    _save_stage(folder, key, loss_curve=curve)
    return model, curve


def compressor_stage(settings: DemoSettings, out: Path, window: int, base, tokenizer):
    """The embed pooler for ``window``, trained with ``train_compressor`` on the lazy stages of the traces;
    returned for evaluation, its LoRA merged (``CompressionModel.merge_adapter``)."""
    from hcr.compression.examples import ExampleConfig
    from hcr.compression.model import CompressionModel
    from hcr.compression.train import (LoraSettings, PoolerSettings, TrainSettings, build_compression_model,
                                       train_compressor)

    folder = out / f"compressor-W{window}"
    key = {**corpus_key(settings), "reasoner": asdict(settings.reasoner), "window": window,
           "pooler_steps": settings.pooler_steps, "pooler_layers": settings.pooler_layers,
           "pooler_batch_size": settings.pooler_batch_size, "pooler_lr": settings.pooler_lr,
           "lora_r": settings.lora_r}
    record = _load_stage(folder, key, settings.fresh)
    if record is not None:
        model = CompressionModel.from_pretrained(str(folder), base_model=base)
        return model.merge_adapter().to(settings.device).eval(), record["loss_curve"]
    torch.manual_seed(settings.seed)
    lora = LoraSettings(r=settings.lora_r, alpha=settings.lora_r) if settings.lora_r else None
    model = build_compression_model(base, tokenizer, window, lora=lora, base_model_name_or_path=str(out / "reasoner"),
                                    pooler=PoolerSettings(num_hidden_layers=settings.pooler_layers))
    train_settings = TrainSettings(
        output_dir=str(folder), max_steps=settings.pooler_steps, gradient_accumulation_steps=1,
        per_device_train_batch_size=settings.pooler_batch_size, learning_rate=settings.pooler_lr,
        warmup_steps=min(20, settings.pooler_steps // 10), logging_steps=max(1, settings.pooler_steps // 20),
        save_steps=10**9, save_total_limit=None, report_to="none", seed=settings.seed,
        extra={"lr_scheduler_type": "cosine", "disable_tqdm": False},
    )
    trainer = train_compressor(model, tokenizer, str(out / "data" / "train.jsonl"),
                               examples=ExampleConfig(window=window), settings=train_settings)
    curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    _save_stage(folder, key, loss_curve=curve)
    return model.merge_adapter().to(settings.device).eval(), curve  # evaluated only from here: LoRA merged


# ---------------------------------------------------------------- the experiment


def run_demo(settings: DemoSettings, command: str | None = None) -> dict:
    """Run (or resume) the whole experiment; returns the results that ``results.json`` holds.

    ``command``: how it was started, for the report (default: this function's call).
    """
    from hcr.compression.tokens import CompressionTokens
    from hcr.compression.traces import tokenize_traces_batch
    from hcr.demo import measure, report

    if settings.threads:
        torch.set_num_threads(settings.threads)
    for window in settings.windows:
        if window < 1:
            raise ValueError(f"windows must be >= 1, got {window}")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    times = StageClock()
    began = time.perf_counter()

    with times("corpus and tokenizer"):
        train, heldout = corpus_stage(settings, out)
        tokenizer = tokenizer_stage(settings, out, train)
        tokens = CompressionTokens.from_tokenizer(tokenizer)
        traces = tokenize_traces_batch(tokenizer, tokens, [t.question() for t in train], [t.response() for t in train])
        heldout_traces = tokenize_traces_batch(tokenizer, tokens, [t.question() for t in heldout],
                                               [t.response() for t in heldout])
    with times("reasoner training"):
        base, reasoner_curve = reasoner_stage(settings, out, tokenizer, traces, tokens)
        base.requires_grad_(False)
    compressors, curves = {}, {"reasoner": reasoner_curve}
    for window in settings.windows:
        with times(f"compressor training W={window}"):
            compressors[window], curves[f"W={window}"] = compressor_stage(settings, out, window, base, tokenizer)
    with times("evaluation"):
        results = measure.evaluate_all(settings, base, compressors, tokenizer, tokens, heldout, heldout_traces, traces)
    results.update(command=command or f"hcr.demo.experiment.run_demo({settings!r})",
                   settings=_settings_dict(settings), machine=machine(), loss_curves=curves,
                   stage_seconds=times.seconds, total_seconds=time.perf_counter() - began)
    report.write_outputs(out, results)
    return results


def _settings_dict(settings: DemoSettings) -> dict:
    return {**asdict(replace(settings, reasoner=None)), "reasoner": asdict(settings.reasoner)}
