"""``hcr train-compressor`` under ``torchrun``: real data-parallel training on CPU (DDP over gloo).

Two processes, batch 2 each, must train exactly the pooler that one process trains with
batch 4 (the same global batches: accelerate deals out the batches of one seeded sampler
round-robin), hold identical weights, see different examples, and leave the writing to
rank 0. Ranks that trained alone (the bug this guards against) would each match a batch-2
run instead. A second launch resumes from the first one's checkpoint and must end where
the uninterrupted run ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from tiny_bases import save_tiny_base_and_traces  # noqa: E402

ADAPTER = os.path.join("pooler_adapter", "adapter_model.safetensors")

# Runs the command line under torchrun and records, per rank, what the test checks: every
# save_pretrained call with its is_main_process, the training batches, the Trainer's view of
# the run, and the final trainable weights (only rank 0 saves them in the ordinary way).
LAUNCHER = '''
import functools, json, os, sys
import torch
from hcr.cli import main
from hcr.compression import model as model_module, train as train_module

rank, record_dir = int(os.environ["RANK"]), os.environ["HCR_TEST_RECORD"]
record = {"saves": [], "batches": []}

save_pretrained = model_module.CompressionModel.save_pretrained
@functools.wraps(save_pretrained)
def recording_save(self, save_directory, *args, is_main_process=True, **kwargs):
    record["saves"].append([os.path.basename(str(save_directory)), bool(is_main_process)])
    return save_pretrained(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
model_module.CompressionModel.save_pretrained = recording_save

forward = model_module.CompressionModel.forward
@functools.wraps(forward)
def recording_forward(self, *args, **kwargs):
    record["batches"].append(kwargs["input_ids"].tolist())
    return forward(self, *args, **kwargs)
model_module.CompressionModel.forward = recording_forward

train_compressor = train_module.train_compressor
def recording_train(model, *args, **kwargs):
    trainer = train_compressor(model, *args, **kwargs)
    record.update(world_size=trainer.args.world_size, parallel_mode=trainer.args.parallel_mode.value,
                  process_index=trainer.args.process_index, global_step=trainer.state.global_step)
    torch.save({k: v.detach().clone() for k, v in model.pooler.named_parameters() if v.requires_grad},
               os.path.join(record_dir, f"rank{rank}.pt"))
    return trainer
train_module.train_compressor = recording_train

try:
    code = main(sys.argv[1:])
finally:
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
sys.exit(code)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2 base with the tiny tokenizer, a traces file, and the recording launcher."""
    root = save_tiny_base_and_traces(tmp_path_factory.mktemp("ddp"), hidden_size=32, layers=1, traces=12)
    (root / "launch.py").write_text(LAUNCHER)
    return root


def arguments(root, output_dir, batch_size, *extra):
    return ["train-compressor", "--base", str(root / "base"), "--dataset", str(root / "traces.jsonl"),
            "--output-dir", str(output_dir), "--window", "4", "--pooler-layers", "1", "--lora-r", "4",
            "--max-steps", "6", "--save-steps", "3", "--batch-size", str(batch_size), "--grad-accum", "1",
            "--lr", "1e-3", "--logging-steps", "1", "--report-to", "none", *extra]


def torchrun(root, record_dir, args):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 launch.py ARGS`` on CPU."""
    record_dir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HCR_TEST_RECORD=str(record_dir), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "launch.py"), *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    records = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(record_dir / f"rank{r}.pt") for r in range(2)]
    return result, records, weights


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_torchrun_trains_one_pooler_data_parallel_and_resumes(setup, tmp_path):
    from hcr.cli import main
    from hcr.compression.model import CompressionModel

    root = setup
    out = tmp_path / "ddp"
    result, records, weights = torchrun(root, tmp_path / "record", arguments(root, out, 2))

    # the Trainer ran distributed, two processes, six steps each
    for rank, record in enumerate(records):
        assert record["parallel_mode"] == "distributed" and record["world_size"] == 2, record
        assert record["process_index"] == rank and record["global_step"] == 6
    assert sorted(p.name for p in (out / "checkpoint-3").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                 "rng_state_1.pth"]
    # the ranks saw different examples at every step, yet hold the very same pooler: all-reduce
    steps = list(zip(records[0]["batches"], records[1]["batches"]))
    assert len(steps) == 6 and all(a != b for a, b in steps)
    assert_same_weights(weights[0], weights[1], atol=0)

    # only rank 0 wrote the model (the Trainer does not even ask rank 1), our own prints came once
    assert records[0]["saves"] == [["checkpoint-3", True], ["checkpoint-6", True], ["ddp", True]]
    assert not any(main_process for _, main_process in records[1]["saves"])
    assert result.stdout.count("2 data-parallel processes") == 1
    assert result.stdout.count("pooler and adapter saved to") == 1
    assert not [p.name for p in tmp_path.iterdir() if ".saving-" in p.name]
    assert not [p.name for p in out.iterdir() if ".saving-" in p.name]
    final = load_file(out / ADAPTER)
    assert_same_weights(final, {k: v for k, v in load_file(out / "checkpoint-6" / ADAPTER).items()}, atol=0)
    loaded = CompressionModel.from_pretrained(out)
    assert_same_weights({k: v for k, v in loaded.pooler.named_parameters() if "lora_" in k},
                        {k: v for k, v in weights[0].items() if "lora_" in k}, atol=0)

    # one process with batch 4 sees the same global batches: the same pooler, up to summation order
    single = tmp_path / "single"
    assert main(arguments(root, single, 4)) == 0
    reference = load_file(single / ADAPTER)
    assert_same_weights(final, reference, atol=1e-6)
    halfway = load_file(out / "checkpoint-3" / ADAPTER)
    assert max((reference[k] - halfway[k]).abs().max().item() for k in reference) > 1e-4  # it did move
    ddp_losses = [h["loss"] for h in json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
                  ["log_history"] if "loss" in h]
    single_losses = [h["loss"] for h in json.loads((single / "checkpoint-6" / "trainer_state.json").read_text())
                     ["log_history"] if "loss" in h]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)

    # a second launch resumes from checkpoint-3 and ends exactly where the uninterrupted run did
    resumed_out = tmp_path / "resumed"
    _, resumed_records, resumed = torchrun(root, tmp_path / "record-resumed",
                                           arguments(root, resumed_out, 2, "--resume", str(out / "checkpoint-3")))
    assert [len(r["batches"]) for r in resumed_records] == [3, 3]
    assert_same_weights(resumed[0], weights[0], atol=0)
    assert_same_weights(load_file(resumed_out / ADAPTER), final, atol=0)
