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
    EdgeTamModel,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2VideoModel,
    Sam2VideoProcessor,
    Sam2VideoVideoProcessor,
    Sam3TrackerModel,
)

from sam2_peft.errors import UserError
from sam2_peft.family import allow_peft, supported_classes
from sam2_peft.interop.official_checkpoint import load_official_checkpoint
from sam2_peft.presets import (
    TINY_PRESETS,
    TINY_RANDOM,
    TINY_RANDOM_EDGETAM,
    TINY_RANDOM_SAM3_TRACKER,
    TINY_RANDOM_VIDEO,
    build_preset,
    build_video_preset,
)

HUB_MODELS = (
    "facebook/sam2.1-hiera-tiny",
    "facebook/sam2.1-hiera-small",
    "facebook/sam2.1-hiera-base-plus",
    "facebook/sam2.1-hiera-large",
    "facebook/sam3",
    "yonigozlan/EdgeTAM-hf",
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
        model = build_video_preset() if video else build_preset(name)
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
