"""The video half of an official config: the memory path's settings as a `Sam2VideoConfig`, and the check that a
config matches an official one.

    from sam2_peft.interop.official_video_config import official_to_hf_video_config
    video = official_to_hf_video_config("sam2.1_hiera_b+")      # the image path plus the memory modules

Settings `Sam2VideoModel` does not implement (memories other than 64 channels wide, `soft_no_obj_ptr`, ...) are
refused by name instead of being dropped.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Sam2Config, Sam2VideoConfig

from sam2_peft.interop.official_config import (
    OFFICIAL_CONFIGS,
    OfficialConfigError,
    hf_config_fields,
    is_video_config,
    official_model_section,
)

_VIDEO_DEFAULTS = {
    "num_maskmem": 7, "sigmoid_scale_for_mem_enc": 1.0, "sigmoid_bias_for_mem_enc": 0.0,
    "use_mask_input_as_output_without_sam": False, "max_cond_frames_in_attn": -1, "multimask_output_in_sam": False,
    "multimask_min_pt_num": 1, "multimask_max_pt_num": 1, "multimask_output_for_tracking": False,
    "use_multimask_token_for_obj_ptr": False, "memory_temporal_stride_for_eval": 1,
    "non_overlap_masks_for_mem_enc": False, "use_obj_ptrs_in_encoder": False, "max_obj_ptrs_in_encoder": 16,
    "add_tpos_enc_to_obj_ptrs": True, "proj_tpos_enc_in_obj_ptrs": False, "use_signed_tpos_enc_to_obj_ptrs": False,
    "only_obj_ptrs_in_the_past_for_eval": False, "fixed_no_obj_ptr": False, "soft_no_obj_ptr": False,
    "use_mlp_for_obj_ptr_proj": False, "no_obj_embed_spatial": False,
}
_REQUIRED_VIDEO = {
    "use_mask_input_as_output_without_sam": True, "memory_temporal_stride_for_eval": 1,
    "non_overlap_masks_for_mem_enc": False, "use_obj_ptrs_in_encoder": True, "only_obj_ptrs_in_the_past_for_eval": True,
    "fixed_no_obj_ptr": True, "soft_no_obj_ptr": False, "use_mlp_for_obj_ptr_proj": True,
    "use_multimask_token_for_obj_ptr": True,
}
# Memory attention as `Sam2VideoMemoryAttention` runs it (under `memory_attention.`); its cross-attention takes
# 64-channel memories whatever the config says, so the memory encoder must write 64.
_REQUIRED_ATTENTION = {
    "pos_enc_at_input": True, "layer.pos_enc_at_attn": False, "layer.pos_enc_at_cross_attn_keys": True,
    "layer.pos_enc_at_cross_attn_queries": False, "layer.self_attention.rope_k_repeat": False,
    "layer.cross_attention.rope_k_repeat": True, "layer.cross_attention.kv_in_dim": 64,
}
_MEMORY_MODULE_DEFAULTS = {
    "layer.self_attention.rope_theta": 10000.0, "layer.self_attention.downsample_rate": 1,
    "layer.self_attention.dropout": 0.0, "layer.self_attention.rope_k_repeat": False,
    "layer.cross_attention.rope_k_repeat": False, "layer.cross_attention.kv_in_dim": None,
}
_ENCODER_DEFAULTS = {
    "in_dim": 256, "mask_downsampler.embed_dim": 256, "mask_downsampler.kernel_size": 4, "mask_downsampler.stride": 4,
    "mask_downsampler.padding": 0, "mask_downsampler.total_stride": 16, "fuser.layer.kernel_size": 7,
    "fuser.layer.padding": 3, "fuser.layer.layer_scale_init_value": 1e-6, "fuser.layer.use_dwconv": True,
    "fuser.input_projection": False,
}


def official_to_hf_video_config(sam2_config: str | os.PathLike) -> Sam2VideoConfig:
    """Build the `Sam2VideoConfig` whose image and memory paths equal an official sam2 configuration.

    The image path is `official_to_hf_config`'s; the memory attention, memory encoder, object pointers and the
    tracking settings (`num_maskmem`, `sigmoid_scale_for_mem_enc`, ...) map onto their transformers fields. The
    official video predictor's own switches (`binarize_mask_from_pts_for_mem_enc`, the stability-based multimask
    choice) are what `Sam2VideoModel` always does at inference.

    Raises:
        OfficialConfigError: as `official_to_hf_config`, or the YAML has no memory modules, or sets something (named
            in the message) that `Sam2VideoModel` does not implement.

    Example:
        >>> official_to_hf_video_config("sam2.1_hiera_t").num_maskmem
        7
    """
    return Sam2VideoConfig(**_hf_video_fields(official_model_section(sam2_config), str(sam2_config)))


def _at(section: dict[str, Any], path: str, defaults: dict[str, Any]) -> Any:
    """`section`'s value at a dotted `path`, else `defaults[path]` (None if neither)."""
    value: Any = section
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return defaults.get(path) if value is None else value


