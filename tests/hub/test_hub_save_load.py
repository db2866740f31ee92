"""Saving and loading adapter folders: formats, round trips, base checks, atomic writes, file safety."""

import json

import pytest
import torch
import yaml
from hub_helpers import assert_state_equal, clone_state, lora_model
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Sam2Model

from sam2_peft.hub import (
    AdapterFileError,
    AdapterMismatchError,
    adapter_files,
    atomic_file,
    atomic_folder,
    base_fingerprint,
    check_file_name,
    load_adapter,
    save_adapter,
)
from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.segmenter import Sam2Segmenter

TINY_FINGERPRINT = model_fingerprint(load_sam2("tiny-random"))


def run(model, batch):
    return Sam2Segmenter(model)(**batch).mask_logits


def test_peft_folder_loads_with_plain_peft_and_transformers(tmp_path, tiny_batch):
    model = lora_model(modules_to_save=["iou_prediction_head"]).eval()
    save_adapter(model, tmp_path / "final", base_model_name_or_path="tiny-random", strategy="lora",
                 metrics={"dice": 0.75, "iou": 0.6}, datasets=["me/ct-organs"])
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "sam2_peft.json"]
    # What a user without sam2-peft does: a Sam2Model folder for the base, then plain PEFT.
    load_sam2("tiny-random").save_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(Sam2Model.from_pretrained(tmp_path / "base"), tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(run(reloaded, tiny_batch), run(model, tiny_batch), rtol=0, atol=1e-6)

    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    record = json.loads((tmp_path / "final" / "sam2_peft.json").read_text())
    assert config["base_model_name_or_path"] == TINY_FINGERPRINT  # a preset name means nothing elsewhere
    shapes = record.pop("adapted_shapes")  # each adapted module's weight shape, for the mismatch check
    base = load_sam2("tiny-random")
    assert len(shapes) == 8 and all(shapes[name] == list(base.get_submodule(name).weight.shape) for name in shapes)
    assert record == {"base_model_name_or_path": TINY_FINGERPRINT, "base_fingerprint": TINY_FINGERPRINT,
                      "strategy": "lora", "revision": None, "sam2_peft_version": "0.1.0"}
    assert base_fingerprint(model) == TINY_FINGERPRINT  # PEFT's renamed base weights are seen through


def test_model_card_metadata(tmp_path):
    save_adapter(lora_model(), tmp_path / "a", base_model_name_or_path="facebook/sam2.1-hiera-tiny",
                 strategy="lora", revision="v2", metrics={"dice": 0.75}, datasets=["me/ct-organs"])
    text = (tmp_path / "a" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "facebook/sam2.1-hiera-tiny"
    assert meta["library_name"] == "peft"
    assert {"sam2", "peft", "lora"} <= set(meta["tags"])
    assert meta["datasets"] == ["me/ct-organs"]
    assert meta["strategy"] == "lora"
    result = meta["model-index"][0]["results"][0]
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [("dice", 0.75)]
    assert "| dice | 0.75 |" in text
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("facebook/sam2.1-hiera-tiny", "v2")


def test_trained_tensors_round_trip(tmp_path, tiny_batch, recwarn):
    model = load_sam2("tiny-random")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mask_decoder."))
    with torch.no_grad():
        for param in model.mask_decoder.parameters():
            param.add_(0.01)
    save_adapter(model, tmp_path / "final", base_model_name_or_path="tiny-random", strategy="decoder")
    with safe_open(tmp_path / "final" / "trained_tensors.safetensors", framework="pt") as file:
        keys = set(file.keys())
    assert keys == {name for name, p in model.named_parameters() if p.requires_grad}
    assert keys <= set(Sam2Model(model.config).state_dict())

    fresh = load_sam2("tiny-random")
    assert load_adapter(fresh, tmp_path / "final", is_trainable=True) is fresh
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, tiny_batch), run(model, tiny_batch), rtol=0, atol=0)
    assert {name for name, p in fresh.named_parameters() if p.requires_grad} == keys
    # The record names the frozen part of the base, which the fresh base matches: no "other base" warning.
    assert not [w for w in recwarn if "trained on base" in str(w.message)]
    meta = yaml.safe_load((tmp_path / "final" / "README.md").read_text().split("---")[1])
    assert meta["library_name"] == "sam2-peft" and "base_model" not in meta


