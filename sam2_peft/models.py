"""Load SAM2 as a transformers `Sam2Model` (or SAM3's tracker, or EdgeTAM), from wherever the weights live.

    from sam2_peft import load_sam2
    model = load_sam2("facebook/sam2.1-hiera-tiny")   # Hub id, local folder, official .pt, or "tiny-random"
    model = load_sam2("facebook/sam3")                 # a Sam3TrackerModel (ViT image encoder, 1008 px)
    model = load_sam2("yonigozlan/EdgeTAM-hf")         # an EdgeTamModel (RepViT through timm: `pip install timm`)
    model = load_sam2("tiny-random-sam3-tracker")      # or "tiny-random-edgetam": tiny random members for tests

A Hub id or folder loads as the class its `config.json` names (`architectures`, else `model_type`), through that
class's own `from_pretrained`; `family.MODEL_CLASSES` lists the supported ones. A video checkpoint (the Hub's
`facebook/sam2.1-hiera-*` are) loads as the image model unless `video=True` asks for `Sam2VideoModel`:

    video = load_sam2("facebook/sam2.1-hiera-tiny", video=True)   # or a folder, an official .pt, "tiny-random-video"
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import torch
from torch import nn
from transformers import (
    AutoConfig,
    EdgeTamConfig,
    EdgeTamModel,
    Sam2Config,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2VideoConfig,
    Sam2VideoModel,
    Sam2VideoProcessor,
    Sam2VideoVideoProcessor,
    Sam3TrackerConfig,
    Sam3TrackerModel,
)

from sam2_peft.errors import UserError
from sam2_peft.family import allow_peft, supported_classes
from sam2_peft.interop.official_checkpoint import load_official_checkpoint

HUB_MODELS = (
    "facebook/sam2.1-hiera-tiny",
    "facebook/sam2.1-hiera-small",
    "facebook/sam2.1-hiera-base-plus",
    "facebook/sam2.1-hiera-large",
    "facebook/sam3",
    "yonigozlan/EdgeTAM-hf",
)
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SAM3_TRACKER = "tiny-random-sam3-tracker"
TINY_RANDOM_EDGETAM = "tiny-random-edgetam"
TINY_RANDOM_VIDEO = "tiny-random-video"
VIDEO_HIDDEN = 128  # the video preset's neck and decoder width (see `tiny_random_video_config`)
VIDEO_OBJECT_BIAS = 0.5  # the video preset's object-score bias (see `_tiny_preset`)
TINY_RANDOM_SEED = 0
# `Sam2VideoModel` parameters that `Sam2Model` does not have: the memory path.
VIDEO_ONLY_PREFIXES = (
    "memory_attention.", "memory_encoder.", "mask_downsample.", "object_pointer_proj.",
    "temporal_positional_encoding_projection_layer.", "memory_temporal_positional_encoding",
    "no_memory_positional_encoding", "no_object_pointer", "occlusion_spatial_embedding_parameter",
)
# config.json `model_type` -> the class that loads it as an image model. The video and full SAM3 checkpoints hold the
# image model's weights (SAM3's under `tracker_config`), which these classes' `from_pretrained` takes and the rest it
# ignores.
MODEL_TYPES = {
    "sam2": Sam2Model,
    "sam2_video": Sam2Model,
    "sam3_tracker": Sam3TrackerModel,
    "sam3_tracker_video": Sam3TrackerModel,
    "sam3_video": Sam3TrackerModel,
    "edgetam": EdgeTamModel,
    "edgetam_video": EdgeTamModel,
}
# config.json `model_type` -> the class that loads it with `video=True`.
VIDEO_MODEL_TYPES = {"sam2_video": Sam2VideoModel}


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


class ModelLoadError(UserError, OSError):
    """Raised when no weights could be found for the requested model."""


def load_sam2(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    sam2_config: str | None = None,
    hub_kernels: bool = False,
    video: bool = False,
) -> nn.Module:
    """Load a model of the SAM2 family: a transformers `Sam2Model`, `Sam3TrackerModel` or `EdgeTamModel`.

    Args:
        name_or_path: a Hub id (e.g. `facebook/sam2.1-hiera-tiny`, `facebook/sam3`, `yonigozlan/EdgeTAM-hf`), a
            local Hugging Face model folder (each loads as the class its `config.json` names), an official sam2
            checkpoint (`*.pt`), or a tiny deterministic random model for tests and dry runs: `tiny-random` (SAM2,
            256 px), `tiny-random-sam3-tracker` (224 px), `tiny-random-edgetam` (256 px, needs timm).
        revision: Hub branch, tag or commit to pin.
        dtype: parameter dtype (default: float32).
        device: where to put the model (default: CPU).
        sam2_config: for `*.pt` checkpoints, the official config name (`sam2.1_hiera_t`, ...) or YAML path; guessed
            from the file name when omitted.
        hub_kernels: let transformers swap layers for compiled kernels downloaded from the Hub
            (`kernels-community/*`, through the `kernels` package) when the model moves between train and eval
            mode on CUDA. Off by default: it runs code fetched at run time, and offline it fails at the first
            `eval()`. transformers' `from_pretrained` turns it on by default; here it stays off unless asked.
        video: return the video model (`Sam2VideoModel`: the image model's parameters plus the memory modules).
            `tiny-random` and `tiny-random-video` give the video preset, whose image weights are
            `load_sam2("tiny-random-video")`'s (a 128-wide decoder; see `tiny_random_video_config`). A Hub id or
            folder must hold a video checkpoint (`model_type` `sam2_video`, as the Hub's `facebook/sam2.1-hiera-*`);
            an official `.pt` converts its memory modules and tracking settings too. SAM2 only: SAM3's tracker and
            EdgeTAM load as image models.

    Returns:
        The model in eval mode; `model.config._name_or_path` records where it came from.

    Example:
        >>> model = load_sam2("tiny-random")
        >>> model.config.prompt_encoder_config.image_size
        256
    """
    name = str(name_or_path)
    if hub_kernels:
        check_hub_kernels_reachable()
    if name in TINY_PRESETS:
        if video and name not in (TINY_RANDOM, TINY_RANDOM_VIDEO):
            raise ModelLoadError(
                f"video=True: {name!r} has no video preset; use {TINY_RANDOM_VIDEO!r} (SAM2), or drop video=True."
            )
        model = _tiny_random_video() if video else _tiny_preset(name)
        model.config._name_or_path = name
    elif name.endswith(".pt"):
        model = load_official_checkpoint(name, sam2_config, video=video)
    else:
        model = _from_pretrained(name, revision, hub_kernels, video)
    allow_peft(model)
    if hub_kernels and not model.use_kernels:
        model.set_use_kernels(True)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _tiny_preset(name: str) -> nn.Module:
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


def _tiny_random_video() -> Sam2VideoModel:
    """The video preset: `load_sam2("tiny-random-video")`'s image weights, memory modules from the next seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED + 1)
        model = Sam2VideoModel(tiny_random_video_config())
    missing, unexpected = model.load_state_dict(_tiny_preset(TINY_RANDOM_VIDEO).state_dict(), strict=False)
    if unexpected or any(not key.startswith(VIDEO_ONLY_PREFIXES) for key in missing):
        raise RuntimeError(f"{TINY_RANDOM_VIDEO} image weights do not fit the video preset: {unexpected or missing}")
    return model


def check_hub_kernels_reachable() -> None:
    """Refuse `hub_kernels=True` (`--hub_kernels`) up front when the Hub is offline: the kernels would be fetched
    at the first `train()`/`eval()` on CUDA and fail there, in the middle of a run."""
    if huggingface_hub.is_offline_mode():
        raise ModelLoadError(
            "`--hub_kernels` (hub_kernels=True) downloads compiled kernels from the Hugging Face Hub, but "
            "HF_HUB_OFFLINE is set. Drop `--hub_kernels` (the default, plain PyTorch layers), or unset "
            "HF_HUB_OFFLINE on a machine that can reach the Hub."
        )


def model_class_for(config, video: bool = False) -> type[nn.Module]:
    """The family class that loads a checkpoint with this configuration.

    As an image model: the image class its `architectures` names, else the one for its `model_type` (`MODEL_TYPES`;
    a video checkpoint gives its image model). With `video`: the class for its `model_type` in `VIDEO_MODEL_TYPES`.
    """
    if video:
        return _video_class_for(config)
    image_classes = {cls.__name__: cls for cls in MODEL_TYPES.values()}
    named = [image_classes[arch] for arch in getattr(config, "architectures", None) or [] if arch in image_classes]
    if named:
        return named[0]
    if config.model_type in MODEL_TYPES:
        return MODEL_TYPES[config.model_type]
    raise ModelLoadError(
        f"{config._name_or_path!r} is a {config.model_type!r} model ({', '.join(config.architectures or [])}); "
        f"sam2-peft trains {supported_classes()}: config.json `model_type` one of {', '.join(MODEL_TYPES)}."
    )


def _video_class_for(config) -> type[nn.Module]:
    name, model_type = config._name_or_path, config.model_type
    if model_type in VIDEO_MODEL_TYPES:
        return VIDEO_MODEL_TYPES[model_type]
    if model_type == "sam2":
        raise ModelLoadError(
            f"video=True: {name!r} is an image-only SAM2 checkpoint (config.json `model_type` 'sam2', as saved from "
            "Sam2Model): it has no memory weights to track with. Load the video checkpoint it came from (a "
            "`model_type` 'sam2_video' folder, e.g. facebook/sam2.1-hiera-tiny) or an official .pt "
            "(load_sam2('sam2.1_hiera_tiny.pt', video=True)), or drop video=True."
        )
    raise ModelLoadError(
        f"video=True: {name!r} is a {model_type!r} checkpoint; sam2-peft loads only SAM2 as a video model (config.json "
        f"`model_type` one of {', '.join(VIDEO_MODEL_TYPES)}). Drop video=True to load its image model."
    )


def _from_pretrained(name: str, revision: str | None, hub_kernels: bool = False, video: bool = False) -> nn.Module:
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} is a folder but has no config.json; save one with `model.save_pretrained(dir)`")
    try:
        model_class = model_class_for(AutoConfig.from_pretrained(name, revision=revision), video)
        # use_kernels=False: transformers would otherwise kernelize from the Hub on CUDA (see `load_sam2`).
        return model_class.from_pretrained(name, revision=revision, use_kernels=hub_kernels)
    except ModelLoadError:
        raise
    except OSError as err:
        if path.exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise ModelLoadError(
            f"Could not load SAM2 weights for {name!r} (revision={revision!r}). Tried: a local folder of that name "
            f"(none), the Hugging Face cache and the Hub ({'offline mode' if offline else 'unreachable or unknown id'})."
            " Ways out: pass a local model folder (`model.save_pretrained(dir)` on a machine with access), prefill "
            "the cache (`huggingface-cli download <id>`) and set HF_HUB_OFFLINE=1, load an official checkpoint "
            f"(`*.pt`), or use `{TINY_RANDOM}` (or `{TINY_RANDOM_SAM3_TRACKER}`, `{TINY_RANDOM_EDGETAM}`) for a dry "
            f"run. Known ids: {', '.join(HUB_MODELS)}. Cause: {str(err).splitlines()[0]}"
        ) from err


def build_image_processor(model: nn.Module) -> Sam2ImageProcessor:
    """Build the `Sam2ImageProcessor` that matches `model`'s input size (ImageNet mean/std, square resize) and its
    mask-prompt size (`prompt_encoder.mask_input_size`: S/4, or 4 S/14 for SAM3)."""
    size = model.config.prompt_encoder_config.image_size
    mask_height, mask_width = model.prompt_encoder.mask_input_size
    return Sam2ImageProcessor(size={"height": size, "width": size},
                              mask_size={"height": mask_height, "width": mask_width})


def build_video_processor(model: Sam2VideoModel) -> Sam2VideoProcessor:
    """Build the `Sam2VideoProcessor` (frames and prompts for a `Sam2VideoInferenceSession`) that matches `model`'s
    input size, as `build_image_processor` does for single images."""
    size = model.config.prompt_encoder_config.image_size
    return Sam2VideoProcessor(image_processor=build_image_processor(model),
                              video_processor=Sam2VideoVideoProcessor(size={"height": size, "width": size}))


# Config keys that record where or how a model was saved, not what it computes (no family model ties weights:
# `family.allow_peft` sets `tie_word_embeddings` on loading).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "tie_word_embeddings",
}


def _architecture(config: dict) -> dict:
    return {
        key: _architecture(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in _VOLATILE_CONFIG_KEYS
    }


def model_fingerprint(model: nn.Module) -> str:
    """Return a stable id for a plain model's configuration and weights: `sam2-<16 hex digits>`.

    Used as `base_model_name_or_path` for bases that have no Hub id and as the feature-cache key; any change to the
    configuration or to one weight changes it. Take it before adapters are attached.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(_architecture(model.config.to_dict()), sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"sam2-{digest.hexdigest()[:16]}"