_NEEDED_ATTENTION = ("d_model", "num_layers", "layer.activation", "layer.dim_feedforward", "layer.dropout",
                     "layer.self_attention.num_heads", "layer.cross_attention.num_heads")
_NEEDED_ENCODER = ("out_dim", "position_encoding.num_pos_feats", "fuser.num_layers", "fuser.layer.dim")


def _video_problems(model: dict[str, Any], source: str) -> list[str]:
    """What an official config sets that `Sam2VideoModel` does not implement (raises when it has no memory path)."""
    attention, encoder = model.get("memory_attention") or {}, model.get("memory_encoder") or {}
    missing = [f"memory_attention.{p}" for p in _NEEDED_ATTENTION if _at(attention, p, {}) is None]
    missing += [f"memory_encoder.{p}" for p in _NEEDED_ENCODER if _at(encoder, p, {}) is None]
    if missing:
        raise OfficialConfigError(
            f"{source}: no video model in this config: it lacks model.{', model.'.join(missing)}. Use an official "
            "video config (sam2.1_hiera_t, ... or their YAMLs), or drop video=True to load the image model."
        )
    base = {**_VIDEO_DEFAULTS, **model}
    wrong = [f"model.{k}={base[k]!r} (Sam2VideoModel needs {v!r})" for k, v in _REQUIRED_VIDEO.items() if base[k] != v]
    wrong += [f"model.memory_attention.{k}={_at(attention, k, _MEMORY_MODULE_DEFAULTS)!r} (Sam2VideoModel needs {v!r})"
              for k, v in _REQUIRED_ATTENTION.items() if _at(attention, k, _MEMORY_MODULE_DEFAULTS) != v]
    for key in ("num_heads", "downsample_rate", "rope_theta"):
        own, cross = (_at(attention, f"layer.{a}.{key}", _MEMORY_MODULE_DEFAULTS)
                      for a in ("self_attention", "cross_attention"))
        if own != cross:
            wrong.append(f"memory_attention self_attention.{key}={own!r} != cross_attention.{key}={cross!r} "
                         "(Sam2VideoModel has one setting for both)")
    needs = {"out_dim": 64, "position_encoding.num_pos_feats": 64, "fuser.layer.use_dwconv": True,
             "fuser.input_projection": False}
    wrong += [f"model.memory_encoder.{k}={_at(encoder, k, _ENCODER_DEFAULTS)!r} (Sam2VideoModel needs {v!r})"
              for k, v in needs.items() if _at(encoder, k, _ENCODER_DEFAULTS) != v]
    tpos = tuple(base[k] for k in ("add_tpos_enc_to_obj_ptrs", "proj_tpos_enc_in_obj_ptrs",
                                   "use_signed_tpos_enc_to_obj_ptrs"))
    if tpos[0] and tpos != (True, True, True):
        wrong.append(f"model.add_tpos_enc_to_obj_ptrs/proj_tpos_enc_in_obj_ptrs/use_signed_tpos_enc_to_obj_ptrs="
                     f"{tpos} (Sam2VideoModel needs all three true, as SAM2.1, or the first false, as SAM2)")
    return wrong


