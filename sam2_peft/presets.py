"""The tiny random presets: small SAM2-family models built in code, for tests and offline dry runs.

    load_sam2("tiny-random")                    # Sam2Model, 256 px, ~1.5M parameters
    load_sam2("tiny-random-sam3-tracker")       # Sam3TrackerModel, 224 px
    load_sam2("tiny-random-edgetam")            # EdgeTamModel, 256 px (needs timm)
    load_sam2("tiny-random", video=True)        # Sam2VideoModel, 256 px; its image part is "tiny-random-video"

Every preset is deterministic (seeded), so two processes build the same weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    EdgeTamConfig,
    EdgeTamModel,
    Sam2Config,
    Sam2Model,
    Sam2VideoConfig,
    Sam2VideoModel,
    Sam3TrackerConfig,
    Sam3TrackerModel,
)

from sam2_peft.family import VIDEO_ONLY_PREFIXES

TINY_RANDOM = "tiny-random"
TINY_RANDOM_SAM3_TRACKER = "tiny-random-sam3-tracker"
TINY_RANDOM_EDGETAM = "tiny-random-edgetam"
TINY_RANDOM_VIDEO = "tiny-random-video"
VIDEO_HIDDEN = 128  # the video preset's neck and decoder width (see `tiny_random_video_config`)
VIDEO_OBJECT_BIAS = 0.5  # the video preset's object-score bias (see `_tiny_preset`)
TINY_RANDOM_SEED = 0


def tiny_random_config(hidden: int = 64) -> Sam2Config:
    """Build the ~1.5M-parameter, 256-px SAM2 configuration used by tests and offline dry runs.

    It keeps every structural feature of the real models: four Hiera stages with stage-change blocks (which have a
    block-level `proj`), windowed and global attention, a three-level FPN neck and the two-way mask decoder.

    Args:
        hidden: the neck's and decoder's width (64; the video preset's is 128).
    """
    # 5x the real models' init std: with 0.02 this small network's mask logits are ~1e-4, too flat for tests to tell
    # a trained adapter from noise; with 0.1 they spread over about +-1.
    init_std = 0.1
    return Sam2Config(
        initializer_range=init_std,
        vision_config=dict(
            backbone_config=dict(
                model_type="sam2_hiera_det_model",
                image_size=[256, 256],
                hidden_size=24,
                embed_dim_per_stage=[24, 48, 96, 192],
                num_attention_heads_per_stage=[1, 2, 4, 8],
                blocks_per_stage=[1, 2, 3, 2],
                window_size_per_stage=[8, 4, 8, 4],
                global_attention_blocks=[4, 7],
                initializer_range=init_std,
            ),
            backbone_channel_list=[192, 96, 48, 24],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
            fpn_hidden_size=hidden,
            initializer_range=init_std,
        ),
        prompt_encoder_config=dict(hidden_size=hidden, image_size=256, patch_size=16),
        mask_decoder_config=_tiny_decoder(hidden),
    )


def tiny_random_video_config() -> Sam2VideoConfig:
    """Build the tiny random `Sam2VideoModel` configuration (`tiny-random-video`): `tiny_random_config` with a
    128-wide neck and decoder, plus small memory modules (2 memory-attention layers, 64-channel memories), so clips of
    a few 256-px frames train in seconds on a CPU.

    The decoder is wider than `tiny-random`'s because transformers' memory attention reads 64-channel memories
    whatever the config says, and its tracking needs the decoder wider than the memories (it splits each object
    pointer into memory-wide tokens; at equal widths a box-prompted frame fails there), as in every real SAM2.
    """
    image = tiny_random_config(hidden=VIDEO_HIDDEN).to_dict()
    return Sam2VideoConfig(
        vision_config=image["vision_config"],
        prompt_encoder_config=image["prompt_encoder_config"],
        mask_decoder_config=image["mask_decoder_config"],
        initializer_range=image["initializer_range"],
        image_size=256,
        memory_attention_hidden_size=VIDEO_HIDDEN,
        memory_attention_num_layers=2,
        memory_attention_feed_forward_hidden_size=128,
        memory_attention_rope_feat_sizes=[16, 16],  # the S/16 map of a 256-px frame
        memory_encoder_hidden_size=VIDEO_HIDDEN,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=VIDEO_HIDDEN,
        memory_fuser_embed_dim=VIDEO_HIDDEN,
        memory_fuser_intermediate_dim=2 * VIDEO_HIDDEN,
    )


def _tiny_decoder(hidden: int) -> dict:
    return dict(hidden_size=hidden, mlp_dim=256, num_attention_heads=4, iou_head_hidden_dim=64)


def tiny_random_sam3_tracker_config() -> Sam3TrackerConfig:
    """Build the ~0.4M-parameter, 224-px `Sam3TrackerModel` configuration of `tiny-random-sam3-tracker`.

    As SAM3: patch-14 ViT layers (16 x 16 patches) with windowed and global RoPE attention, position embeddings tiled
    from a smaller pretraining grid, the four-scale neck (x4, x2, x1, x0.5; the decoder reads three) and the SAM2
    prompt encoder and mask decoder at the 4x grid (64 px masks).
    """
    size, patch, hidden, init_std = 224, 14, 64, 0.1  # init std: see `tiny_random_config`
    grid = size // patch
    return Sam3TrackerConfig(
        initializer_range=init_std,
        vision_config=dict(
            model_type="sam3_vision_model",
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=4,
                num_attention_heads=2,
                image_size=size,
                patch_size=patch,
                window_size=8,
                global_attn_indexes=[1, 3],
                pretrain_image_size=size // 2,
                initializer_range=init_std,
            ),
            fpn_hidden_size=hidden,
            backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2],
            initializer_range=init_std,
        ),
        prompt_encoder_config=dict(hidden_size=hidden, image_size=size, patch_size=patch),
        mask_decoder_config=_tiny_decoder(hidden),
    )


def tiny_random_edgetam_config() -> EdgeTamConfig:
    """Build the ~0.3M-parameter, 256-px `EdgeTamModel` configuration of `tiny-random-edgetam`.

    As EdgeTAM: timm's `repvit_m1` (narrower and shallower: stages of 1, 1, 2, 1 blocks; built by timm with random
    weights, nothing downloaded), whose four stage outputs feed SAM2's FPN neck, and the SAM2 prompt encoder and mask
    decoder. Needs `pip install timm`.
    """
    from transformers import TimmWrapperConfig  # imports timm (a second), which only EdgeTAM needs

    hidden, init_std = 64, 0.1
    widths = [16, 24, 32, 48]
    repvit = TimmWrapperConfig(
        architecture="repvit_m1",
        model_args=dict(in_chans=3, features_only=True, out_indices=[0, 1, 2, 3], embed_dim=widths, depth=[1, 1, 2, 1]),
        # transformers re-initialises the timm convolutions with this std, whatever their fan-in: at 0.1 the
        # activations fade to ~1e-10 over the eight blocks (and the trunk's gradients with them), at 0.3 they
        # explode; at 0.2 they stay within 0.2-1.
        initializer_range=0.2,
    )
    return EdgeTamConfig(
        initializer_range=init_std,
        tie_word_embeddings=False,  # see `family.allow_peft`
        vision_config=dict(
            model_type="edgetam_vision_model",
            backbone_config=repvit,
            backbone_channel_list=widths[::-1],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
            fpn_hidden_size=hidden,
            initializer_range=init_std,
        ),
        prompt_encoder_config=dict(hidden_size=hidden, image_size=256, patch_size=16),
        mask_decoder_config=_tiny_decoder(hidden),
    )


# Preset name -> (model class, configuration builder).
TINY_PRESETS = {
    TINY_RANDOM: (Sam2Model, tiny_random_config),
    TINY_RANDOM_SAM3_TRACKER: (Sam3TrackerModel, tiny_random_sam3_tracker_config),
    TINY_RANDOM_EDGETAM: (EdgeTamModel, tiny_random_edgetam_config),
    # The image part of the video preset: what image adapters for `tiny-random-video` train on.
    TINY_RANDOM_VIDEO: (Sam2Model, lambda: tiny_random_config(hidden=VIDEO_HIDDEN)),
}


def build_preset(name: str) -> nn.Module:
    model_class, build_config = TINY_PRESETS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        model = model_class(build_config())
    if name == TINY_RANDOM_VIDEO:
        # Its random weights score every object just under "absent" (logits about -0.1), and video tracking shows
        # no mask for an absent object: this bias makes it see most objects, as a trained model would.
        with torch.no_grad():
            model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(VIDEO_OBJECT_BIAS)
    return model


def build_video_preset() -> Sam2VideoModel:
    """The video preset: `load_sam2("tiny-random-video")`'s image weights, memory modules from the next seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED + 1)
        model = Sam2VideoModel(tiny_random_video_config())
    missing, unexpected = model.load_state_dict(build_preset(TINY_RANDOM_VIDEO).state_dict(), strict=False)
    if unexpected or any(not key.startswith(VIDEO_ONLY_PREFIXES) for key in missing):
        raise RuntimeError(f"{TINY_RANDOM_VIDEO} image weights do not fit the video preset: {unexpected or missing}")
    return model
