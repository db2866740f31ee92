"""The `sam2-peft` command end to end on the tiny model: train, eval, merge, data, help."""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import HfArgumentParser, Sam2Model

from sam2_peft import cli
from sam2_peft.cli import COMMANDS, main
from sam2_peft.config import TrainConfig
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


def option_help(text: str) -> dict[str, str]:
    """Each option of an argparse help text, with the help printed for it (all whitespace removed)."""
    options, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, rest = line.strip().partition("  ")
            current = [rest]
            for name in re.findall(r"(?:^|, )(--?[\w-]+)", invocation):
                options[name] = current
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {name: "".join("".join(parts).split()) for name, parts in options.items()}


def documented_flags() -> dict[str, set[str]]:
    """The flags each command is shown with in the README's code blocks and the cli module's docstring usage."""
    lines, in_code = cli.__doc__.splitlines(), False
    for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code:
            lines.append(line)
    flags = {}
    pattern = re.compile(rf"sam2-peft ({'|'.join(COMMANDS)})\b(.*)")
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        if match := pattern.search(line):
            flags.setdefault(match.group(1), set()).update(re.findall(r"--\w+", match.group(2).split("#")[0]))
    return flags


def compact(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys, monkeypatch):
    # Record every flag the command's parsers define and every dataclass they read flags from.
    actions, dataclass_types = [], []
    add_argument = argparse._ActionsContainer.add_argument
    add_dataclass = HfArgumentParser._add_dataclass_arguments
    monkeypatch.setattr(argparse._ActionsContainer, "add_argument",
                        lambda self, *a, **k: actions.append(add_argument(self, *a, **k)) or actions[-1])
    monkeypatch.setattr(HfArgumentParser, "_add_dataclass_arguments",
                        lambda self, dtype: dataclass_types.append(dtype) or add_dataclass(self, dtype))
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    shown = option_help(capsys.readouterr().out)

    expected = {}  # flag -> its help text
    for action in actions:
        for flag in action.option_strings:
            expected.setdefault(flag, action.help or "")
    fields = [field for dtype in dataclass_types + ([TrainConfig] if command == "train" else [])
              for field in dataclasses.fields(dtype)]
    assert [field.name for field in fields if not field.metadata.get("help")] == [], "config fields without help"
    expected.update({f"--{field.name}": field.metadata["help"] for field in fields})
    missing = sorted(set(expected) - set(shown))
    assert missing == [], f"`sam2-peft {command} --help` does not list {missing}"
    wrong = sorted(flag for flag, text in expected.items() if compact(text) not in shown[flag])
    assert wrong == [], f"`sam2-peft {command} --help` does not print the help of {wrong}"
    undocumented = sorted(documented_flags().get(command, set()) - set(shown))
    assert undocumented == [], f"the README / cli docstring show `sam2-peft {command}` with {undocumented}"


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
