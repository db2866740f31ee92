"""Each recipe runs its real entry point on the tiny model and writes the fixed outputs.

The first losses are regression numbers. Regenerate them with
    .venv/bin/pytest tests/training/test_recipes.py --print-losses -s
and paste the printed values into RECORDED_LOSSES (only after a deliberate change to the training math).
"""

import importlib.util
import json

import pytest

from sam2_peft.config import parse_config

from train_helpers import REPO, SAMPLE_DATA

RECIPES = ("lora_medical", "decoder_only", "partial_unfreeze", "full_finetune")
RECORDED_LOSSES = {
    "lora_medical": [9.4162, 9.3201, 8.9179],  # two rounds per step: the prompt, then one correction click
    "decoder_only": [4.7102, 4.6677, 4.4782],
    "partial_unfreeze": [4.7102, 4.6677, 4.4728],
    "full_finetune": [4.7102, 4.6677, 4.5193],
    "video_medical": [30.0418, 31.1616, 17.5133],  # summed over each clip's frames, prompt and correction click included
}


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_end_to_end(name, tmp_path, request):
    recipe = load_recipe(name)
    overrides = [
        "--model", "tiny-random", "--data", SAMPLE_DATA, "--mask_column", "mask", "--mask_type", "instance",
        "--intensity", "auto", "--output_dir", str(tmp_path), "--max_steps", "3", "--batch_size", "2",
        "--gradient_accumulation_steps", "1", "--eval_steps", "3", "--logging_steps", "1",
        "--max_objects_per_image", "3", "--seed", "0",
    ]
    cfg = parse_config(overrides, default_config=REPO / "recipes" / "configs" / f"{name}.yaml")
    metrics = recipe.main(cfg)
    assert metrics["steps"] == 3
    for path in ("final/sam2_peft.json", "final/README.md", "metrics.json", "training_curves.png", "config.yaml"):
        assert (tmp_path / path).is_file(), path
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    losses = [round(row["loss"], 4) for row in history if "loss" in row]
    if request.config.getoption("--print-losses"):
        print(f'"{name}": {losses},')
    assert losses == pytest.approx(RECORDED_LOSSES[name], rel=1e-3)


def test_video_recipe_runs_end_to_end(tmp_path, request):
    """The video recipe on the sample clips: prompts on each clip's first frame, the rest tracked."""
    overrides = [
        "--model", "tiny-random-video", "--data", str(REPO / "examples" / "data_video"), "--mask_type", "instance",
        "--output_dir", str(tmp_path), "--max_steps", "3", "--batch_size", "2", "--clip_length", "4",
        "--gradient_accumulation_steps", "1", "--eval_steps", "3", "--logging_steps", "1", "--seed", "0",
        "--ct_window", "none", "--intensity", "auto",  # the sample clips are 8-bit PNGs, not CT
    ]
    cfg = parse_config(overrides, default_config=REPO / "recipes" / "configs" / "video_medical.yaml")
    metrics = load_recipe("video_medical").main(cfg)
    assert metrics["steps"] == 3 and {"j", "f", "j_and_f", "dice"} <= set(metrics["best"])
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    losses = [round(row["loss"], 4) for row in history if "loss" in row]
    if request.config.getoption("--print-losses"):
        print(f'"video_medical": {losses},')
    assert losses == pytest.approx(RECORDED_LOSSES["video_medical"], rel=1e-3)
