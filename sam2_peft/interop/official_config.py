"""Official sam2 configurations (`sam2.1_hiera_t`, ..., or a YAML file) as transformers `Sam2Config`s (the memory
path as `Sam2VideoConfig`s is in `official_video_config.py`).

    from sam2_peft.interop.official_config import official_to_hf_config
    config = official_to_hf_config("sam2.1_hiera_b+")           # or "path/to/sam2.1_hiera_b+.yaml"

`official_to_hf_config` maps the image path (Hiera trunk, FPN neck, prompt encoder, mask decoder) and ignores the
video modules' settings; `official_video_config.official_to_hf_video_config` maps those too. Settings that change the model in a way the
transformers class does not implement (e.g. `pred_obj_scores: false`, `soft_no_obj_ptr: true`) are refused rather
than silently dropped.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import yaml
from transformers import Sam2Config, Sam2VideoConfig

from sam2_peft.errors import UserError

OFFICIAL_CONFIGS = tuple(f"{v}_hiera_{s}" for v in ("sam2.1", "sam2") for s in ("t", "s", "b+", "l"))

# The trunk settings of the shipped YAMLs, written as they are there (keys left out take the `Hiera` defaults below).
# SAM2 and SAM2.1 share them: the versions differ only in video modules. A test checks this table against the YAMLs.
_TRUNKS = {
    "t": {"embed_dim": 96, "num_heads": 1, "stages": [1, 2, 7, 2], "global_att_blocks": [5, 7, 9],
          "window_pos_embed_bkg_spatial_size": [7, 7]},
    "s": {"embed_dim": 96, "num_heads": 1, "stages": [1, 2, 11, 2], "global_att_blocks": [7, 10, 13],
          "window_pos_embed_bkg_spatial_size": [7, 7]},
    "b+": {"embed_dim": 112, "num_heads": 2},
    "l": {"embed_dim": 144, "num_heads": 2, "stages": [2, 6, 36, 4], "global_att_blocks": [23, 33, 43],
          "window_pos_embed_bkg_spatial_size": [7, 7], "window_spec": [8, 4, 16, 8]},
}
# Constructor defaults of the official classes (sam2 1.1.0), which apply wherever a YAML leaves a key out.
_HIERA_DEFAULTS = {
    "embed_dim": 96, "num_heads": 1, "q_pool": 3, "q_stride": [2, 2], "stages": [2, 3, 16, 3], "dim_mul": 2.0,
    "head_mul": 2.0, "window_pos_embed_bkg_spatial_size": [14, 14], "window_spec": [8, 4, 14, 7],
    "global_att_blocks": [12, 16, 20],
}
_NECK_DEFAULTS = {"kernel_size": 1, "stride": 1, "padding": 0, "fpn_interp_model": "bilinear", "fuse_type": "sum",
                  "fpn_top_down_levels": None}
_BASE_DEFAULTS = {"image_size": 512, "backbone_stride": 16, "use_high_res_features_in_sam": False,
                  "pred_obj_scores": False, "pred_obj_scores_mlp": False, "iou_prediction_use_sigmoid": False,
                  "directly_add_no_mem_embed": False}
# What `Sam2Model` hard-codes: an official config must agree on each of these for the weights to mean the same.
_REQUIRED_BASE = {"backbone_stride": 16, "use_high_res_features_in_sam": True, "pred_obj_scores": True,
                  "pred_obj_scores_mlp": True, "iou_prediction_use_sigmoid": True, "directly_add_no_mem_embed": True}
_REQUIRED_NECK = {"fpn_interp_model": "nearest", "fuse_type": "sum"}
# Number of trunk blocks and width of the patch embedding per size, to recognise a checkpoint from its weights.
# The memory path of the shipped YAMLs, only the keys read below (every size of a version shares it; SAM2.1 adds the
# occlusion embedding and projected, signed temporal encodings of object pointers). A test checks it against them.
_ROPE = {"rope_theta": 10000.0, "num_heads": 1, "downsample_rate": 1, "dropout": 0.1}
_MEMORY = {
    "memory_attention": {"d_model": 256, "pos_enc_at_input": True, "num_layers": 4, "layer": {
        "activation": "relu", "dim_feedforward": 2048, "dropout": 0.1, "pos_enc_at_attn": False,
        "pos_enc_at_cross_attn_keys": True, "pos_enc_at_cross_attn_queries": False,
        "self_attention": _ROPE, "cross_attention": {**_ROPE, "rope_k_repeat": True, "kv_in_dim": 64}}},
    "memory_encoder": {"out_dim": 64, "position_encoding": {"num_pos_feats": 64},
                       "mask_downsampler": {"kernel_size": 3, "stride": 2, "padding": 1},
                       "fuser": {"num_layers": 2, "layer": {"dim": 256, "kernel_size": 7, "padding": 3}}},
    "num_maskmem": 7, "sigmoid_scale_for_mem_enc": 20.0, "sigmoid_bias_for_mem_enc": -10.0,
    "use_mask_input_as_output_without_sam": True, "multimask_output_in_sam": True, "use_obj_ptrs_in_encoder": True,
    "only_obj_ptrs_in_the_past_for_eval": True, "fixed_no_obj_ptr": True, "multimask_output_for_tracking": True,
    "use_multimask_token_for_obj_ptr": True, "multimask_min_pt_num": 0, "multimask_max_pt_num": 1,
    "use_mlp_for_obj_ptr_proj": True,
}
_MEMORY_VERSIONS = {
    "sam2.1": {"no_obj_embed_spatial": True, "add_tpos_enc_to_obj_ptrs": True, "proj_tpos_enc_in_obj_ptrs": True,
               "use_signed_tpos_enc_to_obj_ptrs": True},
    "sam2": {"add_tpos_enc_to_obj_ptrs": False},
}
# SAM2Base's constructor defaults for the memory path, and what `Sam2VideoModel` hard-codes of it.
_SIZE_SIGNATURES = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
_FILE_SIZES = {"tiny": "t", "t": "t", "small": "s", "s": "s", "base_plus": "b+", "base-plus": "b+", "baseplus": "b+",
               "b+": "b+", "large": "l", "l": "l"}


class OfficialConfigError(UserError, ValueError):
    """Raised when an official sam2 configuration cannot be read or has no `Sam2Model` counterpart."""


def official_model_section(sam2_config: str | os.PathLike) -> dict[str, Any]:
    """Return the `model:` section of an official configuration, by name or YAML path.

    Named configurations come from a built-in table, so importing a checkpoint does not need the `sam2` package.
    """
    name = str(sam2_config)
    if name in OFFICIAL_CONFIGS:
        size = name.rsplit("_", 1)[1]
        trunk = _TRUNKS[size]
        width = trunk["embed_dim"]
        neck = {"d_model": 256, "backbone_channel_list": [8 * width, 4 * width, 2 * width, width],
                "fpn_top_down_levels": [2, 3], "fpn_interp_model": "nearest"}
        version = name.split("_", 1)[0]
        return {"image_encoder": {"scalp": 1, "trunk": dict(trunk), "neck": neck}, "image_size": 1024,
                **_REQUIRED_BASE, **copy.deepcopy(_MEMORY), **_MEMORY_VERSIONS[version]}
    path = Path(name)
    if not path.is_file():
        raise OfficialConfigError(
            f"sam2_config={name!r} is neither an official config name ({', '.join(OFFICIAL_CONFIGS)}) nor an "
            "existing YAML file; pass one of those names or the path of an official sam2 YAML."
        )
    with path.open() as file:
        document = yaml.safe_load(file)
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise OfficialConfigError(f"{path}: no `model:` section; is this an official sam2 model YAML?")
    return document["model"]


def official_to_hf_config(sam2_config: str | os.PathLike) -> Sam2Config:
    """Build the `Sam2Config` whose image path equals an official sam2 configuration.

    Args:
        sam2_config: an official name (`sam2.1_hiera_t`, `sam2.1_hiera_s`, `sam2.1_hiera_b+`, `sam2.1_hiera_l`,
            or the `sam2_hiera_*` ones) or the path of an official YAML.

    Raises:
        OfficialConfigError: the name is unknown, the YAML is unreadable, or it sets something (named in the message)
            that `Sam2Model` does not implement.

    Example:
        >>> official_to_hf_config("sam2.1_hiera_t").vision_config.backbone_config.blocks_per_stage
        [1, 2, 7, 2]
    """
    return Sam2Config(**hf_config_fields(official_model_section(sam2_config), str(sam2_config)))


def hf_config_fields(model: dict[str, Any], source: str) -> dict[str, Any]:
    encoder = model.get("image_encoder") or {}
    trunk = {**_HIERA_DEFAULTS, **(encoder.get("trunk") or {})}
    neck = {**_NECK_DEFAULTS, **(encoder.get("neck") or {})}
    base = {**_BASE_DEFAULTS, **model}
    wrong = [f"model.{k}={base[k]!r} (Sam2Model needs {v!r})" for k, v in _REQUIRED_BASE.items() if base[k] != v]
    wrong += [f"model.image_encoder.neck.{k}={neck[k]!r} (Sam2Model needs {v!r})"
              for k, v in _REQUIRED_NECK.items() if neck[k] != v]
    if "d_model" not in neck or "backbone_channel_list" not in neck:
        wrong.append("model.image_encoder.neck needs `d_model` and `backbone_channel_list`")
    if wrong:
        raise OfficialConfigError(f"{source}: no Sam2Model counterpart for " + "; ".join(wrong))

    # Hiera widens and adds heads at every stage change, rounding down as the official constructor does.
    widths, heads = [trunk["embed_dim"]], [trunk["num_heads"]]
    for _ in trunk["stages"][1:]:
        widths.append(int(widths[-1] * trunk["dim_mul"]))
        heads.append(int(heads[-1] * trunk["head_mul"]))
    channels = list(neck["backbone_channel_list"])
    if channels != widths[::-1]:
        raise OfficialConfigError(
            f"{source}: neck backbone_channel_list={channels} does not match the trunk's stage widths {widths[::-1]}."
        )
    num_levels = len(channels) - encoder.get("scalp", 0)
    if num_levels != 3:
        raise OfficialConfigError(
            f"{source}: image_encoder.scalp={encoder.get('scalp', 0)} leaves {num_levels} feature levels; the SAM2 "
            "mask decoder takes exactly 3 (set scalp to len(backbone_channel_list) - 3)."
        )
    size = base["image_size"]
    top_down = neck["fpn_top_down_levels"]
    hidden = neck["d_model"]
    decoder_args = model.get("sam_mask_decoder_extra_args") or {}
    return {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "image_size": [size, size],
                "hidden_size": trunk["embed_dim"],
                "num_attention_heads": trunk["num_heads"],
                "embed_dim_per_stage": widths,
                "num_attention_heads_per_stage": heads,
                "blocks_per_stage": list(trunk["stages"]),
                "window_size_per_stage": list(trunk["window_spec"]),
                "global_attention_blocks": list(trunk["global_att_blocks"]),
                "window_positional_embedding_background_size": list(trunk["window_pos_embed_bkg_spatial_size"]),
                "num_query_pool_stages": trunk["q_pool"],
                "query_stride": list(trunk["q_stride"]),
            },
            "backbone_channel_list": channels,
            # Feature sizes of the three levels the decoder uses: strides 4, 8 and 16.
            "backbone_feature_sizes": [[size // s, size // s] for s in (4, 8, 16)],
            "fpn_hidden_size": hidden,
            "fpn_kernel_size": neck["kernel_size"],
            "fpn_stride": neck["stride"],
            "fpn_padding": neck["padding"],
            "fpn_top_down_levels": list(range(len(channels))) if top_down is None else list(top_down),
            "num_feature_levels": num_levels,
        },
        "prompt_encoder_config": {"hidden_size": hidden, "image_size": size, "patch_size": base["backbone_stride"]},
        # The official decoder's depth, MLP width, heads and IoU head are fixed in SAM2Base and equal the defaults.
        "mask_decoder_config": {
            "hidden_size": hidden,
            **{k: decoder_args[k] for k in ("dynamic_multimask_via_stability", "dynamic_multimask_stability_delta",
                                            "dynamic_multimask_stability_thresh") if k in decoder_args},
        },
    }


def is_video_config(config: Any) -> bool:
    """Whether `config` is a `Sam2VideoModel` configuration (which has the memory path)."""
    return getattr(config, "model_type", None) == Sam2VideoConfig.model_type


def guess_official_config(path: str | os.PathLike, state_dict: dict[str, Any]) -> str:
    """Guess the official config of a checkpoint: from its file name, else from its weights.

    File names as published (`sam2.1_hiera_tiny.pt`, `sam2_hiera_base_plus.pt`) and MedSAM2 ones (`MedSAM2_*.pt`,
    fine-tuned from SAM2.1 tiny) are recognised. Otherwise the size comes from the trunk's width and depth, and the
    version from the SAM2.1-only `obj_ptr_tpos_proj` module (irrelevant to the image model either way).
    """
    name = Path(path).name.lower()
    if "medsam2" in name:
        return "sam2.1_hiera_t"
    version = "sam2.1" if re.search(r"sam2[._]?1", name) else "sam2"
    match = re.search(r"hiera[_-]?(tiny|small|base[_-]?plus|baseplus|large|b\+|t|s|l)(?![a-z])", name)
    if "sam2" in name and match:
        return f"{version}_hiera_{_FILE_SIZES[match.group(1)]}"

    width = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    depth = len({k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")})
    size = _SIZE_SIGNATURES.get((width.shape[0] if width is not None else None, depth))
    if size is None:
        raise OfficialConfigError(
            f"{path}: cannot tell the official config from the file name or the weights (trunk width and depth); "
            f"pass sam2_config= one of {', '.join(OFFICIAL_CONFIGS)} or an official YAML path."
        )
    version = "sam2" if "maskmem_tpos_enc" in state_dict and "obj_ptr_tpos_proj.weight" not in state_dict else "sam2.1"
    return f"{version}_hiera_{size}"


def official_yaml_path(sam2_config: str | os.PathLike) -> Path:
    """Return the YAML file of an official config: the copy the installed `sam2` package ships, or the path given."""
    name = str(sam2_config)
    if name not in OFFICIAL_CONFIGS:
        return Path(name)
    spec = importlib.util.find_spec("sam2")
    if spec is None or not spec.submodule_search_locations:
        raise OfficialConfigError(
            f"Building the official model for {name!r} needs the `sam2` package: "
            "`SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2`."
        )
    folder = "sam2.1" if name.startswith("sam2.1") else "sam2"
    return Path(list(spec.submodule_search_locations)[0]) / "configs" / folder / f"{name}.yaml"
