"""Deployment commands: `export --format onnx`, `segment` and `eval --prompt everything`, with an adapter."""

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image

import pytest
import torch
from transformers import Sam2Model

from sam2_peft import apply_strategy, load_sam2
from sam2_peft.automatic import evaluate_everything, generate_masks, label_map, load_pixels
from sam2_peft.cli import main
from sam2_peft.data import IntensityConfig, load_source
from sam2_peft.data.config import DataConfig
from sam2_peft.hub import AdapterMismatchError, load_adapter, save_adapter
from sam2_peft.presets import tiny_random_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
# A coarse grid and loose thresholds: the tiny random model's masks are poor, and the test needs several.
GRID = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
GRID_FLAGS = ["--points_per_side", "4", "--pred_iou_thresh", "0", "--stability_score_thresh", "0"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "adapter"
    torch.manual_seed(2)  # LoRA weights with which the CT-windowed cells give several distinct automatic masks
    model = apply_strategy(load_sam2("tiny-random"), "lora", init_lora_weights=False)
    save_adapter(model, folder, strategy="lora", data=DataConfig(ct_window="40,400"))
    return folder


def test_export_writes_the_pair_with_the_adapters_preprocessing(adapter, tmp_path):
    pytest.importorskip("onnxruntime")
    main(["export", "--model", "tiny-random", "--adapter", str(adapter), "--format", "onnx",
          "--output_dir", str(tmp_path / "onnx")])  # fmt: skip
    assert {p.name for p in (tmp_path / "onnx").iterdir()} >= {"encoder.onnx", "decoder.onnx", "metadata.json"}
    metadata = json.loads((tmp_path / "onnx" / "metadata.json").read_text())
    assert metadata["image_size"] == 256 and metadata["preprocessing"]["ct_window"] == "40,400"


def test_export_refuses_an_adapter_of_another_base(adapter, tmp_path):
    pytest.importorskip("onnxruntime")
    config = tiny_random_config()  # with a wider Hiera trunk, whose qkv layers the adapter does not fit
    config.vision_config.backbone_config.hidden_size = 32
    config.vision_config.backbone_config.embed_dim_per_stage = [32, 64, 128, 256]
    config.vision_config.backbone_channel_list = [256, 128, 64, 32]
    torch.manual_seed(0)
    Sam2Model(config).save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterMismatchError):
        main(["export", "--model", str(tmp_path / "other"), "--adapter", str(adapter), "--format", "onnx",
              "--output_dir", str(tmp_path / "onnx")])  # fmt: skip
    assert not (tmp_path / "onnx").exists()


def test_segment_writes_the_adapters_automatic_masks(adapter, tmp_path):
    image = EXAMPLES / "val" / "images" / "cells_val_000.png"
    main(["segment", "--model", "tiny-random", "--adapter", str(adapter), "--image", str(image),
          "--output", str(tmp_path / "labels.png"), *GRID_FLAGS])  # fmt: skip
    labels = np.asarray(PIL.Image.open(tmp_path / "labels.png"))
    assert (tmp_path / "labels_overlay.png").is_file()
    model = load_adapter(load_sam2("tiny-random"), adapter)
    window = load_pixels(image, IntensityConfig(mode="window", window=(40.0, 400.0)))
    expected = label_map(generate_masks(model, window, **GRID), window.shape[-2:])
    assert labels.shape == expected.shape and labels.max() > 1
    np.testing.assert_array_equal(labels, expected)  # the adapter's CT window was applied, not `auto`
    auto = load_pixels(image, IntensityConfig())
    assert not np.array_equal(label_map(generate_masks(model, auto, **GRID), auto.shape[-2:]), labels)


def test_eval_everything_scores_the_matched_instances(adapter, tmp_path):
    for kind in ("images", "masks"):
        (tmp_path / "data" / "test" / kind).mkdir(parents=True)
        shutil.copy(EXAMPLES / "val" / kind / "cells_val_000.png", tmp_path / "data" / "test" / kind)
    main(["eval", "--model", "tiny-random", "--adapter", str(adapter), "--data", str(tmp_path / "data"),
          "--prompt", "everything", "--output_dir", str(tmp_path / "eval"), *GRID_FLAGS])  # fmt: skip
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(results) == {"protocol", "fine_tuned", "baseline", "gain"}
    rows = load_source(str(tmp_path / "data"))["test"]
    window = IntensityConfig(mode="window", window=(40.0, 400.0))
    expected = evaluate_everything(load_adapter(load_sam2("tiny-random"), adapter), rows, intensity=window, **GRID)
    for key in ("precision", "recall", "f1", "true_positives", "false_positives", "false_negatives"):
        assert results["fine_tuned"][key] == expected[key]
    assert results["fine_tuned"]["num_images"] == 1 and results["protocol"]["points_per_side"] == 4
    assert results["gain"]["f1"] == pytest.approx(results["fine_tuned"]["f1"] - results["baseline"]["f1"])
