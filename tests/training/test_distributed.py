"""Two CPU processes (torchrun, gloo), under DDP and under FSDP, match one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from train_helpers import SAMPLE_DATA, final_tensors

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "ddp_worker.py"
FSDP_WORKER = Path(__file__).parent / "fsdp_worker.py"
REPO = Path(__file__).parents[2]


def args(output_dir: Path, batch_size: int) -> list[str]:
    return [
        "--model", "tiny-random", "--data", SAMPLE_DATA, "--strategy", "lora", "--output_dir", str(output_dir),
        "--max_steps", "4", "--batch_size", str(batch_size), "--eval_steps", "4", "--checkpoint_steps", "100",
        "--max_objects_per_image", "3", "--learning_rate", "1e-3", "--seed", "5",
    ]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_two_processes_match_one(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29531", str(WORKER), *args(tmp_path / "two", 3)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "MULTI_CPU" in two.stdout
    one = subprocess.run(
        [sys.executable, str(WORKER), *args(tmp_path / "one", 6)], capture_output=True, text=True, timeout=600, env=env
    )
    assert one.returncode == 0, one.stderr[-3000:]

    # 8 validation images (3 objects each at most) in batches of 3 per process: the padding repeats must not count.
    for run in ("two", "one"):
        assert json.loads((tmp_path / run / "metrics.json").read_text())["last"]["num_objects"] == 8 * 3
    rank0, rank1 = (load_file(tmp_path / "two" / f"rank{r}.safetensors") for r in (0, 1))
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the two ranks"
        # Gradients agree to float summation order; Adam's per-element normalisation turns that into update
        # differences up to a few % of one step (lr = 1e-3) where a gradient is near zero, hence atol 1e-4.
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-3, atol=1e-4, msg=f"{name}: 2 processes != 1")


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_video_training_runs_on_two_processes(tmp_path):
    """A video run under DDP and bf16 autocast: both ranks end with the same weights (the gradients were
    all-reduced), and validation counts each object of the validation clip once."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29535", str(WORKER), "--model", "tiny-random-video",
         "--task", "video", "--data", str(REPO / "examples" / "data_video"), "--strategy", "lora",
         "--targets", "trunk.qkv+memory.attn", "--output_dir", str(tmp_path), "--max_steps", "2", "--batch_size", "1",
         "--clip_length", "3", "--eval_steps", "2", "--checkpoint_steps", "100", "--correction_rounds", "1",
         "--learning_rate", "1e-3", "--seed", "5", "--mixed_precision", "bf16"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "MULTI_CPU" in two.stdout and "base: Sam2VideoModel" in two.stdout
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "metrics.json").read_text())["last"]["num_objects"] == 2
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert any(".memory_attention." in name for name in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the two ranks"


def fsdp_launch_env(processes: int) -> dict:
    """The environment `accelerate launch --config_file recipes/accelerate/fsdp.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = str(REPO / "recipes" / "accelerate" / "fsdp.yaml")
    parsed = launch_command_parser().parse_args(["--config_file", config, "--num_processes", str(processes), "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(parsed)[0])
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_fsdp_config_trains_the_full_recipe_like_one_process(tmp_path):
    """recipes/accelerate/fsdp.yaml on 2 CPU processes: sharded training, gathered best and final weights."""
    env = fsdp_launch_env(2)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    common = ["--model", "tiny-random", "--data", SAMPLE_DATA, "--max_steps", "4", "--eval_steps", "4",
              "--checkpoint_steps", "2", "--max_objects_per_image", "3", "--learning_rate", "1e-3", "--seed", "5"]
    runs = {
        # (command, output folder): the config's bf16, then fp32 on both sides for an exact comparison; the fp32
        # sharded runs checkpoint (Hiera blocks in strips inside their units, the trainable decoder once per object
        # in the root unit), which changes gradients only by the order of sums.
        "fsdp-bf16": [torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(FSDP_WORKER),
                      "--batch_size", "3"],
        "fsdp": [torchrun, "--nproc_per_node", "2", "--master_port", "29534", str(FSDP_WORKER), "--batch_size", "3",
                 "--mixed_precision", "no", "--gradient_checkpointing"],
        "one": [sys.executable, str(REPO / "recipes" / "full_finetune.py"), "--batch_size", "6",
                "--mixed_precision", "no"],
    }
    # LoRA through the same FSDP path: PEFT layers inside the sharded blocks, the adapter gathered for saving.
    runs["fsdp-lora"] = [*runs["fsdp"], "--strategy", "lora"]
    runs["one-lora"] = [*runs["one"], "--strategy", "lora"]
    # Each sharded run keeps both cores busy; the two single-thread references run side by side.
    outputs = {}
    for group in (["fsdp-bf16"], ["fsdp"], ["fsdp-lora"], ["one", "one-lora"]):
        started = {}
        for name in group:
            single_process = name.startswith("one")
            with (tmp_path / f"{name}.out").open("w") as stdout, (tmp_path / f"{name}.err").open("w") as stderr:
                started[name] = subprocess.Popen(
                    [*runs[name], *common, "--output_dir", str(tmp_path / name)], stdout=stdout, stderr=stderr,
                    env={**os.environ, "OMP_NUM_THREADS": "1"} if single_process else env,
                )
        for name, process in started.items():
            returncode = process.wait(timeout=600)
            outputs[name] = [(tmp_path / f"{name}.{stream}").read_text() for stream in ("out", "err")]
            assert returncode == 0, f"{name}: {outputs[name][1][-3000:]}"
    for name, (stdout, stderr) in outputs.items():
        checkpointed = "Gradient checkpointing: 8 Hiera blocks" in stdout + stderr
        assert checkpointed == (name in ("fsdp", "fsdp-lora"))
        if not name.startswith("one"):  # the wrap policy: one unit per Hiera block, plus the root (with the decoder)
            units = next(line for line in stdout.splitlines() if line.startswith("FSDP units:")).split()[-1]
            counts = {unit: units.split(",").count(unit) for unit in set(units.split(","))}
            assert counts == {"FSDPSam2MultiScaleBlock": 8, "FSDPInteractiveSegmenter": 1}, counts
            dtype = "torch.bfloat16" if name == "fsdp-bf16" else "None"
            assert f"FSDP parameter dtype: {dtype}" in stdout, stdout[-500:]

    bf16 = json.loads((tmp_path / "fsdp-bf16" / "metrics.json").read_text())
    assert bf16["steps"] == 4 and bf16["nonfinite_steps"] == 0
    assert yaml.safe_load((tmp_path / "fsdp-bf16" / "config.yaml").read_text())["mixed_precision"] == "bf16"
    for sharded_run, single_run, count in [("fsdp", "one", 100), ("fsdp-lora", "one-lora", 16)]:
        sharded, single = final_tensors(tmp_path / sharded_run), final_tensors(tmp_path / single_run)
        assert sharded.keys() == single.keys() and len(single) >= count
        for name in single:
            torch.testing.assert_close(sharded[name], single[name], rtol=1e-3, atol=1e-4, msg=f"{sharded_run} {name}")
    sharded = final_tensors(tmp_path / "fsdp")

    # Resume the sharded run from its step-2 checkpoint (sharded model and optimiser state): the same final weights.
    # checkpoint_1 is the last step's, left out so that there is something to resume.
    shutil.copytree(tmp_path / "fsdp" / "checkpoints", tmp_path / "resumed" / "checkpoints",
                    ignore=shutil.ignore_patterns("checkpoint_1"))
    command = [*runs["fsdp"], *common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resumed from" in done.stdout + done.stderr and "at step 2" in done.stdout + done.stderr
    resumed = final_tensors(tmp_path / "resumed")
    for name in sharded:
        torch.testing.assert_close(resumed[name], sharded[name], rtol=0, atol=0, msg=f"{name}: resumed differs")
