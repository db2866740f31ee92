"""A run killed at any moment, or while a checkpoint is being written, and resumed ends with the outputs of an
uninterrupted run: bit-identical weights on CPU (`final/`, `best/`, the last checkpoint's), the same `metrics.json`
and `history.json` (but for its timings), the same checkpoint folders.

    .venv/bin/pytest tests/training/test_resume.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sam2_peft.cli import main
from sam2_peft.training import COMPLETE_MARKER, latest_checkpoint

from train_helpers import final_tensors, killed_while_saving_command, small_sample

pytestmark = pytest.mark.slow

# 6 training images in batches of 2 make 3 steps per epoch, so the 12 steps span four epochs: checkpoints at steps 3
# (the last batch of epoch 0), 6, 9 and 12, validations every 2 steps. At this learning rate step 2's validation is
# the best and later ones are worse, so final/ (the best weights) is not the last step's (checked below).
# Dropout and correction clicks draw random numbers every step; losses are logged over windows of 2 steps.
TRAIN = ["--model", "tiny-random", "--strategy", "lora", "--max_steps", "12", "--batch_size", "2", "--eval_steps", "2",
         "--checkpoint_steps", "3", "--checkpoint_total_limit", "2", "--logging_steps", "2",
         "--max_objects_per_image", "3", "--correction_rounds", "1", "--lora_dropout", "0.1",
         "--learning_rate", "1e-2", "--seed", "3"]
# History columns that measure the machine, not the training.
TIMINGS = ("images_per_s", "peak_memory_mb")


def train_args(data: str, output_dir: Path, *extra: str) -> list[str]:
    return ["train", *TRAIN, "--data", data, "--output_dir", str(output_dir), *extra]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Start `command` with its output in `log`, unbuffered so that a killed run's log is complete."""
    with log.open("w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(process: subprocess.Popen, log: Path) -> str:
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def run_outputs(output_dir: Path) -> dict:
    """What a finished run leaves that its resumed twin must reproduce (timings left out)."""
    metrics = json.loads((output_dir / "metrics.json").read_text())
    metrics.pop("throughput")
    history = json.loads((output_dir / "history.json").read_text())["history"]
    best_file = output_dir / "best" / "trainable.safetensors"
    with safe_open(best_file, framework="pt") as handle:
        best_step = int(handle.metadata()["step"])
    return {
        "final": final_tensors(output_dir),
        "best": load_file(best_file),
        "last": load_file(latest_checkpoint(output_dir / "checkpoints") / "model.safetensors"),
        "best_file_step": best_step,
        "metrics": metrics,
        "history": [{key: value for key, value in row.items() if key not in TIMINGS} for row in history],
        "checkpoints": sorted(path.name for path in (output_dir / "checkpoints").iterdir()),
    }


def differences(expected: dict, actual: dict, run: str) -> list[str]:
    """Each output of `actual` that is not exactly `expected`'s, described."""
    found = []
    for weights in ("final", "best", "last"):  # final/, best/, and the last step's in the last checkpoint
        if expected[weights].keys() != actual[weights].keys():
            found.append(f"{run}: the {weights} weights are other tensors")
            continue
        differing = [name for name in expected[weights] if not torch.equal(expected[weights][name], actual[weights][name])]
        if differing:
            found.append(f"{run}: the {weights} weights differ in {len(differing)} tensors, e.g. {differing[0]}")
    found += [f"{run}: {key} {actual[key]} != {expected[key]}"
              for key in ("best_file_step", "metrics", "checkpoints") if actual[key] != expected[key]]
    found += [f"{run}: history.json at step {theirs['step']}: {mine} != {theirs}"
              for mine, theirs in zip(actual["history"], expected["history"]) if mine != theirs]
    if len(actual["history"]) != len(expected["history"]):
        found.append(f"{run}: history.json has {len(actual['history'])} rows, not {len(expected['history'])}")
    return found


def test_killed_runs_resume_to_the_uninterrupted_outputs(tmp_path):
    data = small_sample(tmp_path / "data")
    reference, run = tmp_path / "reference", tmp_path / "run"
    logs = [tmp_path / f"{name}.log" for name in ("reference", "saving", "resumed", "resumed_again")]
    cli = [sys.executable, "-m", "sam2_peft.cli"]
    # The reference overlaps the first run (start-ups dominate); the thread count, which decides the order of sums, is
    # the same for each. The first run kills itself halfway through writing checkpoint_1 (step 6).
    uninterrupted = start([*cli, *train_args(data, reference)], logs[0])
    saving = start(killed_while_saving_command(sys.executable, "checkpoint_1", train_args(data, run)), logs[1])
    assert saving.wait(timeout=600) == -signal.SIGKILL, logs[1].read_text()[-3000:]
    checkpoints = run / "checkpoints"
    half = checkpoints / "checkpoint_1"
    assert (half / "model.safetensors").is_file() and (half / "optimizer.bin").is_file()
    assert not (half / COMPLETE_MARKER).exists() and not (half / "scheduler.bin").exists()
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint_0"

    # Resumed at the end of epoch 0, the run is killed from outside once it has written checkpoint_1 again, at
    # whatever moment it is then in (from step 6 on: epoch 2).
    resume = [*cli, *train_args(data, run, "--resume_from_checkpoint", "latest")]
    resumed = start(resume, logs[2])
    deadline = time.monotonic() + 300
    while not (half / COMPLETE_MARKER).exists() and resumed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert resumed.poll() is None, "the resumed run finished before it could be killed: " + logs[2].read_text()[-3000:]
    os.kill(resumed.pid, signal.SIGKILL)
    resumed.wait()
    first_resume = logs[2].read_text()
    assert f"Removing {half}" in first_resume and f"Resumed from {checkpoints / 'checkpoint_0'} at step 3." in first_resume
    assert not (run / "final").exists()
    finish(start(resume, logs[3]), logs[3])
    finish(uninterrupted, logs[0])

    expected = run_outputs(reference)
    # The case this test is about: the best validation is not the last, and it came before the first resumed step.
    metrics = expected["metrics"]
    validations = {row["step"]: row for row in expected["history"] if "num_objects" in row}  # validate()'s rows
    assert metrics["best_step"] == expected["best_file_step"] == 2
    assert metrics["best"] == validations[2] and metrics["last"] == validations[12], "metrics.json: not validations"
    assert validations[2]["dice"] > validations[12]["dice"]
    assert any(not torch.equal(tensor, expected["last"][name]) for name, tensor in expected["best"].items())
    found = differences(expected, run_outputs(run), "killed while saving, resumed, killed, resumed")
    assert found == [], "\n".join(found)


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        main(train_args(small_sample(tmp_path / "data"), tmp_path))