def test_nothing_trained_is_an_error(tmp_path):
    model = load_sam2("tiny-random").requires_grad_(False)
    with pytest.raises(ValueError, match="trained_only=False"):
        save_adapter(model, tmp_path / "x", strategy="decoder")
    assert not (tmp_path / "x").exists()


def test_peft_adapter_for_another_base_is_refused_before_any_weight_changes(tmp_path, wide_model):
    save_adapter(lora_model(), tmp_path / "a", strategy="lora")
    before = clone_state(wide_model)
    with pytest.raises(AdapterMismatchError,
                       match=r"blocks\.0\.attn\.qkv had weight shape \(72, 24\) in the adapter's base, \(96, 32\) in this"):
        load_adapter(wide_model, tmp_path / "a")
    assert_state_equal(wide_model, before)
    assert not any("lora" in name for name, _ in wide_model.named_modules())


def test_trained_tensors_for_another_base_are_refused(tmp_path, wide_model):
    model = load_sam2("tiny-random")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("vision_encoder.backbone.blocks.0."))
    save_adapter(model, tmp_path / "t", strategy="partial")
    before = clone_state(wide_model)
    with pytest.raises(AdapterMismatchError, match="blocks.0.attn.qkv.weight has shape"):
        load_adapter(wide_model, tmp_path / "t")
    assert_state_equal(wide_model, before)


def test_unknown_tensor_key_is_refused(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    save_file({"mask_decoder.not_a_layer.weight": torch.zeros(2)}, folder / "trained_tensors.safetensors")
    model = load_sam2("tiny-random")
    before = clone_state(model)
    with pytest.raises(AdapterMismatchError, match="not_a_layer.weight is not a weight of this model"):
        load_adapter(model, folder)
    assert_state_equal(model, before)


def test_same_architecture_other_weights_warns(tmp_path, tiny_batch):
    save_adapter(lora_model(), tmp_path / "a", strategy="lora")
    other = load_sam2("tiny-random")
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.add_(1.0)
    with pytest.warns(UserWarning, match=f"trained on base {TINY_FINGERPRINT}"):
        load_adapter(other, tmp_path / "a")


def test_atomic_folder_keeps_the_previous_folder_on_error(tmp_path):
    target = tmp_path / "final"
    with atomic_folder(target) as tmp:
        (tmp / "sam2_peft.json").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_folder(target) as tmp:
            (tmp / "sam2_peft.json").write_text("new, half written")
            raise RuntimeError("interrupted")
    assert (target / "sam2_peft.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no staging folders left behind
    with atomic_folder(target) as tmp:
        (tmp / "sam2_peft.json").write_text("new")
    assert (target / "sam2_peft.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_atomic_file_keeps_the_previous_file_on_error(tmp_path):
    target = tmp_path / "metrics.json"
    with atomic_file(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(target) as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no staging file left behind


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd", "a\\..\\b", "sub/../../x", "C:/x"])
def test_escaping_file_names_are_refused(name):
    with pytest.raises(AdapterFileError, match="Refusing file name"):
        check_file_name(name)
    with pytest.raises(AdapterFileError, match="Refusing file name"):
        adapter_files(["adapter_config.json", "adapter_model.safetensors", name], "repo")


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "a"
    save_adapter(lora_model(), folder, strategy="lora")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    model = load_sam2("tiny-random")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin, which are pickled"):
        load_adapter(model, folder)
    assert adapter_files(["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "x.py"], "r") == [
        "adapter_config.json", "adapter_model.safetensors"]
