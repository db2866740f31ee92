"""The map between official sam2 state-dict keys and `Sam2Model` / `Sam2VideoModel` state-dict keys, both ways.

One table of prefix rules serves both directions; the video model's memory modules add their own rules. Two tensors
are not renames: the official prompt encoder keeps its four point embeddings as separate `(1, C)` tensors
(transformers: one `(4, C)` table), and its one random-Fourier matrix `pe_layer.positional_encoding_gaussian_matrix`
is two buffers in transformers (`shared_image_embedding` for the image-wide encoding,
`prompt_encoder.shared_embedding` for prompts) that must hold the same values.
"""

from __future__ import annotations

import functools
import re

import torch

# Top-level official modules that only the video predictor uses (memory, object pointers, occlusion embeddings).
# `Sam2Model` has no counterpart (importing drops them, exporting has to supply them); `Sam2VideoModel` has all.
VIDEO_ONLY_MODULES = (
    "memory_attention",
    "memory_encoder",
    "mask_downsample",
    "obj_ptr_proj",
    "obj_ptr_tpos_proj",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
)

_PLACEHOLDERS = {
    "n": r"\d+",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    # The official MLP heads are 3-layer `MLP`s (`layers.0..2`); transformers splits them into proj_in/layers/proj_out.
    "head": r"iou_prediction_head|pred_obj_score_head|output_hypernetworks_mlps\.\d+",
    "mattn": r"self_attn|cross_attn_image",
}
# (official prefix, transformers prefix); the first rule that matches wins, so the catch-alls come last.
_RULES = [
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.blocks.{n}.norm1.", "vision_encoder.backbone.blocks.{n}.layer_norm1."),
    ("image_encoder.trunk.blocks.{n}.norm2.", "vision_encoder.backbone.blocks.{n}.layer_norm2."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.0.", "vision_encoder.backbone.blocks.{n}.mlp.proj_in."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.1.", "vision_encoder.backbone.blocks.{n}.mlp.proj_out."),
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.convs.{n}.conv.", "vision_encoder.neck.convs.{n}."),
    ("no_mem_embed", "no_memory_embedding"),
    # Official mask_downscaling is Sequential(conv, norm, GELU, conv, norm, GELU, conv).
    ("sam_prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("sam_prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("sam_prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("sam_prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("sam_prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("sam_prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("sam_prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("sam_mask_decoder.transformer.layers.{n}.norm1.", "mask_decoder.transformer.layers.{n}.layer_norm1."),
    ("sam_mask_decoder.transformer.layers.{n}.norm2.", "mask_decoder.transformer.layers.{n}.layer_norm2."),
    ("sam_mask_decoder.transformer.layers.{n}.norm3.", "mask_decoder.transformer.layers.{n}.layer_norm3."),
    ("sam_mask_decoder.transformer.layers.{n}.norm4.", "mask_decoder.transformer.layers.{n}.layer_norm4."),
    ("sam_mask_decoder.transformer.layers.{n}.mlp.layers.0.", "mask_decoder.transformer.layers.{n}.mlp.proj_in."),
    ("sam_mask_decoder.transformer.layers.{n}.mlp.layers.1.", "mask_decoder.transformer.layers.{n}.mlp.proj_out."),
    ("sam_mask_decoder.transformer.layers.{n}.{attn}.out_proj.", "mask_decoder.transformer.layers.{n}.{attn}.o_proj."),
    ("sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.",
     "mask_decoder.transformer.final_attn_token_to_image.o_proj."),
    ("sam_mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    # Official output_upscaling is Sequential(conv-transpose, norm, GELU, conv-transpose, GELU).
    ("sam_mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("sam_mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("sam_mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("sam_mask_decoder.{head}.layers.0.", "mask_decoder.{head}.proj_in."),
    ("sam_mask_decoder.{head}.layers.1.", "mask_decoder.{head}.layers.0."),
    ("sam_mask_decoder.{head}.layers.2.", "mask_decoder.{head}.proj_out."),
    ("sam_mask_decoder.", "mask_decoder."),
]
# The memory path, which only `Sam2VideoModel` has (the mask downsampler's Sequential: `_downsampler_rules`).
_VIDEO_RULES = [
    ("memory_attention.layers.{n}.{mattn}.out_proj.", "memory_attention.layers.{n}.{mattn}.o_proj."),
    ("memory_attention.layers.{n}.norm1.", "memory_attention.layers.{n}.layer_norm1."),
    ("memory_attention.layers.{n}.norm2.", "memory_attention.layers.{n}.layer_norm2."),
    ("memory_attention.layers.{n}.norm3.", "memory_attention.layers.{n}.layer_norm3."),
    ("memory_attention.norm.", "memory_attention.layer_norm."),
    ("memory_attention.", "memory_attention."),
    ("memory_encoder.pix_feat_proj.", "memory_encoder.feature_projection."),
    ("memory_encoder.fuser.layers.{n}.gamma", "memory_encoder.memory_fuser.layers.{n}.scale"),
    ("memory_encoder.fuser.layers.{n}.dwconv.", "memory_encoder.memory_fuser.layers.{n}.depthwise_conv."),
    ("memory_encoder.fuser.layers.{n}.norm.", "memory_encoder.memory_fuser.layers.{n}.layer_norm."),
    ("memory_encoder.fuser.layers.{n}.pwconv1.", "memory_encoder.memory_fuser.layers.{n}.pointwise_conv1."),
    ("memory_encoder.fuser.layers.{n}.pwconv2.", "memory_encoder.memory_fuser.layers.{n}.pointwise_conv2."),
    ("memory_encoder.out_proj.", "memory_encoder.projection."),
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    ("mask_downsample.", "mask_downsample."),
    # Official obj_ptr_proj is a 3-layer MLP, as the decoder heads above.
    ("obj_ptr_proj.layers.0.", "object_pointer_proj.proj_in."),
    ("obj_ptr_proj.layers.1.", "object_pointer_proj.layers.0."),
    ("obj_ptr_proj.layers.2.", "object_pointer_proj.proj_out."),
    ("obj_ptr_tpos_proj.", "temporal_positional_encoding_projection_layer."),
]
# Every official config downsamples masks 16x in four stride-2 steps.
DOWNSAMPLER_LAYERS = 4
OFFICIAL_DOWNSAMPLER = re.compile(r"memory_encoder\.mask_downsampler\.encoder\.(\d+)\.")
HF_DOWNSAMPLER = re.compile(r"memory_encoder\.mask_downsampler\.layers\.(\d+)\.")
POINT_EMBEDDING = re.compile(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight")
OFFICIAL_FOURIER = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
HF_FOURIER = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
HF_POINT_TABLE = "prompt_encoder.point_embed.weight"


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, alternatives in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alternatives})")
    # A prefix ends at a module boundary: "no_mem_embed" must not also match "no_mem_embed_x".
    return re.compile(pattern if template.endswith(".") else pattern + "$")


def _downsampler_rules(num_layers: int) -> list[tuple[str, str]]:
    # Official MaskDownSampler.encoder is Sequential((conv, norm, GELU) x num_layers, conv).
    prefix, hf = "memory_encoder.mask_downsampler.encoder.", "memory_encoder.mask_downsampler."
    rules = [(f"{prefix}{3 * i}.", f"{hf}layers.{i}.conv.") for i in range(num_layers)]
    rules += [(f"{prefix}{3 * i + 1}.", f"{hf}layers.{i}.layer_norm.") for i in range(num_layers)]
    return rules + [(f"{prefix}{3 * num_layers}.", f"{hf}final_conv.")]


@functools.cache
def _rules(downsampler_layers: int) -> tuple[list[tuple[re.Pattern, str]], list[tuple[re.Pattern, str]]]:
    """The compiled rules, official -> transformers and back, for a mask downsampler of this depth."""
    rules = _RULES + _VIDEO_RULES + _downsampler_rules(downsampler_layers)
    return [(_compile(official), hf) for official, hf in rules], [(_compile(hf), official) for official, hf in rules]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end():]
    return None


def is_video_only(official_key: str) -> bool:
    """Whether an official key belongs to a module that only the video predictor uses."""
    return official_key.split(".", 1)[0] in VIDEO_ONLY_MODULES


def official_key_to_hf(key: str, downsampler_layers: int = DOWNSAMPLER_LAYERS) -> str | None:
    """Rename one official key (not a point embedding or the Fourier matrix); None when no rule applies.

    `downsampler_layers` is the memory encoder's number of mask-downsampling steps, which numbers its last conv.
    """
    return _rename(key, _rules(downsampler_layers)[0])


def hf_key_to_official(key: str, downsampler_layers: int = DOWNSAMPLER_LAYERS) -> str | None:
    """Rename one `Sam2Model` / `Sam2VideoModel` key (not the point table or the Fourier buffers); None when no rule
    applies."""
    return _rename(key, _rules(downsampler_layers)[1])


def _downsampler_depth(keys, pattern: re.Pattern, last_is_extra: bool) -> int:
    """The number of mask-downsampling steps that a state dict's keys hold (`DOWNSAMPLER_LAYERS` if none)."""
    indices = [int(match.group(1)) for key in keys if (match := pattern.match(key))]
    if not indices:
        return DOWNSAMPLER_LAYERS
    # Official: the final conv sits at index 3 * steps; transformers: layers 0 .. steps - 1.
    return max(indices) // 3 if last_is_extra else max(indices) + 1


def official_to_hf(
    state: dict[str, torch.Tensor], *, video: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Map an official state dict onto `Sam2Model` keys, or with `video=True` onto `Sam2VideoModel` keys.

    Returns:
        `(tensors, sources, unmapped)`: tensors under transformers keys; for each of them the official key it came
        from (for error messages); official keys that no rule maps (without `video`, the video-only modules are
        dropped, not listed).
    """
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unmapped: list[str] = []
    points: dict[int, torch.Tensor] = {}
    depth = _downsampler_depth(state, OFFICIAL_DOWNSAMPLER, last_is_extra=True)
    for key, value in state.items():
        point = POINT_EMBEDDING.fullmatch(key)
        if is_video_only(key) and not video:
            continue
        if point:
            points[int(point.group(1))] = value
        elif key == OFFICIAL_FOURIER:
            # Two buffers that must not share storage: safetensors refuses to save aliased tensors.
            for hf_key in HF_FOURIER:
                tensors[hf_key], sources[hf_key] = value.clone(), key
        elif (hf_key := official_key_to_hf(key, depth)) is not None:
            tensors[hf_key], sources[hf_key] = value, key
        else:
            unmapped.append(key)
    if points:
        if sorted(points) != list(range(len(points))):
            unmapped.extend(f"sam_prompt_encoder.point_embeddings.{i}.weight" for i in sorted(points))
        else:
            # (1, C) per label -> (num_labels, C), row i = label i.
            tensors[HF_POINT_TABLE] = torch.cat([points[i] for i in range(len(points))], dim=0)
            sources[HF_POINT_TABLE] = "sam_prompt_encoder.point_embeddings.*.weight"
    return tensors, sources, unmapped


def hf_to_official(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a `Sam2Model` state dict (image path only) or a `Sam2VideoModel` one (and its memory path) onto official
    keys.

    Returns:
        `(tensors, unmapped)`: tensors under official keys, and the transformers keys no rule maps.

    Raises:
        ValueError: the two Fourier-feature buffers differ, which the official model cannot represent.
    """
    tensors: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    depth = _downsampler_depth(state, HF_DOWNSAMPLER, last_is_extra=False)
    for key, value in state.items():
        if key == HF_POINT_TABLE:
            for i, row in enumerate(value):
                tensors[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = row[None].clone()
        elif key in HF_FOURIER:
            continue
        elif (official := hf_key_to_official(key, depth)) is not None:
            tensors[official] = value
        else:
            unmapped.append(key)
    fourier = [state[key] for key in HF_FOURIER if key in state]
    if fourier:
        if len(fourier) != len(HF_FOURIER) or not torch.equal(*fourier):
            raise ValueError(
                f"`{HF_FOURIER[0]}` and `{HF_FOURIER[1]}` must both exist and be equal to export: the official model "
                f"has one matrix for both ({OFFICIAL_FOURIER}). They differ only in models built from scratch in "
                "transformers; such a model has no official counterpart."
            )
        tensors[OFFICIAL_FOURIER] = fourier[0]
    return tensors, unmapped


def key_problems(
    tensors: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    sources: dict[str, str] | None = None,
) -> list[str]:
    """Compare mapped tensors with a reference state dict: missing and unexpected keys and shape mismatches.

    Args:
        tensors: the mapped state dict.
        reference: the state dict of the model that will receive it.
        sources: optional `key -> key in the file it came from`, quoted in the messages.

    Returns:
        One line per problem, empty when the keys and shapes agree exactly.
    """
    sources = sources or {}

    def named(key: str) -> str:
        return f"{key} (from {sources[key]})" if key in sources else key

    problems = [f"missing: {key}" for key in reference if key not in tensors]
    problems += [f"unexpected: {named(key)}" for key in tensors if key not in reference]
    problems += [
        f"shape: {named(key)} is {tuple(tensors[key].shape)}, the model needs {tuple(reference[key].shape)}"
        for key in tensors
        if key in reference and tensors[key].shape != reference[key].shape
    ]
    return problems
