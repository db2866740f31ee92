"""The strategies and target presets on SAM2's video model: the `memory` strategy, `memory.*` presets, refusals."""

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import Sam2Config, Sam2Model

from sam2_peft.family import VIDEO_ONLY_PREFIXES
from sam2_peft.models import load_sam2
from sam2_peft.strategies import apply_strategy, trainable_summary
from sam2_peft.targets import VideoModelRequiredError, resolve_targets, split_targets

QKV = "vision_encoder.backbone.blocks.{}.attn.qkv"


@pytest.fixture
def video_model():
    """A fresh tiny random Sam2VideoModel (PEFT injects into the model it wraps)."""
    return load_sam2("tiny-random", video=True)


def trainable(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def memory_names(video: nn.Module) -> set[str]:
    """The video model's parameters that the image model of the same parts lacks (the memory path)."""
    config = video.config
    image_config = Sam2Config(vision_config=config.vision_config.to_dict(),
                              prompt_encoder_config=config.prompt_encoder_config.to_dict(),
                              mask_decoder_config=config.mask_decoder_config.to_dict())
    with torch.device("meta"):
        image_names = set(Sam2Model(image_config).state_dict())
    return {name for name, _ in video.named_parameters() if name not in image_names}


def test_memory_trains_exactly_the_memory_path_and_the_decoder(video_model):
    names = {name for name, _ in video_model.named_parameters()}
    decoder = {name for name in names if name.startswith("mask_decoder.")}
    memory = memory_names(video_model)
    # The two definitions of the memory path agree: the prefixes, and what the image model does not have.
    assert memory == {name for name in names if name.startswith(VIDEO_ONLY_PREFIXES)}
    assert {"no_object_pointer", "occlusion_spatial_embedding_parameter", "mask_downsample.weight",
            "temporal_positional_encoding_projection_layer.weight"} <= memory
    assert trainable(apply_strategy(video_model, "memory")) == memory | decoder
    prompt = {name for name in names if name.startswith("prompt_encoder.")}
    assert trainable(apply_strategy(video_model, "memory", train_prompt_encoder=True)) == memory | decoder | prompt


def test_full_trains_memory_and_decoder_partial_do_not(video_model, tiny_model):
    assert trainable(apply_strategy(video_model, "full")) == {name for name, _ in video_model.named_parameters()}
    image = load_sam2("tiny-random-video")
    for strategy, options in (("decoder", {}), ("partial", {"num_blocks": 2, "train_neck": True})):
        # The same parameters as on the image model, so the saved tensors load onto either.
        expected = trainable(apply_strategy(image, strategy, **options))
        assert trainable(apply_strategy(video_model, strategy, **options)) == expected
        assert not any(name.startswith(VIDEO_ONLY_PREFIXES) for name in expected)


def test_memory_on_an_image_model_is_refused_and_changes_nothing(tiny_model):
    before = trainable(apply_strategy(tiny_model, "decoder"))
    with pytest.raises(VideoModelRequiredError, match=r"Sam2Model does not have.*video=True.*--task video"):
        apply_strategy(tiny_model, "memory")
    assert trainable(tiny_model) == before


def test_trainable_summary_rows_for_the_memory_path(video_model):
    summary = trainable_summary(apply_strategy(video_model, "memory"))

    def count(*modules):
        return sum(p.numel() for module in modules for p in module.parameters())

    pointer = count(video_model.object_pointer_proj, video_model.temporal_positional_encoding_projection_layer) + sum(
        getattr(video_model, name).numel() for name in ("no_memory_positional_encoding", "no_object_pointer",
                                                        "memory_temporal_positional_encoding",
                                                        "occlusion_spatial_embedding_parameter"))
    expected = {
        "memory_attention": count(video_model.memory_attention),
        "memory_encoder": count(video_model.memory_encoder, video_model.mask_downsample),
        "object_pointer": pointer,
    }
    for row, total in expected.items():
        assert summary[row] == {"trainable": total, "total": total}, row
    # What stays under "other" is what the image model has there too (the no-memory embedding).
    image_summary = trainable_summary(load_sam2("tiny-random-video"))
    assert summary["other"]["total"] == image_summary["other"]["total"]
    assert list(summary)[-6:] == ["mask_decoder", "memory_attention", "memory_encoder", "object_pointer", "other",
                                  "all"]
    assert summary["all"]["total"] == count(video_model)


def test_memory_presets_match_the_memory_modules(video_model):
    layers = range(len(video_model.memory_attention.layers))
    attn = sorted(f"memory_attention.layers.{i}.{part}.{proj}_proj" for i in layers
                  for part in ("self_attn", "cross_attn_image") for proj in "qkvo")
    assert resolve_targets(video_model, "memory.attn") == attn
    roots = ("memory_attention", "memory_encoder", "object_pointer_proj",
             "temporal_positional_encoding_projection_layer")
    linears = sorted(f"{root}.{name}".rstrip(".") for root in roots
                     for name, module in video_model.get_submodule(root).named_modules()
                     if isinstance(module, nn.Linear))
    assert resolve_targets(video_model, "memory.all") == linears
    assert len(linears) == len(attn) + 2 * len(layers) + 4 + 4  # + FFNs, fuser pointwise layers, pointer MLPs
    # Convolutions are left out (see targets.py): the mask downsampler's and the fuser's.
    assert not any("conv" in name and "pointwise" not in name for name in resolve_targets(video_model, "memory.all"))


def test_memory_presets_combine_and_ignore_blocks(video_model):
    combined = resolve_targets(video_model, "trunk.qkv+memory.attn", blocks="last:2")
    assert combined == sorted([QKV.format(6), QKV.format(7)] + resolve_targets(video_model, "memory.attn"))
    model = apply_strategy(video_model, "lora", targets="trunk.qkv+memory.attn", blocks="last:2", r=2)
    assert adapted(model) == set(combined)
    assert {row for row, counts in trainable_summary(model).items() if counts["trainable"]} == {"adapters", "all"}


def adapted(model) -> set[str]:
    """The modules PEFT injected an adapter into, named as in the base."""
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)}


