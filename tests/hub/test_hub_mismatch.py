"""Adapters made for another base are refused before PEFT touches the model, for each of the nine PEFT tuners.

The references: the file's own safetensors header and plain PEFT injected into the other base (the shapes the error
must quote), plain `PeftModel.from_pretrained` on the right base (what a successful load must give).
"""

import copy
import json
import re
import shutil

import pytest
import torch
from hub_helpers import clone_state, lora_model
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Sam2Model

from sam2_peft.hub import AdapterMismatchError, base_fingerprint, load_adapter, save_adapter
from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.presets import tiny_random_config
from sam2_peft.strategies import PEFT_STRATEGIES, apply_strategy

TINY = load_sam2("tiny-random")
TINY_FINGERPRINT = model_fingerprint(TINY)
# BOFT blocks of 4 divide every Hiera width of both bases (24..192 and 32..256).
OPTIONS = {"boft": {"boft_block_size": 4}, "fourierft": {"n_frequency": 200}}
QKV0 = "vision_encoder.backbone.blocks.0.attn.qkv"
HAS_SHAPE = re.compile(r"(\S+) has shape (\([\d, ]*\)) in the adapter but this model needs (\([\d, ]*\))")


def save_trained(tuner: str, folder, **options):
    """Save a `tuner` adapter of the tiny base whose weights moved away from PEFT's (often identity) init."""
    torch.manual_seed(0)
    model = apply_strategy(copy.deepcopy(TINY), tuner, r=4, **{**OPTIONS.get(tuner, {}), **options})
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return save_adapter(model, folder, strategy=tuner)


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """LoRA on every Hiera `attn.qkv` (a regex) plus the whole mask decoder (`modules_to_save`)."""
    model = lora_model(modules_to_save=["mask_decoder"])
    return save_adapter(model, tmp_path_factory.mktemp("lora") / "a", strategy="lora")


def build_base(**backbone) -> Sam2Model:
    """The tiny SAM2 with other Hiera backbone settings (e.g. `blocks_per_stage`)."""
    config = tiny_random_config()
    for key, value in backbone.items():
        setattr(config.vision_config.backbone_config, key, value)
    torch.manual_seed(1)
    return Sam2Model(config).eval()


def refusal(model, folder) -> str:
    """Load `folder` onto `model`, expect AdapterMismatchError, check the model is as it was; return the message."""
    for name, param in model.named_parameters():  # a pattern that PEFT's freezing would change
        param.requires_grad_(name.startswith("mask_decoder."))
    modules = [(name, type(module)) for name, module in model.named_modules()]
    grads = {name: param.requires_grad for name, param in model.named_parameters()}
    state = clone_state(model)
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(model, folder)
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    assert {name: param.requires_grad for name, param in model.named_parameters()} == grads
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[key], value) for key, value in state.items())
    return str(info.value)


def problems(message: str) -> list[str]:
    return message.split("does not fit this model: ")[1].split(". Load the base")[0].split("; ")


def plain_peft_copy(folder, tmp_path):
    """The folder as plain PEFT writes it: no sam2_peft.json, so only adapter_config.json names the base."""
    plain = shutil.copytree(folder, tmp_path / "plain")
    (plain / "sam2_peft.json").unlink()
    return plain


@pytest.mark.parametrize("tuner", PEFT_STRATEGIES)
def test_refused_on_another_architecture_and_loads_on_its_own(tuner, wide_model, tmp_path):
    folder = save_trained(tuner, tmp_path / tuner)
    # sam2-peft's folder: the recorded weight shapes of the adapted modules.
    message = refusal(wide_model, folder)
    assert f"{QKV0} had weight shape (72, 24) in the adapter's base, (96, 32) in this model" in message
    assert f"made for another base ({json.loads((folder / 'sam2_peft.json').read_text())['base_model_name_or_path']})" \
        in message

    # Plain PEFT's folder: the adapter's tensors against what its config gives on this model. FourierFT's spectra
    # have the same shapes on any base, so only the record above can tell.
    if tuner != "fourierft":
        plain = plain_peft_copy(folder, tmp_path)
        message = refusal(wide_model, plain)
        key, found, needed = HAS_SHAPE.search(message).groups()
        assert key.startswith(QKV0)
        with safe_open(plain / "adapter_model.safetensors", framework="pt") as file:
            assert found == str(tuple(file.get_slice(f"base_model.model.{key}").get_shape()))
        reference = get_peft_model(copy.deepcopy(wide_model), PeftConfig.from_pretrained(str(plain)))
        assert needed == str(tuple(get_peft_model_state_dict(reference)[f"base_model.model.{key}"].shape))
        made_for = json.loads((plain / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert made_for.startswith("sam2-") and f"made for another base ({made_for})" in message

    # Its own base: the file's weights, and the same outputs as plain PEFT.
    torch.manual_seed(0)
    inputs = {"pixel_values": torch.randn(1, 3, 256, 256), "input_boxes": torch.tensor([[[30.0, 40.0, 200.0, 180.0]]])}
    ours = load_adapter(copy.deepcopy(TINY), folder).eval()
    loaded = get_peft_model_state_dict(ours)
    file = load_file(folder / "adapter_model.safetensors")
    assert loaded.keys() == file.keys() and all(torch.equal(loaded[key], value) for key, value in file.items())
    reference = PeftModel.from_pretrained(copy.deepcopy(TINY), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).pred_masks, reference(**inputs).pred_masks, rtol=0, atol=0)


def test_boft_block_size_that_does_not_divide_names_the_module(wide_model, tmp_path):
    folder = plain_peft_copy(save_trained("boft", tmp_path / "boft", boft_block_size=12), tmp_path)  # 12 | 24, not 32
    assert problems(refusal(wide_model, folder)) == [
        f"PEFT cannot apply the adapter's BOFT config to {QKV0} (weight shape (96, 32)): in_features (32) must be "
        "divisible by boft_block_size (12)!"]


@pytest.mark.parametrize("record", [True, False])
def test_only_some_targets_missing(record, lora_folder, tmp_path):
    # 7 blocks instead of 8: blocks 0-6 have the same shapes, blocks.7 is gone.
    folder = lora_folder if record else plain_peft_copy(lora_folder, tmp_path)
    model = build_base(blocks_per_stage=[1, 2, 3, 1], global_attention_blocks=[4])
    found = "(weight (576, 192)) is not in this model" if record else "is not in this model (the adapter has 2 tensors)"
    assert problems(refusal(model, folder)) == [f"vision_encoder.backbone.blocks.7.attn.qkv {found}"]


def test_targeted_module_without_weights_is_refused(lora_folder):
    # The regex trained on 8 blocks also matches a 9th block that the adapter has nothing for.
    assert problems(refusal(build_base(blocks_per_stage=[1, 2, 3, 3]), lora_folder)) == [
        "vision_encoder.backbone.blocks.8.attn.qkv matches the adapter's target_modules but the adapter has no "
        "weights for it"]


def test_saved_modules_need_exact_shapes(lora_folder):
    config = tiny_random_config()
    config.mask_decoder_config.iou_head_hidden_dim = 32
    torch.manual_seed(1)
    listed = problems(refusal(Sam2Model(config).eval(), lora_folder))
    assert listed[0] == ("mask_decoder.iou_prediction_head.layers.0.bias has shape (64,) in the adapter but this model "
                         "needs (32,)")
    assert all(line.startswith("mask_decoder.iou_prediction_head.") for line in listed[:-1])


def test_vera_base_fingerprint_is_the_plain_base():
    assert base_fingerprint(apply_strategy(copy.deepcopy(TINY), "vera", r=4)) == TINY_FINGERPRINT