def _hf_video_fields(model: dict[str, Any], source: str) -> dict[str, Any]:
    fields = hf_config_fields(model, source)
    wrong = _video_problems(model, source)
    if wrong:
        raise OfficialConfigError(f"{source}: no Sam2VideoModel counterpart for " + "; ".join(wrong))
    base = {**_VIDEO_DEFAULTS, **model}
    attention, encoder = model["memory_attention"], model["memory_encoder"]

    def memory(path: str) -> Any:
        return _at(attention, path, _MEMORY_MODULE_DEFAULTS)

    def encoding(path: str) -> Any:
        return _at(encoder, path, _ENCODER_DEFAULTS)

    size, stride = fields["prompt_encoder_config"]["image_size"], fields["prompt_encoder_config"]["patch_size"]
    return {
        **fields,
        "image_size": size,
        **{key: base[key] for key in ("num_maskmem", "sigmoid_scale_for_mem_enc", "sigmoid_bias_for_mem_enc",
                                      "multimask_output_in_sam", "multimask_min_pt_num", "multimask_max_pt_num",
                                      "multimask_output_for_tracking")},
        "max_object_pointers_in_encoder": base["max_obj_ptrs_in_encoder"],
        "max_cond_frame_num": base["max_cond_frames_in_attn"],
        "enable_temporal_pos_encoding_for_object_pointers": base["add_tpos_enc_to_obj_ptrs"],
        "enable_occlusion_spatial_embedding": base["no_obj_embed_spatial"],
        "memory_attention_hidden_size": memory("d_model"),
        "memory_attention_num_layers": memory("num_layers"),
        "memory_attention_num_attention_heads": memory("layer.self_attention.num_heads"),
        "memory_attention_downsample_rate": memory("layer.self_attention.downsample_rate"),
        "memory_attention_feed_forward_hidden_size": memory("layer.dim_feedforward"),
        "memory_attention_feed_forward_hidden_act": memory("layer.activation"),
        "memory_attention_dropout": memory("layer.dropout"),
        "memory_attention_rope_dropout": memory("layer.self_attention.dropout"),
        # The official RoPE re-derives its grid from the input (`feat_sizes` is only a first guess); transformers
        # builds it once from this field: the S/16 map.
        "memory_attention_rope_feat_sizes": [size // stride, size // stride],
        "rope_parameters": {"rope_type": "axial", "rope_theta": memory("layer.self_attention.rope_theta")},
        "memory_encoder_hidden_size": encoding("in_dim"),
        "memory_encoder_output_channels": encoding("out_dim"),
        **{f"mask_downsampler_{key}": encoding(f"mask_downsampler.{key}")
           for key in ("embed_dim", "kernel_size", "stride", "padding", "total_stride")},
        "memory_fuser_num_layers": encoding("fuser.num_layers"),
        "memory_fuser_embed_dim": encoding("fuser.layer.dim"),
        "memory_fuser_intermediate_dim": 4 * encoding("fuser.layer.dim"),  # the official CXBlock's fixed ratio
        "memory_fuser_kernel_size": encoding("fuser.layer.kernel_size"),
        "memory_fuser_padding": encoding("fuser.layer.padding"),
        # PyYAML reads `1e-6` (no dot) as a string; Hydra, which the official package uses, as a float.
        "memory_fuser_layer_scale_init_value": float(encoding("fuser.layer.layer_scale_init_value")),
    }


def config_mismatches(sam2_config: str | os.PathLike, config: Sam2Config | Sam2VideoConfig) -> list[str]:
    """List the fields (as `section.field: expected != actual`) where `config` differs from an official config
    (for a `Sam2VideoConfig`, its memory path included)."""
    model, source = official_model_section(sam2_config), str(sam2_config)
    expected = _hf_video_fields(model, source) if is_video_config(config) else hf_config_fields(model, source)
    mismatches: list[str] = []

    def walk(fields: dict[str, Any], actual: Any, where: str) -> None:
        for key, value in fields.items():
            if key == "model_type":
                continue
            got = actual.get(key) if isinstance(actual, dict) else getattr(actual, key, None)
            if isinstance(value, dict):
                walk(value, got, f"{where}{key}.")
            elif _plain(got) != _plain(value):
                mismatches.append(f"{where}{key}: {value!r} != {got!r}")

    walk(expected, config, "")
    return mismatches


def _plain(value: Any) -> Any:
    # Configs written to JSON and read back hold lists where they were given tuples.
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def official_name_for(config: Sam2Config | Sam2VideoConfig) -> str:
    """Return the official config name that `config` equals: for a `Sam2Config`, the SAM2.1 name of the size whose
    image path it has (SAM2 and SAM2.1 share it); for a `Sam2VideoConfig`, the SAM2.1 or SAM2 name of its memory path.

    Raises:
        OfficialConfigError: no official config matches; pass `sam2_config` explicitly.
    """
    names = OFFICIAL_CONFIGS if is_video_config(config) else OFFICIAL_CONFIGS[:4]
    for name in names:
        if not config_mismatches(name, config):
            return name
    raise OfficialConfigError(
        f"This model's configuration matches none of the official ones ({', '.join(names)}); pass "
        "`sam2_config` (a name or an official YAML path) explicitly."
    )
