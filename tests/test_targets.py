import pytest

from sam2_peft.targets import num_trunk_blocks, resolve_targets, select_blocks, split_targets

QKV = "vision_encoder.backbone.blocks.{}.attn.qkv"


def test_select_blocks():
    assert select_blocks(None, 8) == list(range(8))
    assert select_blocks("last:3", 8) == [5, 6, 7]
    assert select_blocks("first:2", 8) == [0, 1]
    assert select_blocks([7, -1, 0], 8) == [0, 7]
    for bad, message in [("last:0", "between 1 and 8"), ("middle:2", "not understood"), ([8], "out of range")]:
        with pytest.raises(ValueError, match=message):
            select_blocks(bad, 8)


def test_presets_resolve_to_exact_modules(tiny_model):
    assert num_trunk_blocks(tiny_model) == 8
    assert resolve_targets(tiny_model, "trunk.qkv") == sorted(QKV.format(i) for i in range(8))
    assert resolve_targets(tiny_model, "trunk.qkv", blocks="last:2") == [QKV.format(6), QKV.format(7)]
    attn = resolve_targets(tiny_model, "trunk.attn", blocks=[1])
    assert attn == ["vision_encoder.backbone.blocks.1.attn.proj", QKV.format(1)]
    # Block 1 starts stage 2: `trunk.all` takes its skip projection too, `trunk.attn` never does.
    assert "vision_encoder.backbone.blocks.1.proj" in resolve_targets(tiny_model, "trunk.all", blocks=[1])
    mlp = resolve_targets(tiny_model, "trunk.mlp", blocks=[0])
    assert mlp == ["vision_encoder.backbone.blocks.0.mlp.proj_in", "vision_encoder.backbone.blocks.0.mlp.proj_out"]
    decoder = resolve_targets(tiny_model, "decoder.attn")
    # 2 two-way layers x 3 attentions + the final attention, each with q, k, v, o.
    assert len(decoder) == 28 and all(name.startswith("mask_decoder.transformer.") for name in decoder)
    combined = resolve_targets(tiny_model, "trunk.qkv+decoder.attn", blocks="last:1")
    assert combined == sorted([QKV.format(7)] + decoder)


def test_regex_targets_and_errors(tiny_model):
    assert resolve_targets(tiny_model, [r".*blocks\.3\.attn\.qkv"]) == [QKV.format(3)]
    with pytest.raises(ValueError, match="matched no nn.Linear module"):
        resolve_targets(tiny_model, "trunk.qvk")
    with pytest.raises(ValueError, match="block-level `proj` of stage-change blocks"):
        resolve_targets(tiny_model, r".*\.proj")
    with pytest.raises(ValueError, match="targets is empty"):
        split_targets(" + ")