def test_combined_targets_as_one_string_through_apply_strategy(tiny_model):
    # `--targets trunk.qkv+decoder.attn` arrives as one string: it splits into presets.
    model = apply_strategy(tiny_model, "lora", targets="trunk.qkv+decoder.attn", blocks="last:1", r=2)
    expected = resolve_targets(load_sam2("tiny-random"), "trunk.qkv+decoder.attn", blocks="last:1")
    assert adapted(model) == set(expected) and len(expected) == 1 + 28


@pytest.mark.parametrize("targets", ["memory.attn", "trunk.qkv+memory.all"])
def test_memory_presets_on_an_image_model_are_refused(tiny_model, targets):
    with pytest.raises(VideoModelRequiredError, match=r"targets='memory\.\w+'.*load_sam2\(name, video=True\)"):
        apply_strategy(tiny_model, "lora", targets=targets)
    assert not any("lora" in name for name, _ in tiny_model.named_modules())


def test_lora_on_the_memory_path_trains_only_its_adapters(video_model):
    torch.manual_seed(0)
    model = apply_strategy(video_model, "lora", targets="memory.all", r=2, init_lora_weights=False)
    config = video_model.config
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(256, 1, config.memory_attention_hidden_size, generator=generator)  # (HW, B, C), 16 x 16
    memory = torch.randn(512, 1, config.memory_encoder_output_channels, generator=generator)  # two frames' memories
    out = video_model.memory_attention(current_vision_features=features, memory=memory,
                                       current_vision_position_embeddings=torch.zeros_like(features),
                                       memory_posision_embeddings=torch.zeros_like(memory))
    out.square().mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name and ".memory_attention." in name for name in with_grad)


def test_a_plus_inside_a_regex_stays_in_the_regex(tiny_model):
    assert split_targets(r"trunk.qkv+.*blocks\.\d+\.mlp\.proj_in,memory.attn") == [
        "trunk.qkv", r".*blocks\.\d+\.mlp\.proj_in", "memory.attn"]
    model = apply_strategy(tiny_model, "lora", targets=r".*blocks\.[67]\.mlp\.proj_in+decoder.attn", r=2)
    mlp = {f"vision_encoder.backbone.blocks.{i}.mlp.proj_in" for i in (6, 7)}
    assert adapted(model) == mlp | set(resolve_targets(load_sam2("tiny-random"), "decoder.attn"))
