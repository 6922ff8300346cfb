"""``evaluate``: a reasoning model on a question set, with or without a compressor; resumable, sharded.

Each item is answered in the R1 chat layout, its final answer extracted and
compared with the gold one (``hcr.evaluation.answers``). With a compressor the
batch runs through ``CompressedGenerator``; without one, through the base's own
``generate`` on a left-padded batch. Records go to ``OUT/results.jsonl`` as they
come (a crash loses at most the batch in flight; a rerun skips what is there),
the summary to ``OUT/summary.json``.

Under ``torchrun`` every process takes the items whose index is its rank modulo
the world size; after each round of batches rank 0 gathers the records and
writes them, and only rank 0 ever writes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hcr.argtypes import (FLAG, NON_NEGATIVE_INT, POSITIVE_INT, POSITIVE_NUMBER, PROBABILITY, check_fields,
                          optional)
from hcr.evaluation.answers import answers_match, extract_answer_with_rule
from hcr.evaluation.data import EvalItem, load_items
from hcr.evaluation.records import RecordWriter, format_summary, read_records, summarize, write_atomic
from hcr.generation.prompts import left_pad, prompt_ids

__all__ = ["EvalSettings", "evaluate"]

RESULTS, SUMMARY = "results.jsonl", "summary.json"
# Settings that change what a record says: a rerun into the same --out must not mix records made under others.
RESULT_SETTINGS = ("base", "tokenizer", "compressor", "merge_adapter", "dataset", "split", "question_field",
                   "answer_field", "window", "keep_last", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                   "seed")


@dataclass
class EvalSettings:
    """What ``hcr eval`` measures and how; the flags of the command, one to one."""

    base: str
    dataset: str
    out: str
    tokenizer: str | None = None
    compressor: str | None = None
    # fold the compressor's LoRA into its pooler before generating (equal up to rounding, faster); False
    # generates with the adapted pooler exactly as trained
    merge_adapter: bool = True
    question_field: str = "question"
    answer_field: str = "answer"
    split: str | None = None
    window: int | None = None  # default: the compressor's
    keep_last: int = 4
    max_new_tokens: int = 1024
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    limit: int | None = None

    def __post_init__(self):
        check_fields(self, merge_adapter=FLAG, window=optional(POSITIVE_INT), keep_last=NON_NEGATIVE_INT,
                     max_new_tokens=POSITIVE_INT, batch_size=POSITIVE_INT, do_sample=FLAG, temperature=POSITIVE_NUMBER,
                     top_k=optional(NON_NEGATIVE_INT), top_p=optional(PROBABILITY), limit=optional(POSITIVE_INT))


# ------------------------------------------------------------------ distributed


class _Group:
    """This process's rank and the world size; a gloo (CPU) or nccl (CUDA) group when torchrun started several."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
            if not dist.is_initialized():
                if torch.cuda.is_available():
                    torch.cuda.set_device(self.device)  # nccl's object collectives use the current device
                dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
                self.owned = True
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, records: list[dict]) -> list[dict]:
        """Every rank's records (on every rank; only rank 0 uses them)."""
        if self.world == 1:
            return records
        import torch.distributed as dist

        everyone = [None] * self.world
        dist.all_gather_object(everyone, records)
        return [record for part in everyone for record in part]

    def close(self, finished: bool) -> None:
        """Tear down the group this process made; wait for the others only after a run that finished (a rank
        that failed must exit, so that torchrun notices and stops the rest)."""
        if self.owned:
            import torch.distributed as dist

            if finished:
                dist.barrier()
            dist.destroy_process_group()


# ------------------------------------------------------------------ models


