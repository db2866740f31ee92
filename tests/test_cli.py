"""The `sam2-peft` command end to end on the tiny model: train, eval, merge, data, help."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import Sam2Model

from sam2_peft.cli import COMMANDS, main
from sam2_peft.hub import load_adapter
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import Sam2Segmenter

SAMPLE_DATA = str(Path(__file__).resolve().parents[1] / "examples" / "data")
TRAIN = ["--model", "tiny-random", "--data", SAMPLE_DATA, "--max_steps", "3", "--batch_size", "2",
         "--eval_steps", "3", "--max_objects_per_image", "3", "--learning_rate", "1e-3"]


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "sam2_peft.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "eval", "merge", "push", "convert", "data", "compare"):
        assert command in COMMANDS and f"  {command} " in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


def test_data_reports_the_sample(capsys):
    main(["data", SAMPLE_DATA])
    report = capsys.readouterr().out
    assert "train: 24 images, 24 usable" in report and "val: 8 images" in report


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run and a decoder run, 3 steps each."""
    root = tmp_path_factory.mktemp("runs")
    for strategy in ("lora", "decoder"):
        main(["train", *TRAIN, "--strategy", strategy, "--output_dir", str(root / strategy)])
    return root


def test_train_prints_dice_before_and_after(trained):
    metrics = json.loads((trained / "lora" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["baseline"]["step"] == 0
    assert (trained / "lora" / "final" / "adapter_model.safetensors").is_file()


def test_eval_writes_its_files_with_the_baseline(trained, capsys):
    out = trained / "eval"
    main(["eval", "--model", "tiny-random", "--adapter", str(trained / "lora" / "final"), "--data", SAMPLE_DATA,
          "--output_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fine_tuned", "baseline", "gain"} <= set(metrics)
    assert metrics["gain"]["dice"] == pytest.approx(metrics["fine_tuned"]["dice"] - metrics["baseline"]["dice"])
    assert (out / "per_object.csv").is_file() and (out / "overlays.png").is_file()


@pytest.mark.parametrize("strategy", ["lora", "decoder"])
def test_merge_equals_the_unmerged_model(trained, tiny_batch, strategy):
    merged_dir = trained / f"merged-{strategy}"
    main(["merge", "--model", "tiny-random", "--adapter", str(trained / strategy / "final"),
          "--output_dir", str(merged_dir)])
    merged = Sam2Model.from_pretrained(merged_dir).eval()
    unmerged = load_adapter(load_sam2("tiny-random"), trained / strategy / "final").eval()
    with torch.no_grad():
        expected = Sam2Segmenter(unmerged)(**tiny_batch)
        actual = Sam2Segmenter(merged)(**tiny_batch)
        base = Sam2Segmenter(load_sam2("tiny-random"))(**tiny_batch)
    torch.testing.assert_close(actual.mask_logits, expected.mask_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(actual.iou_scores, expected.iou_scores, rtol=0, atol=1e-4)
    assert (expected.mask_logits - base.mask_logits).abs().max() > 1e-3, "training changed nothing: a weak test"


def test_bad_input_fails_plainly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--model", "tiny-random"])
    assert "--adapter" in capsys.readouterr().err
    with pytest.raises(ValueError, match="missing.pt: no such checkpoint file"):
        main(["convert", "--sam2_checkpoint", str(tmp_path / "missing.pt"), "--output_dir", str(tmp_path / "o")])


def test_predict_with_domains_matches_each_adapter_alone(trained, tmp_path):
    image = Path(SAMPLE_DATA) / "val" / "images"
    image = sorted(image.iterdir())[0]
    lora = str(trained / "lora" / "final")
    box = ["--box", "40,40,120,120", "--box", "100,90,200,190"]
    main(["predict", "--model", "tiny-random", "--adapter", f"cells={lora}", "--adapter", f"copy={lora}",
          "--domain", "cells", "--image", str(image), *box, "--output", str(tmp_path / "domain.png")])
    main(["predict", "--model", "tiny-random", "--adapter", lora, "--image", str(image), *box,
          "--output", str(tmp_path / "alone.png")])
    domain, alone = (np.asarray(PIL.Image.open(tmp_path / f"{n}.png")) for n in ("domain", "alone"))
    assert domain.shape == alone.shape == PIL.Image.open(image).size[::-1]
    assert np.array_equal(domain, alone)
    assert set(np.unique(domain)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="NAME=PATH"):
        main(["predict", "--model", "tiny-random", "--adapter", lora, "--domain", "x", "--image", str(image),
              *box, "--output", str(tmp_path / "x.png")])
