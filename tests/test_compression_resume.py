"""``hcr train-compressor`` killed with SIGKILL mid-run, then ``--resume``d, ends bit-identical to a run never killed.

One CPU process on a tiny Qwen2 base. The run saves checkpoint-4 and checkpoint-8 of 8 steps;
the test kills it once checkpoint-4 is complete (its ``trainer_state.json``, written last, is whole)
and before checkpoint-8 or the final save began, resumes with the same command, and compares the
final pooler and adapter, the last checkpoint's optimizer and scheduler state, and the trainer
state with an uninterrupted run's: equal tensors, not close ones. Since a run that started over
would end the same on CPU, the resumed run must also have left checkpoint-4 as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from tiny_bases import save_tiny_base_and_traces  # noqa: E402

SAVED_WEIGHTS = [os.path.join("pooler", "model.safetensors"),
                 os.path.join("pooler_adapter", "adapter_model.safetensors")]
STATE = "trainer_state.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2 base with the tiny tokenizer and a traces file."""
    return save_tiny_base_and_traces(tmp_path_factory.mktemp("resume"), hidden_size=64, layers=2, traces=16)


def command(root, output_dir, *extra):
    return [sys.executable, "-m", "hcr.cli", "train-compressor", "--base", str(root / "base"),
            "--dataset", str(root / "traces.jsonl"), "--output-dir", str(output_dir), "--window", "4",
            "--pooler-layers", "2", "--lora-r", "4", "--lora-dropout", "0.1", "--max-steps", "8",
            "--save-steps", "4", "--batch-size", "32", "--grad-accum", "4", "--lr", "1e-3", "--logging-steps", "1",
            "--report-to", "none", "--seed", "7", *extra]


def environment(root):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(root / "datasets-cache"))
    return env


def run(root, output_dir, *extra):
    result = subprocess.run(command(root, output_dir, *extra), cwd=root, env=environment(root),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def complete(state_file) -> bool:
    """Whether the Trainer has finished writing ``state_file`` (in place: it exists a moment before it is whole)."""
    try:
        return json.loads(state_file.read_text())["global_step"] > 0
    except (OSError, ValueError, KeyError):
        return False


def files_as_written(folder):
    """Every file below ``folder`` with its modification time and a hash of its bytes: what any rewrite changes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_after_first_checkpoint(root, output_dir):
    """Start the run, SIGKILL it once checkpoint-4 is complete; returns what existed at the kill."""
    process = subprocess.Popen(command(root, output_dir), cwd=root, env=environment(root),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not complete(output_dir / "checkpoint-4" / STATE):
            assert process.poll() is None, f"the run ended before checkpoint-4: {process.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint-4 in 90 s"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return sorted(p.name for p in output_dir.iterdir())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def assert_equal_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for name in a:
        same = torch.equal(a[name], b[name]) if torch.is_tensor(a[name]) else a[name] == b[name]
        assert same, f"{what}: {name} differs"


def flat_state(state, prefix=""):
    """Every leaf (tensor, number, flag) of a nested optimizer or scheduler state dict, by its path."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flat_state(value, f"{prefix}{key}/").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in flat_state(value, f"{prefix}{i}/").items()}
    return {prefix: state}


def steps(output_dir):
    """(step, loss, grad_norm, learning_rate) of every logged step of the last checkpoint."""
    state = json.loads((output_dir / "checkpoint-8" / STATE).read_text())
    return state["global_step"], [(h["step"], h["loss"], h["grad_norm"], h["learning_rate"])
                                  for h in state["log_history"] if "loss" in h]


def test_sigkill_then_resume_is_bit_identical(setup, tmp_path):
    root = setup
    reference = tmp_path / "reference"
    run(root, reference)

    interrupted = tmp_path / "interrupted"
    at_kill = kill_after_first_checkpoint(root, interrupted)
    # killed after checkpoint-4 was complete and before the run's end: no checkpoint-8, no final save
    assert "checkpoint-4" in at_kill and "checkpoint-8" not in at_kill and "config.json" not in at_kill, at_kill
    assert not (interrupted / "config.json").exists()
    first_checkpoint = files_as_written(interrupted / "checkpoint-4")

    resumed = run(root, interrupted, "--resume")
    assert f"resuming from {interrupted / 'checkpoint-4'}" in resumed.stdout
    # trained on from step 4: a run that started over (bit-identical on CPU) would have written checkpoint-4 again
    assert files_as_written(interrupted / "checkpoint-4") == first_checkpoint, "checkpoint-4 written again"

    for name in SAVED_WEIGHTS:
        final = load_file(interrupted / name)
        assert_equal_tensors(final, load_file(reference / name), f"final {name}")
        assert_equal_tensors(final, load_file(interrupted / "checkpoint-8" / name), f"checkpoint-8 {name}")
    for name in ("optimizer.pt", "scheduler.pt"):
        assert_equal_tensors(flat_state(torch.load(interrupted / "checkpoint-8" / name, weights_only=True)),
                             flat_state(torch.load(reference / "checkpoint-8" / name, weights_only=True)), name)
    assert steps(interrupted) == steps(reference)
    assert steps(reference)[0] == 8 and [s for s, *_ in steps(reference)[1]] == list(range(1, 9))


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    from hcr.compression.train import resume_checkpoint

    assert resume_checkpoint(tmp_path, None) is None and resume_checkpoint(tmp_path, False) is None
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        resume_checkpoint(tmp_path, True)
    for step in (4, 8, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (4, 8):
        (tmp_path / f"checkpoint-{step}" / STATE).write_text("{}")
    (tmp_path / ".checkpoint-16.saving-x").mkdir()
    # checkpoint-12 is what a kill mid-save leaves: the Trainer's own choice, but not loadable
    assert resume_checkpoint(tmp_path, True) == str(tmp_path / "checkpoint-8")
    assert resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-4")) == str(tmp_path / "checkpoint-4")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-12: it has no complete trainer_state.json"):
        resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-12"))
    for cut_short in ("", '{"global_step": 12, "log_hist'):  # killed while the Trainer wrote the file in place
        (tmp_path / "checkpoint-12" / STATE).write_text(cut_short)
        assert resume_checkpoint(tmp_path, True) == str(tmp_path / "checkpoint-8")
        with pytest.raises(FileNotFoundError, match=r"checkpoint-12: it has no complete trainer_state.json"):
            resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-12"))