def _check_compressor(path: Path, base, tokens, base_name: str):
    """Refuse a compressor built for another base or tokenizer, naming both sides, before loading its weights."""
    from hcr.compression.model import POOLER_DIR, CompressionConfig

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--compressor {path}: no config.json (expected a CompressionModel.save_pretrained "
                                f"folder)")
    pooler_config = path / POOLER_DIR / "config.json"
    if not pooler_config.is_file():
        raise FileNotFoundError(f"--compressor {path}: no {POOLER_DIR}/config.json (expected a "
                                f"CompressionModel.save_pretrained folder)")
    pooler = json.loads(pooler_config.read_text())
    ours = (pooler.get("vocab_size"), pooler.get("hidden_size"))
    theirs = (base.get_input_embeddings().num_embeddings, base.config.hidden_size)
    if ours != theirs:
        raise ValueError(f"--compressor {path} was built for a base with vocab size {ours[0]} and hidden size "
                         f"{ours[1]}, but --base {base_name} has vocab size {theirs[0]} and hidden size {theirs[1]}")
    config = CompressionConfig.from_pretrained(str(path))
    for name, expected in (("placeholder_id", tokens.placeholder), ("block_start_id", tokens.block_start),
                           ("block_end_id", tokens.block_end)):
        if getattr(config, name) != expected:
            raise ValueError(f"--compressor {path} has {name}={getattr(config, name)} but the tokenizer's is "
                             f"{expected}: it was trained with another tokenizer")
    return config


class _Answerer:
    """Generates a batch of answers and turns them into records."""

    def __init__(self, settings: EvalSettings, device: torch.device):
        from transformers import AutoModelForCausalLM

        from hcr.compression.tokens import CompressionTokens, load_tokenizer

        self.settings, self.device = settings, device
        self.tokenizer = load_tokenizer(settings.base, settings.tokenizer)
        self.tokens = CompressionTokens.from_tokenizer(self.tokenizer)
        base = AutoModelForCausalLM.from_pretrained(settings.base)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokens.eos
        self.generator = None
        if settings.compressor is None:
            self.model = base.to(device).eval()
            return
        from hcr.compression.model import CompressionModel
        from hcr.generation import CompressedGenerator

        path = Path(settings.compressor)
        if not path.is_dir():
            raise FileNotFoundError(f"--compressor {path}: no such folder")
        config = _check_compressor(path, base, self.tokens, settings.base)
        if settings.window is None:
            settings.window = config.window
        self.model = CompressionModel.from_pretrained(str(path), base_model=base)
        if settings.merge_adapter:
            self.model.merge_adapter()
        self.model.to(device).eval()
        self.generator = CompressedGenerator(self.model, self.tokenizer, window_size=settings.window,
                                             keep_last=settings.keep_last)

    @staticmethod
    def _hf_sampling(sampling: dict) -> dict:
        """``generate``'s spelling of "no top-k / top-p" (its generation config would otherwise add top-k 50),
        so that both paths sample from the same distribution."""
        if not sampling:
            return {}
        return {"temperature": sampling["temperature"], "top_k": sampling["top_k"] or 0,
                "top_p": 1.0 if sampling["top_p"] is None else sampling["top_p"]}

    def answer(self, items: list[EvalItem]) -> list[dict]:
        s = self.settings
        prompts = prompt_ids(self.tokenizer, [item.question for item in items], self.tokens)
        ids, mask = left_pad(prompts, self.pad, self.device)
        seed = s.seed + items[0].index  # per batch: a rerun of the same batch samples the same tokens
        sampling = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p} if s.do_sample else {}
        began = time.perf_counter()
        if self.generator is not None:
            out = self.generator.generate(
                ids, mask, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, eos_token_id=self.tokens.eos,
                pad_token_id=self.pad, generator=torch.Generator(self.device).manual_seed(seed),
                return_dict_in_generate=True, **sampling)
            sequences, compressions, peaks = out.sequences, out.compressions, out.peak_cache_length
        else:
            torch.manual_seed(seed)
            with torch.inference_mode():
                sampled = self.model.generate(
                    ids, attention_mask=mask, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                    eos_token_id=self.tokens.eos, pad_token_id=self.pad, **self._hf_sampling(sampling))
            sequences, compressions, peaks = sampled[:, ids.shape[1]:].cpu(), [0] * len(items), None
        seconds = (time.perf_counter() - began) / len(items)
        records = []
        for row, item in enumerate(items):
            tokens = sequences[row].tolist()
            # a row is done at its EOS or at max_new_tokens: whatever follows its EOS is padding
            length = tokens.index(self.tokens.eos) + 1 if self.tokens.eos in tokens else len(tokens)
            text_ids = tokens[: length - 1] if self.tokens.eos in tokens else tokens
            text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
            prediction, rule = extract_answer_with_rule(text)
            # the KV cache holds the prompt and every written token but the last, never fed back:
            # the generator's count, so both paths measure the same thing
            peak = peaks[row] if peaks is not None else len(prompts[row]) + length - 1
            records.append({
                "index": item.index, "question": item.question, "gold": item.gold, "prediction": prediction,
                "correct": answers_match(prediction, item.gold), "rule": rule, "output_tokens": length,
                "compressions": compressions[row], "peak_cache": peak, "seconds": seconds, "output": text,
            })
        return records


