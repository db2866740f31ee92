"""`sam2-peft export --format onnx`: the adapter is merged, its preprocessing travels, another base's is refused."""

import json

import pytest
import torch
from transformers import Sam2Model

from sam2_peft import apply_strategy, load_sam2
from sam2_peft.cli import main
from sam2_peft.data.config import DataConfig
from sam2_peft.hub import AdapterMismatchError, save_adapter
from sam2_peft.models import tiny_random_config

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "adapter"
    model = apply_strategy(load_sam2("tiny-random"), "lora", init_lora_weights=False)
    save_adapter(model, folder, strategy="lora", data=DataConfig(ct_window="40,400"))
    return folder


def test_export_writes_the_pair_with_the_adapters_preprocessing(adapter, tmp_path):
    main(["export", "--model", "tiny-random", "--adapter", str(adapter), "--format", "onnx",
          "--output_dir", str(tmp_path / "onnx")])  # fmt: skip
    assert {p.name for p in (tmp_path / "onnx").iterdir()} >= {"encoder.onnx", "decoder.onnx", "metadata.json"}
    metadata = json.loads((tmp_path / "onnx" / "metadata.json").read_text())
    assert metadata["image_size"] == 256 and metadata["preprocessing"]["ct_window"] == "40,400"


def test_export_refuses_an_adapter_of_another_base(adapter, tmp_path):
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
