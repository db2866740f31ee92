"""`compare_strategies`: the four strategies on one tiny budget, measured and tabulated."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from safetensors import safe_open

from sam2_peft.comparison import compare_strategies, parse_strategies
from sam2_peft.config import TrainConfig

STRATEGIES = [("decoder", {}), ("partial", {"num_blocks": 2}), ("full", {}), ("lora", {"lora_r": 4})]
# Valid as a config, fails inside the run: a failed strategy becomes a row, the others still run.
FAILING = ("lora", {"targets": "trunk.bogus"})


def write_tiny_data(root: Path) -> Path:
    """One train and one val image (48 px, two rectangles each): the cheapest data finetune accepts."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        labels = np.zeros((48, 48), np.uint8)
        labels[4:16, 5:20], labels[25:40, 22:44] = 1, 2
        image = (rng.integers(0, 60, (48, 48)) + 80 * labels).astype(np.uint8)
        for kind, array in (("images", image), ("masks", labels)):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(array).save(root / split / kind / f"{split}.png")
    return root


def saved_numel(final: Path) -> int:
    peft = final / "adapter_model.safetensors"
    with safe_open(peft if peft.is_file() else final / "trained_tensors.safetensors", "pt") as handle:
        return sum(int(np.prod(handle.get_slice(key).get_shape())) for key in handle.keys())


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    data = write_tiny_data(tmp_path_factory.mktemp("data"))
    return TrainConfig(model="tiny-random", data=str(data), max_steps=2, batch_size=2, eval_steps=2, val_fraction=0)


@pytest.fixture(scope="module")
def compared(base_cfg, tmp_path_factory):
    output = tmp_path_factory.mktemp("compare")
    return compare_strategies(base_cfg, [*STRATEGIES, FAILING], output, isolate=False), output


@pytest.mark.slow
def test_compare_tabulates_all_four_strategies(compared):
    result, output = compared
    rows = {row["label"]: row for row in result["strategies"]}
    assert list(rows) == ["decoder", "partial (num_blocks=2)", "full", "lora (lora_r=4)", "lora (targets=trunk.bogus)"]
    failed = rows.pop("lora (targets=trunk.bogus)")
    assert failed["error"].startswith("ValueError: targets='trunk.bogus' matched no nn.Linear module")
    assert json.loads((output / "comparison.json").read_text()) == result
    table = (output / "comparison.md").read_text()
    assert all(f"| {label} |" in table for label in rows) and "| lora (targets=trunk.bogus) | failed: " in table
    assert (output / "comparison.png").is_file()
    for row in rows.values():
        assert row["error"] is None and row["steps"] == 2
        # What final/ holds is exactly what trained (non-PEFT: trained tensors; LoRA: the adapter weights).
        assert row["trainable_params"] == saved_numel(Path(row["output_dir"]) / "final")
        run_metrics = json.loads((Path(row["output_dir"]) / "metrics.json").read_text())
        assert row["dice"] == run_metrics["best"]["dice"]
        assert row["seconds_per_step"] > 0
        assert row["images_per_s"] == pytest.approx(2 / row["seconds_per_step"])
        assert row["peak_memory_mb"] is None  # CPU, not isolated: a process's peak RSS can't be split per run
    counts = [rows[label]["trainable_params"] for label in ("decoder", "partial (num_blocks=2)", "full")]
    assert counts == sorted(counts) and rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert rows["lora (lora_r=4)"]["options"]["r"] == 4
    assert rows["full"]["options"]["learning_rate"] == 1e-5  # each strategy at its own default rate


@pytest.mark.slow
def test_isolated_run_measures_memory_and_matches_in_process(base_cfg, compared, tmp_path):
    result = compare_strategies(base_cfg, [("decoder", {})], tmp_path, isolate=True)
    row = result["strategies"][0]
    assert row["peak_memory_mb"] > 100  # a process with torch loaded
    in_process = result_row(compared[0], "decoder")
    assert row["dice"] == pytest.approx(in_process["dice"], abs=1e-6)
    assert row["trainable_params"] == in_process["trainable_params"]


def result_row(result: dict, label: str) -> dict:
    return next(row for row in result["strategies"] if row["label"] == label)


def test_parse_strategies_and_config_errors_before_training(base_cfg, tmp_path):
    assert parse_strategies("decoder, partial:num_blocks=2,lora:lora_r=16:learning_rate=3e-4") == [
        ("decoder", {}),
        ("partial", {"num_blocks": 2}),
        ("lora", {"lora_r": 16, "learning_rate": 3e-4}),
    ]
    with pytest.raises(ValueError, match="'lora_r16' in 'lora:lora_r16' is not field=value"):
        parse_strategies("lora:lora_r16")
    with pytest.raises(ValueError, match="names no strategy"):
        parse_strategies(" , ")
    with pytest.raises(ValueError, match=r"options \['rank'\] of 'lora \(rank=4\)' are not TrainConfig fields"):
        compare_strategies(base_cfg, [("decoder", {}), ("lora", {"rank": 4})], tmp_path)
    with pytest.raises(ValueError, match="`--strategy partial` needs `--num_blocks N`"):
        compare_strategies(base_cfg, [("decoder", {}), ("partial", {})], tmp_path)
    with pytest.raises(ValueError, match="'decoder' is listed twice"):
        compare_strategies(base_cfg, [("decoder", {}), ("decoder", {})], tmp_path)
    assert not any(tmp_path.iterdir())  # nothing trained
    with pytest.raises(RuntimeError, match="every strategy failed:\nlora \\(targets=trunk.bogus\\): ValueError"):
        compare_strategies(base_cfg, [FAILING], tmp_path, isolate=False)
