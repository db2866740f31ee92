"""A run killed at any moment and resumed ends with the same weights as an uninterrupted run (bit-identical on CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sam2_peft.training import COMPLETE_MARKER

from train_helpers import SAMPLE_DATA, final_tensors

pytestmark = pytest.mark.slow


def train_command(output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sam2_peft.cli", "train",
        "--model", "tiny-random", "--data", SAMPLE_DATA, "--strategy", "lora", "--output_dir", str(output_dir),
        "--max_steps", "8", "--batch_size", "2", "--eval_steps", "8", "--checkpoint_steps", "2",
        "--checkpoint_total_limit", "2", "--max_objects_per_image", "3", "--correction_rounds", "1",
        "--lora_dropout", "0.1", "--learning_rate", "1e-3", "--seed", "3", *extra,
    ]


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_killed_run_resumes_to_identical_weights(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    # The reference runs alongside the interrupted run (their start-ups overlap); the thread count, which decides
    # the order of sums, is the same either way.
    log = tmp_path / "reference.log"
    with log.open("w") as stderr:
        uninterrupted = subprocess.Popen(train_command(reference), stdout=subprocess.DEVNULL, stderr=stderr)
    process = subprocess.Popen(train_command(interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = interrupted / "checkpoints" / "checkpoint_1" / COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not second.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists()
    assert uninterrupted.wait(timeout=600) == 0, log.read_text()[-3000:]

    run(train_command(interrupted, "--resume_from_checkpoint", "latest"))
    expected, resumed = final_tensors(reference), final_tensors(interrupted)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after kill and resume"
    # The half-written checkpoint (if any) is gone and numbering continued: the same folders as the reference.
    names = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference / "checkpoints").iterdir())


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    result = subprocess.run(train_command(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--resume_from_checkpoint latest" in result.stderr
