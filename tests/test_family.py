"""The SAM2 family beyond Sam2Model: SAM3's tracker (ViT encoder) and EdgeTAM (timm RepViT encoder), on tiny presets.

Every reference is transformers' or PEFT's own code path: the model's `forward`, `PeftModel.from_pretrained` on the
plain class, `from_pretrained` of a saved folder, module names read off the model.
"""

import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import PeftModel
from transformers import (
    EdgeTamModel,
    EdgeTamVideoConfig,
    EdgeTamVideoModel,
    Sam3TrackerModel,
    Sam3TrackerVideoConfig,
    Sam3TrackerVideoModel,
)

from sam2_peft.caching import FeatureCache, PrefixCache, first_trainable_block, plan_cache
from sam2_peft.cli import main
from sam2_peft.export import merge_to_folder
from sam2_peft.hub import save_adapter
from sam2_peft.memory import enable_gradient_checkpointing
from sam2_peft.models import ModelLoadError, load_sam2, model_fingerprint
from sam2_peft.presets import tiny_random_edgetam_config, tiny_random_sam3_tracker_config
from sam2_peft.segmenter import Sam2Segmenter, combine_prompts
from sam2_peft.speed import strips as strips_module
from sam2_peft.strategies import apply_strategy, trainable_summary
from sam2_peft.targets import resolve_targets

SAMPLE_DATA = str(Path(__file__).resolve().parents[1] / "examples" / "data")
SAM3, EDGETAM = "tiny-random-sam3-tracker", "tiny-random-edgetam"
PRESETS = [SAM3, EDGETAM]
PLAIN = {SAM3: (Sam3TrackerModel, tiny_random_sam3_tracker_config), EDGETAM: (EdgeTamModel, tiny_random_edgetam_config)}
SIZE = {SAM3: 224, EDGETAM: 256}
# The last two encoder blocks, and the adapter targets, as module names of the transformers / timm modules.
LAST_TWO = {
    SAM3: ["vision_encoder.backbone.layers.2.", "vision_encoder.backbone.layers.3."],
    EDGETAM: ["vision_encoder.backbone.timm_model.stages_3.downsample.",
              "vision_encoder.backbone.timm_model.stages_3.blocks.0."],
}
TARGETS = {SAM3: "trunk.qkv", EDGETAM: "trunk.mlp"}
TARGET_MODULES = {
    SAM3: r"vision_encoder\.backbone\.layers\.\d\.attention\.[qkv]_proj",
    EDGETAM: r"vision_encoder\.backbone\.timm_model\.stages_\d\.(?:blocks\.\d\.|downsample\.(?:pre_block\.)?)"
             r"(?:channel_mixer|ffn)\.conv[12]\.c",
}


def batch_for(preset: str) -> dict:
    """Two images, three objects (two on image 0): a box and a click each."""
    size = SIZE[preset]
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 50.0, 200.0, 210.0], [5.0, 6.0, 70.0, 80.0]])
    clicks = torch.tensor([[[55.0, 70.0]], [[120.0, 130.0]], [[30.0, 40.0]]])
    coords, labels = combine_prompts(boxes=boxes, points=clicks, point_labels=torch.ones(3, 1, dtype=torch.long))
    return {"pixel_values": pixel_values, "image_index": torch.tensor([0, 0, 1]), "point_coords": coords,
            "point_labels": labels}


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("preset", PRESETS)
def test_strategies_train_exactly_the_intended_parameters(preset):
    names = [name for name, _ in load_sam2(preset).named_parameters()]
    decoder = {name for name in names if name.startswith("mask_decoder.")}
    assert trainable(apply_strategy(load_sam2(preset), "decoder")) == decoder
    last_two = {name for name in names if name.startswith(tuple(LAST_TWO[preset]))}
    partial = apply_strategy(load_sam2(preset), "partial", num_blocks=2)
    assert last_two and trainable(partial) == last_two | decoder
    summary = trainable_summary(partial)
    last = summary[f"trunk.blocks.{ {SAM3: 3, EDGETAM: 7}[preset] }"]
    assert summary["trunk.blocks.0"]["trainable"] == 0 and last["trainable"] == last["total"] > 0
    assert summary["all"]["trainable"] == sum(p.numel() for p in partial.parameters() if p.requires_grad)
    assert trainable(apply_strategy(load_sam2(preset), "full")) == set(names)

    base = load_sam2(preset)
    targeted = [name for name, _ in base.named_modules() if re.fullmatch(TARGET_MODULES[preset], name)]
    assert len(targeted) == {SAM3: 12, EDGETAM: 22}[preset]
    lora = apply_strategy(base, "lora", r=2, targets=TARGETS[preset])
    assert trainable(lora) == {f"base_model.model.{name}.lora_{ab}.default.weight" for name in targeted for ab in "AB"}
    assert trainable_summary(lora)["adapters"]["trainable"] == trainable_summary(lora)["all"]["trainable"]
    dora = apply_strategy(load_sam2(preset), "dora", r=2, targets=TARGETS[preset], blocks="last:1")
    adapted = {re.sub(r"^base_model\.model\.|\.lora_\w+\.default(?:\.weight)?$", "", name) for name in trainable(dora)}
    assert adapted and all(name.startswith(LAST_TWO[preset][1]) for name in adapted)
    assert any("lora_magnitude_vector" in name for name in trainable(dora))


