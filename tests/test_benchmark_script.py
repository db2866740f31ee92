"""The benchmark script runs end to end on the tiny model and writes its JSON and Markdown (timings not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    command = [sys.executable, str(SCRIPT), "--config", "tiny-random", "--image_size", "256", "--steps", "1",
               "--strategies", "decoder,lora-last4", "--mixed_precision", "bf16", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["strategies"]) == {"decoder", "lora-last4"}
    assert report["strategies"]["decoder"]["cache"] == "features"
    assert report["strategies"]["lora-last4"]["cache"] == "prefix"
    assert report["settings"]["mixed_precision"] == "bf16"
    for row in report["strategies"].values():
        assert row["naive_step_s"] > 0 and row["ours_step_s"] > 0
        assert row["peak_mb"] > 0 and row["peak_mb_returned"] > 0
    assert report["adapter_switch"] and report["inference"]
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "| decoder | features |" in markdown and "| peak MB, freed memory returned to the OS | / full |" in markdown
    for row in report["strategies"].values():  # FLOPs counted on CPU too; MFU needs the CUDA matmul ceiling
        assert row["flops_per_step"] > 0 and row["mfu"] is None
    # the cached decoder step computes no encoder: far fewer FLOPs than LoRA's, which runs the last 4 blocks
    assert report["strategies"]["decoder"]["flops_per_step"] < report["strategies"]["lora-last4"]["flops_per_step"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="CPU memory probes read /proc")
def test_cpu_memory_probe_measures_the_child_not_its_parent():
    """Linux carries a parent's peak RSS into its child's ru_maxrss; the probe must report the child's own peak."""
    import argparse

    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    import benchmark

    ballast = torch.ones(2**28)  # 1 GiB resident in this (parent) process
    args = argparse.Namespace(config="tiny-random", image_size=256, batch_size=1, objects=2,
                              device=torch.device("cpu"), gradient_checkpointing=False, mixed_precision="no",
                              backend="auto")
    peak = benchmark.probe_memory(args, "lora", "ours")
    assert 1 < peak < 512, f"{peak:.0f} MB for a 1.5M-parameter model: the parent's {ballast.numel() * 4 >> 20} MB leaked in"


def test_unknown_strategy_is_refused_by_name(monkeypatch, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import benchmark

    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--strategies", "decoder,lora2", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--strategies: unknown \['lora2'\]; choose from decoder,"):
        benchmark.main()
    assert not any(tmp_path.iterdir())


def test_benchmark_configs_are_the_official_sizes_at_the_requested_resolution():
    from transformers import Sam2Config

    sys.path.insert(0, str(SCRIPT.parent))
    import benchmark

    assert benchmark.build_config("hiera-tiny", 1024).to_diff_dict() == Sam2Config().to_diff_dict()
    large = benchmark.build_config("hiera-large", 512)
    assert large.vision_config.backbone_config.blocks_per_stage == [2, 6, 36, 4]
    assert large.vision_config.backbone_config.image_size == [512, 512]
    assert large.vision_config.backbone_feature_sizes == [[128, 128], [64, 64], [32, 32]]
    assert large.prompt_encoder_config.image_size == 512
    with pytest.raises(ValueError, match="hiera-base-plus"):
        benchmark.build_config("hiera-huge", 1024)
    with pytest.raises(ValueError, match="multiple of 32"):
        benchmark.build_config("hiera-small", 1000)


def test_cpu_memory_probes_run_with_the_default_heap_and_with_freed_memory_returned(monkeypatch):
    import argparse

    sys.path.insert(0, str(SCRIPT.parent))
    import benchmark

    for name, value in [("MALLOC_MMAP_THRESHOLD_", "4096"), ("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "x=1")]:
        monkeypatch.setenv(name, value)  # the user's own malloc settings must not leak into "default"
    args = argparse.Namespace(config="hiera-small", image_size=512, batch_size=2, objects=3,
                              gradient_checkpointing=True, checkpoint_strips=1, mixed_precision="bf16")
    command, env = benchmark.probe_command(args, "lora", "ours", "default")
    assert command[2:] == ["--probe", "lora:ours", "--config", "hiera-small", "--image_size", "512", "--batch_size",
                           "2", "--objects", "3", "--gradient_checkpointing", "--checkpoint_strips", "1",
                           "--mixed_precision", "bf16"]
    assert not {"MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES"} & set(env)
    assert env["PATH"] == os.environ["PATH"]
    _, env = benchmark.probe_command(args, "lora", "ours", "returned")
    assert env["MALLOC_MMAP_THRESHOLD_"] == "131072" and "MALLOC_ARENA_MAX" not in env


def test_paired_times_report_the_median_of_each_pairs_ratio(monkeypatch):
    """A slow stretch of the machine that hits one pair moves the medians of the times, not the pairs' ratio."""
    sys.path.insert(0, str(SCRIPT.parent))
    import benchmark

    times = iter([1.0, 1.1, 5.0, 5.5, 2.0, 1.9])  # 10% slower, but for one pair; the middle pair ran slowly
    monkeypatch.setattr(benchmark, "timed", lambda fn, args: next(times))
    first, second, ratio = benchmark.paired_median_times([(None, None)] * 3, None)
    assert (first, second) == (2.0, 1.9)  # medians of the times: 0.95x
    assert ratio == pytest.approx(1.1)
