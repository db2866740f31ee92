"""Official sam2 checkpoints in and out of `Sam2Model` / `Sam2VideoModel`, and merged models for deployment.

    sam2-peft convert --sam2_checkpoint sam2.1_hiera_tiny.pt --sam2_config sam2.1_hiera_t --output_dir hf-tiny

    from sam2_peft.export import load_official_checkpoint, export_official_checkpoint, merge_to_folder
    model = load_official_checkpoint("MedSAM2_latest.pt")          # config guessed: sam2.1_hiera_t
    export_official_checkpoint(model, "tuned.pt", "sam2.1_hiera_t")  # sam2.build_sam.build_sam2 loads it

Import (`interop.official_checkpoint`) maps every tensor the model has and refuses any missing, unexpected or
misshapen key; into a `Sam2Model` the video-only modules (`official_keys.VIDEO_ONLY_MODULES`) are dropped. Export of
a `Sam2VideoModel` writes its own memory modules. Export of a `Sam2Model` has to put them back, since the official
loader is strict: they come from `video_source` (the checkpoint you fine-tuned from, which keeps the video predictor
working) or, without one, from a freshly built official model (seeded random init: fine for `SAM2ImagePredictor`,
meaningless for video tracking).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import Sam2Model, Sam2VideoModel

from sam2_peft.data.config import DataConfig
from sam2_peft.errors import ConfigError
from sam2_peft.family import is_family_model, supported_classes
from sam2_peft.hub.preprocessing import adapter_preprocessing, write_preprocessing
from sam2_peft.interop.official_checkpoint import (
    OfficialCheckpointError,
    load_official_checkpoint,
    read_official_checkpoint,
)
from sam2_peft.interop.official_config import official_yaml_path
from sam2_peft.interop.official_keys import hf_to_official, is_video_only, key_problems
from sam2_peft.interop.official_video_config import config_mismatches, official_name_for
from sam2_peft.models import build_image_processor, build_video_processor

logger = logging.getLogger(__name__)

# Seed of the random video-only modules written when no `video_source` is given, so exports are reproducible.
VIDEO_INIT_SEED = 0
EXPORT_FORMATS = ("hf", "sam2")


def export_official_checkpoint(
    model: Sam2Model | Sam2VideoModel,
    path: str | os.PathLike,
    sam2_config: str | None = None,
    *,
    video_source: str | os.PathLike | None = None,
) -> Path:
    """Write `model` as an official checkpoint `{"model": state_dict}` that `sam2.build_sam.build_sam2` loads.

    Args:
        model: a plain `Sam2Model` or `Sam2VideoModel` (merge adapters first, e.g. with `merge_to_folder`).
        path: the `.pt` file to write (tensors only, so `torch.load(weights_only=True)` reads it).
        sam2_config: the official config name or YAML path; inferred from `model.config` when None (the SAM2.1 name
            of the matching size).
        video_source: for a `Sam2Model`, an official checkpoint to copy the video-only modules from. Without it
            they are freshly initialised (needs the `sam2` package), which serves the image predictor but not video
            tracking. A `Sam2VideoModel` writes its own and takes none.

    Returns:
        The path written.

    Raises:
        OfficialCheckpointError: `model` does not match `sam2_config`, the result would not load strictly, or a
            `video_source` is given for a `Sam2VideoModel`.
    """
    if not isinstance(model, (Sam2Model, Sam2VideoModel)):
        raise TypeError(
            f"Expected a plain Sam2Model or Sam2VideoModel, got {type(model).__name__}; merge adapters first with "
            "`merge_to_folder(model, dir, format='sam2')` or `model.merge_and_unload()`."
        )
    video = isinstance(model, Sam2VideoModel)
    if video and video_source is not None:
        raise OfficialCheckpointError(
            f"video_source={str(video_source)!r}: a Sam2VideoModel exports its own memory modules, which would "
            "replace the trained ones; drop video_source."
        )
    name = sam2_config or official_name_for(model.config)
    mismatches = config_mismatches(name, model.config)
    if mismatches:
        raise OfficialCheckpointError(
            f"The model's configuration differs from sam2_config={name!r}: " + "; ".join(mismatches)
        )
    try:
        tensors, unmapped = hf_to_official(model.state_dict())
    except ValueError as err:
        raise OfficialCheckpointError(str(err)) from err
    if unmapped:
        raise OfficialCheckpointError(f"No official key for: {', '.join(unmapped)}")

    # The official model of this config, where the package is installed: its keys and shapes are what build_sam2
    # checks, and its seeded random video-only modules stand in when no video_source is given.
    reference = _fresh_official_state(name) if _has_sam2() else None
    if video:
        video_from = {}
    elif video_source is not None:
        video_from = read_official_checkpoint(video_source)
    elif reference is not None:
        video_from = reference
        logger.warning(
            "%s: video-only modules are freshly initialised (seed %d); pass video_source= the checkpoint you "
            "started from to keep video tracking working.", path, VIDEO_INIT_SEED,
        )
    else:
        raise OfficialCheckpointError(
            "Exporting needs the video-only modules that the official loader requires: pass video_source= an "
            "official checkpoint of the same size, or install the `sam2` package to initialise them "
            "(`SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2`)."
        )
    tensors.update({key: value for key, value in video_from.items() if is_video_only(key)})
    if reference is not None:
        problems = key_problems(tensors, reference)
        if problems:
            raise OfficialCheckpointError(
                f"The exported state dict would not load into the official {name!r} model:\n  " + "\n  ".join(problems)
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Own, contiguous CPU copies: torch.save would otherwise store whole shared storages.
    torch.save({"model": {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}}, path)
    return path


def convert_checkpoint(
    sam2_checkpoint: str | os.PathLike, sam2_config: str | None, output_dir: str | os.PathLike, *, video: bool = False
) -> Path:
    """Convert an official checkpoint into a Hugging Face model folder (safetensors) for `Sam2Model.from_pretrained`
    (with `video`, for `Sam2VideoModel.from_pretrained`: the memory path too).

    The folder also holds the matching `preprocessor_config.json`, so `Sam2Processor.from_pretrained` works on it
    (and for `video` the `Sam2VideoProcessor`'s files).

    Example:
        >>> convert_checkpoint("sam2.1_hiera_tiny.pt", "sam2.1_hiera_t", "hf-tiny")  # doctest: +SKIP
    """
    model = load_official_checkpoint(sam2_checkpoint, sam2_config, video=video)
    return _save_hf(model, output_dir)


def merge_to_folder(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    format: str = "hf",
    sam2_config: str | None = None,
    *,
    video_source: str | os.PathLike | None = None,
) -> Path:
    """Write a merged model for deployment: a Hugging Face folder or an official sam2 checkpoint.

    Args:
        model: a plain `Sam2Model` or `Sam2VideoModel` (`Sam3TrackerModel`, `EdgeTamModel` for `hf`), or a
            `PeftModel` around one, whose adapters are folded in place (`merge_and_unload()`):
            pass a copy to keep using the adapter afterwards.
        output_dir: the folder to write.
        format: `hf` (safetensors folder for `from_pretrained` of the model's class; a `Sam2VideoModel` folder,
            which `load_sam2(dir, video=True)` loads, also gets the `Sam2VideoProcessor`'s files) or `sam2`
            (`<config name>.pt` for `sam2.build_sam.build_sam2` and `build_sam2_video_predictor`).
        sam2_config: for `sam2`, the official config name or YAML path; inferred from the model when None.
        video_source: for `sam2` and a `Sam2Model`, the official checkpoint to copy video-only modules from (see
            `export_official_checkpoint`).

    The folder gets `preprocessor_config.json` (`Sam2ImageProcessor`'s, which `pipeline("mask-generation")` reads),
    with the adapter's recorded preprocessing (`adapter_preprocessing`) when it has one.

    Returns:
        The folder (`hf`) or the checkpoint file (`sam2`).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is not one of {EXPORT_FORMATS}; use 'hf' or 'sam2'.")
    preprocessing = adapter_preprocessing(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if not is_family_model(model):
        raise TypeError(f"Expected one of {supported_classes()} or a PeftModel around one, got {type(model).__name__}.")
    if format == "sam2" and not isinstance(model, (Sam2Model, Sam2VideoModel)):
        raise ConfigError(
            f"--format sam2 writes an official SAM2 checkpoint, which {type(model).__name__} has no layout for; "
            "use --format hf."
        )
    if format == "hf":
        path = _save_hf(model, output_dir)
    else:
        name = sam2_config or official_name_for(model.config)
        # Named after the config so that `load_official_checkpoint` recognises the file without `sam2_config`.
        file_name = f"{Path(name).stem if name.endswith(('.yaml', '.yml')) else name}.pt"
        path = export_official_checkpoint(model, Path(output_dir) / file_name, name, video_source=video_source)
    if preprocessing is not None:
        # The adapter's preprocessing travels with the merged weights (beside the .pt for the sam2 format).
        write_preprocessing(output_dir, model, DataConfig(**preprocessing.data))
    return path


def _save_hf(model: nn.Module, output_dir: str | os.PathLike) -> Path:
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    if isinstance(model, Sam2VideoModel):
        build_video_processor(model).save_pretrained(output_dir)
    # After the video processor, whose files may hold the image processor's settings elsewhere:
    # `pipeline("mask-generation")` reads preprocessor_config.json.
    build_image_processor(model).save_pretrained(output_dir)
    return output_dir


def _has_sam2() -> bool:
    return importlib.util.find_spec("sam2") is not None


def _fresh_official_state(sam2_config: str) -> dict[str, torch.Tensor]:
    """Build the official model for `sam2_config` with seeded random weights and return its state dict."""
    # Importing sam2 initialises Hydra globally (the package does it on import); instantiating from the YAML
    # directly avoids `compose`, so no config search path is involved.
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    yaml_path = official_yaml_path(sam2_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VIDEO_INIT_SEED)
        try:
            official = instantiate(OmegaConf.load(yaml_path).model, _recursive_=True)
        except Exception as err:  # Hydra wraps whatever the official constructors raise.
            raise _unbuildable(yaml_path, err) from err
    if not isinstance(official, torch.nn.Module):
        raise _unbuildable(yaml_path, "its `model:` section has no `_target_`")
    return official.state_dict()


def _unbuildable(yaml_path: Path, cause: object) -> OfficialCheckpointError:
    return OfficialCheckpointError(
        f"{yaml_path}: the official sam2 package cannot build this config, so `build_sam2` could not load the "
        f"export either; use a complete official YAML. Cause: {cause}"
    )
