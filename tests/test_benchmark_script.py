"""The benchmark script runs end to end on the tiny model and writes its JSON and Markdown (numbers not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    command = [sys.executable, str(SCRIPT), "--config", "tiny-random", "--image_size", "256", "--steps", "1",
               "--strategies", "decoder,lora-last4", "--no_memory", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["strategies"]) == {"decoder", "lora-last4"}
    assert report["strategies"]["decoder"]["cache"] == "features"
    assert report["strategies"]["lora-last4"]["cache"] == "prefix"
    for row in report["strategies"].values():
        assert row["naive_step_s"] > 0 and row["ours_step_s"] > 0
    assert report["adapter_switch"] and report["inference"]
    assert "| decoder | features |" in (tmp_path / "benchmark.md").read_text()
    bad = subprocess.run([*command[:-2], "--strategies", "lora2", "--output", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "--strategies: unknown ['lora2']" in bad.stderr


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
                              device=torch.device("cpu"), gradient_checkpointing=False)
    peak = benchmark.probe_memory(args, "lora", "ours")
    assert 1 < peak < 512, f"{peak:.0f} MB for a 1.5M-parameter model: the parent's {ballast.numel() * 4 >> 20} MB leaked in"
