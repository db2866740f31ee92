"""Read an official sam2 checkpoint (`*.pt`: SAM2, SAM2.1, MedSAM2) into a transformers `Sam2Model` or
`Sam2VideoModel`, by key.

    model = load_official_checkpoint("MedSAM2_latest.pt")              # config guessed: sam2.1_hiera_t
    video = load_official_checkpoint("MedSAM2_latest.pt", video=True)  # the memory path too

Every tensor the model has is mapped and any missing, unexpected or misshapen key is refused. For `Sam2Model` only
the video-only modules (`official_keys.VIDEO_ONLY_MODULES`) are dropped, because it has no counterpart;
`Sam2VideoModel` takes them all.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch
from transformers import Sam2Model, Sam2VideoModel
from transformers.initialization import no_init_weights

from sam2_peft.errors import UserError
from sam2_peft.interop.official_config import guess_official_config, official_to_hf_config
from sam2_peft.interop.official_keys import is_video_only, key_problems, official_to_hf
from sam2_peft.interop.official_video_config import official_to_hf_video_config

logger = logging.getLogger(__name__)


class OfficialCheckpointError(UserError, ValueError):
    """Raised when an official checkpoint cannot be read, or does not fit the model or configuration."""


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official checkpoint's state dict with `torch.load(weights_only=True)`.

    Accepts `{"model": state_dict}` (as published, and MedSAM2) or a bare state dict.

    Raises:
        OfficialCheckpointError: the file does not exist, holds anything but tensors and plain containers (no
            pickled code is ever run), or is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such checkpoint file.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise OfficialCheckpointError(
            f"{path}: refused by torch.load(weights_only=True), which runs no pickled code: the file is not a "
            "PyTorch checkpoint, or it holds objects other than tensors and plain containers. Re-save only the "
            f"state dict: torch.save({{'model': model.state_dict()}}, path). Cause: {err}"
        ) from err
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        content = content["model"]
    if not isinstance(content, dict) or not content or not all(torch.is_tensor(v) for v in content.values()):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        raise OfficialCheckpointError(
            f"{path}: expected a state dict of tensors or {{'model': state_dict}}, found {found}."
        )
    return content


def load_official_checkpoint(
    path: str | os.PathLike, sam2_config: str | None = None, *, video: bool = False
) -> Sam2Model | Sam2VideoModel:
    """Load an official sam2 checkpoint (SAM2, SAM2.1 or MedSAM2 style) as a `Sam2Model`, or a `Sam2VideoModel`.

    Args:
        path: the `.pt` file.
        sam2_config: official config name (`sam2.1_hiera_t`, ...) or YAML path; guessed from the file name (e.g.
            `sam2.1_hiera_tiny.pt`, `MedSAM2_latest.pt`), else from the trunk's width and depth, when None.
        video: build the video model, with the memory attention, memory encoder and object-pointer modules and the
            config's tracking settings (`official_video_config.official_to_hf_video_config`).

    Returns:
        The model in eval mode, in the checkpoint's dtype, with `config._name_or_path` set to `path`.

    Raises:
        OfficialCheckpointError: a tensor is missing, unexpected or of the wrong shape (all listed).

    Example:
        >>> model = load_official_checkpoint("sam2.1_hiera_tiny.pt")  # doctest: +SKIP
    """
    state = read_official_checkpoint(path)
    name = sam2_config or guess_official_config(path, state)
    config = official_to_hf_video_config(name) if video else official_to_hf_config(name)
    tensors, sources, unmapped = official_to_hf(state, video=video)
    model = _empty_model(config, video)
    problems = key_problems(tensors, model.state_dict(), sources) + [f"unexpected: {key}" for key in unmapped]
    if problems:
        scope = "video=True maps every tensor" if video else "only the video-only modules may be absent or ignored"
        raise OfficialCheckpointError(
            f"{path}: does not fit sam2_config={name!r} ({len(problems)} problems; {scope}). Check that the config "
            "matches the checkpoint's size:\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    if video:
        logger.info("Loaded %s as %s with its memory path (%d tensors).", path, name, len(tensors))
    else:
        logger.info("Loaded %s as %s; dropped %d video-only tensors.", path, name, sum(map(is_video_only, state)))
    model.config._name_or_path = str(path)
    return model.eval()


def _empty_model(config, video: bool) -> Sam2Model | Sam2VideoModel:
    """The model without its random init: every tensor is then assigned from the checkpoint."""
    if not video:
        with torch.device("meta"):
            return Sam2Model(config)
    # On the meta device the video model's non-persistent buffers (the memory attention's RoPE frequencies and
    # positions), which no checkpoint holds, would stay empty: allocate it, but skip the init.
    with no_init_weights():
        return Sam2VideoModel(config)