# ------------------------------------------------------------------ the run


def _check_resume(out: Path, settings: dict) -> None:
    """A rerun into ``out`` must measure the same thing as the run whose records are there."""
    summary = out / SUMMARY
    if not summary.is_file():
        return
    try:
        before = json.loads(summary.read_text()).get("settings", {})
    except json.JSONDecodeError:
        return  # written atomically, so only a hand edit breaks it; the records are still good
    changed = [key for key in RESULT_SETTINGS if key in before and before[key] != settings.get(key)]
    if changed:
        detail = ", ".join(f"{key}: {before[key]!r} -> {settings.get(key)!r}" for key in changed)
        raise ValueError(f"--out {out} holds results made with other settings ({detail}); "
                         f"evaluate into a new --out")


def evaluate(settings: EvalSettings, *, progress: bool = True) -> dict | None:
    """Evaluate, append the records to ``OUT/results.jsonl``, write ``OUT/summary.json``; returns the summary
    (on rank 0; None on the other ranks of a torchrun)."""
    from tqdm.auto import tqdm

    settings = replace(settings)  # the window is filled in from the compressor: the caller's copy stays as given
    items = load_items(settings.dataset, settings.question_field, settings.answer_field, split=settings.split,
                       limit=settings.limit)
    group, finished = _Group(), False
    try:
        answerer = _Answerer(settings, group.device)  # fills settings.window from the compressor
        recorded = asdict(settings)
        recorded["world_size"] = group.world
        if settings.compressor is None:
            recorded["window"] = recorded["keep_last"] = None  # nothing is compressed
        out = Path(settings.out)
        done = None
        if group.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _check_resume(out, recorded)
            done = {record["index"] for record in read_records(out / RESULTS, repair=True)}
        done = group.broadcast(done)
        pending = [item for item in items if item.index not in done]
        shards = [[item for item in pending if item.index % group.world == rank] for rank in range(group.world)]
        size = settings.batch_size
        rounds = max(-(-len(shard) // size) for shard in shards)  # every rank takes part in every gather
        mine = shards[group.rank]
        writer = RecordWriter(out / RESULTS)
        bar = tqdm(total=len(pending), desc="hcr eval", unit="item", disable=not progress or group.rank != 0)
        for round_ in range(rounds):
            batch = mine[round_ * size:(round_ + 1) * size]
            records = group.gather(answerer.answer(batch) if batch else [])
            if group.rank == 0:
                writer.append(sorted(records, key=lambda record: record["index"]))
                bar.update(len(records))
        bar.close()
        if group.rank != 0:
            finished = True
            return None
        by_index = {record["index"]: record for record in read_records(out / RESULTS)}
        records = [by_index[index] for index in sorted(by_index)]
        write_atomic(out / RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        summary = summarize(records, recorded)
        write_atomic(out / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        print(format_summary(summary))
        print(f"hcr eval: {len(records)} records in {out / RESULTS}, summary in {out / SUMMARY}")
        finished = True
        return summary
    finally:
        group.close(finished)