def test_a_cnn_trunk_has_no_attention_preset_and_an_unknown_class_is_named(tmp_path):
    with pytest.raises(ValueError, match="RepViT blocks have no attention layers.*trunk.mlp"):
        resolve_targets(load_sam2(EDGETAM), "trunk.qkv")
    with pytest.raises(ValueError, match="'vera' adapts nn.Linear layers only.*stages_0.blocks.0.channel_mixer"):
        apply_strategy(load_sam2(EDGETAM), "vera", targets="trunk.mlp")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam", "architectures": ["SamModel"]}))
    with pytest.raises(ModelLoadError, match="Sam2Model, Sam3TrackerModel, EdgeTamModel"):
        load_sam2(tmp_path)
    with pytest.raises(TypeError, match="Sam2Model, Sam3TrackerModel, EdgeTamModel"):
        Sam2Segmenter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("preset", PRESETS)
def test_segmenter_matches_the_models_own_forward(preset):
    model = load_sam2(preset)
    with torch.no_grad():  # zero at init; trained checkpoints have one, which SAM3's image forward never adds
        model.no_memory_embedding.normal_(generator=torch.Generator().manual_seed(5))
    size = SIZE[preset]
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[[10.0, 20, 100, 120], [50, 50, 200, 210]], [[5.0, 6, 70, 80], [100, 100, 220, 220]]])
    segmenter = Sam2Segmenter(model)
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, input_boxes=boxes)
        coords, labels = combine_prompts(boxes=boxes.reshape(-1, 4))
        ours = segmenter(pixel_values, image_index=torch.tensor([0, 0, 1, 1]), point_coords=coords,
                         point_labels=labels)
    side = reference.pred_masks.shape[-1]
    assert side == 4 * model.prompt_encoder.image_embedding_size[0]
    torch.testing.assert_close(ours.mask_logits, reference.pred_masks.reshape(4, 3, side, side), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.iou_scores, reference.iou_scores.reshape(4, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.object_score_logits, reference.object_score_logits.reshape(4, 1), rtol=0,
                               atol=1e-5)

    # Clicks with a mask prompt at S/4, the data pipeline's size (SAM3's decoder grid is 4 S/14: both resize it).
    points = torch.tensor([[[30.0, 40], [60, 60]], [[200.0, 10], [90, 150]]])
    point_labels = torch.tensor([[1, 0], [1, 1]])
    mask_inputs = torch.randn(2, 1, size // 4, size // 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, input_points=points[:, None], input_labels=point_labels[:, None],
                          input_masks=mask_inputs, multimask_output=False)
        ours = segmenter(pixel_values, image_index=torch.tensor([0, 1]), point_coords=points,
                         point_labels=point_labels, mask_inputs=mask_inputs, multimask_output=False)
    torch.testing.assert_close(ours.mask_logits, reference.pred_masks[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.iou_scores, reference.iou_scores[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.object_score_logits, reference.object_score_logits[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("strategy", ["partial", "lora"])
def test_a_training_step_changes_exactly_the_trainable_tensors(preset, strategy):
    """Batch norms (EdgeTAM) keep their statistics, so frozen buffers stay bit-identical too."""
    options = {"num_blocks": 2} if strategy == "partial" else {"targets": TARGETS[preset], "init_lora_weights": False}
    model = apply_strategy(load_sam2(preset), strategy, **options)
    segmenter = Sam2Segmenter(model).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = segmenter(**batch_for(preset))
    (out.mask_logits.square().mean() + out.iou_scores.sum() + out.object_score_logits.sum()).backward()
    optimizer.step()
    state = model.state_dict()
    changed = {key for key, value in before.items() if not torch.equal(value, state[key])}
    assert changed <= trainable(model)
    # Every trainable tensor the loss reaches moves (the mask prompt encoder, unused here, has no gradient).
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".backbone." in name for name in reached) and reached <= changed
    if preset == EDGETAM:
        assert any(key.endswith("running_mean") for key in before)


@pytest.mark.parametrize("preset", PRESETS)
def test_saved_adapter_loads_with_plain_peft_and_gives_the_same_outputs(preset, tmp_path):
    model = apply_strategy(load_sam2(preset), "lora", r=2, targets=TARGETS[preset], init_lora_weights=False)
    folder = save_adapter(model, tmp_path / "adapter", strategy="lora")
    model_class, build_config = PLAIN[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the preset's seed: the same base weights
        base = model_class(build_config())
    assert model_fingerprint(base) == json.loads((folder / "sam2_peft.json").read_text())["base_fingerprint"]
    plain = PeftModel.from_pretrained(base, folder).eval()
    batch = batch_for(preset)
    boxes = batch["point_coords"][:2, :2].reshape(1, 2, 4)
    with torch.no_grad():
        reference = plain(pixel_values=batch["pixel_values"][:1], input_boxes=boxes)
        ours = Sam2Segmenter(model).eval()(batch["pixel_values"][:1], image_index=torch.tensor([0, 0]),
                                           point_coords=batch["point_coords"][:2, :2],
                                           point_labels=batch["point_labels"][:2, :2])
        with plain.disable_adapter():
            without = plain(pixel_values=batch["pixel_values"][:1], input_boxes=boxes)
    side = ours.mask_logits.shape[-1]
    torch.testing.assert_close(ours.mask_logits, reference.pred_masks.reshape(2, 3, side, side), rtol=0, atol=1e-5)
    assert (without.pred_masks - reference.pred_masks).abs().max() > 1e-3  # the adapter does something
    card = (folder / "README.md").read_text()
    assert f"from transformers import {model_class.__name__}" in card  # the card's snippet loads the right class
    # Merged by `sam2-peft merge` (LoRA folded into the convolutions for EdgeTAM) and loaded back: the same model.
    merge_to_folder(model, tmp_path / "merged")
    merged = load_sam2(tmp_path / "merged")
    assert type(merged) is model_class
    with torch.no_grad():
        again = merged(pixel_values=batch["pixel_values"][:1], input_boxes=boxes)
    torch.testing.assert_close(again.pred_masks, reference.pred_masks, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_saved_folder_loads_as_its_own_class(preset, tmp_path):
    model = load_sam2(preset)
    model.save_pretrained(tmp_path / "model")
    loaded = load_sam2(tmp_path / "model")
    assert type(loaded) is type(model) and not loaded.training
    assert model_fingerprint(loaded) == model_fingerprint(model) == model_fingerprint(load_sam2(preset))


@pytest.mark.parametrize("preset", PRESETS)
def test_a_video_checkpoint_loads_as_the_image_model(preset, tmp_path):
    """Video checkpoints (EdgeTAM's and SAM3's trackers ship as such) hold the image model's weights."""
    video_class, config_class = {SAM3: (Sam3TrackerVideoModel, Sam3TrackerVideoConfig),
                                 EDGETAM: (EdgeTamVideoModel, EdgeTamVideoConfig)}[preset]
    image = PLAIN[preset][1]().to_dict()
    parts = {key: image[key] for key in ("vision_config", "prompt_encoder_config", "mask_decoder_config")}
    video = video_class(config_class(**parts))
    with torch.no_grad():  # zero at init: make it tell a loaded weight from a fresh one
        video.no_memory_embedding.normal_(generator=torch.Generator().manual_seed(6))
    video.save_pretrained(tmp_path / "video")  # SAM3's under `tracker_model.` keys, which the image class maps back
    loaded = load_sam2(tmp_path / "video")
    assert type(loaded) is PLAIN[preset][0]
    weights = video.state_dict()
    assert all(torch.equal(tensor, weights[key]) for key, tensor in loaded.state_dict().items())


@pytest.mark.parametrize("preset", PRESETS)
def test_feature_and_prefix_caches_give_the_uncached_outputs(preset):
    batch = {**batch_for(preset), "image_ids": ["a", "b"]}
    prompts = {key: batch[key] for key in ("image_index", "point_coords", "point_labels")}
    for strategy, options, kind in [("decoder", {}, "features"), ("partial", {"num_blocks": 2}, "prefix")]:
        model = apply_strategy(load_sam2(preset), strategy, **options)
        segmenter = Sam2Segmenter(model).eval()
        plan = plan_cache(model, changes_pixels=False, num_images=2)
        assert plan.kind == kind and "GB" in plan.message
        cache = plan.build(model_fingerprint(model), "test")
        assert isinstance(cache, FeatureCache if kind == "features" else PrefixCache)
        if kind == "prefix":  # the first of the last two blocks
            assert cache.start_block == first_trainable_block(model) == {SAM3: 2, EDGETAM: 6}[preset]
        with torch.no_grad():
            direct = segmenter(batch["pixel_values"], **prompts)
            for _ in range(2):  # a miss, then a hit
                cached = segmenter(image_features=cache.features(segmenter, batch), **prompts)
                torch.testing.assert_close(cached.mask_logits, direct.mask_logits, rtol=0, atol=1e-6)
        assert (cache.misses, cache.hits) == (2, 2)


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_checkpointing_keeps_the_gradients(preset):
    """Whole blocks (EdgeTAM's timm blocks, through `family.run_block`) and strips of windows (SAM3's ViT layers)."""
    batch = batch_for(preset)

    def gradients(checkpointed: bool) -> dict:
        model = apply_strategy(load_sam2(preset), "full")
        segmenter = Sam2Segmenter(model).train()
        if checkpointed:
            assert enable_gradient_checkpointing(model, strips=2) == {SAM3: 4, EDGETAM: 8}[preset] + 1
        with mock.patch.object(strips_module, "checkpoint", wraps=strips_module.checkpoint) as checkpoint:
            out = segmenter(**batch)
            out.mask_logits.square().mean().backward()
        # SAM3: two windowed layers in two strips, two global ones whole; EdgeTAM: eight blocks. Plus three objects.
        assert checkpoint.call_count == ({SAM3: 2 * 2 + 2, EDGETAM: 8}[preset] + 3 if checkpointed else 0)
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    reference, ours = gradients(False), gradients(True)
    assert ours.keys() == reference.keys() and any(".backbone." in name for name in ours)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6 + 1e-5 * grad.abs().max().item())


def test_cli_trains_the_sam3_tracker_with_lora(tmp_path):
    # The flags of tests/test_cli.py's TRAIN, on the SAM3 preset and two steps.
    main(["train", "--model", SAM3, "--data", SAMPLE_DATA, "--max_steps", "2", "--batch_size", "2", "--eval_steps",
          "2", "--max_objects_per_image", "3", "--learning_rate", "1e-3", "--strategy", "lora",
          "--output_dir", str(tmp_path / "run")])
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert all(re.fullmatch(TARGET_MODULES[SAM3], name) for name in config["target_modules"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
