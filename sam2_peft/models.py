"""Load SAM2 as a transformers `Sam2Model`, from wherever the weights live.

    from sam2_peft import load_sam2
    model = load_sam2("facebook/sam2.1-hiera-tiny")   # Hub id, local folder, official .pt, or "tiny-random"
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import torch
from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model

HUB_MODELS = (
    "facebook/sam2.1-hiera-tiny",
    "facebook/sam2.1-hiera-small",
    "facebook/sam2.1-hiera-base-plus",
    "facebook/sam2.1-hiera-large",
)
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0


def tiny_random_config() -> Sam2Config:
    """Build the ~1.5M-parameter, 256-px SAM2 configuration used by tests and offline dry runs.

    It keeps every structural feature of the real models: four Hiera stages with stage-change blocks (which have a
    block-level `proj`), windowed and global attention, a three-level FPN neck and the two-way mask decoder.
    """
    hidden = 64
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
        mask_decoder_config=dict(hidden_size=hidden, mlp_dim=256, num_attention_heads=4, iou_head_hidden_dim=64),
    )


class ModelLoadError(OSError):
    """Raised when no weights could be found for the requested model."""


def load_sam2(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    sam2_config: str | None = None,
    hub_kernels: bool = False,
) -> Sam2Model:
    """Load a SAM2 model as a transformers `Sam2Model`.

    Args:
        name_or_path: a Hub id (e.g. `facebook/sam2.1-hiera-tiny`), a local Hugging Face model folder, an official
            sam2 checkpoint (`*.pt`), or `tiny-random` (a deterministic random 256-px model for tests and dry runs).
        revision: Hub branch, tag or commit to pin.
        dtype: parameter dtype (default: float32).
        device: where to put the model (default: CPU).
        sam2_config: for `*.pt` checkpoints, the official config name (`sam2.1_hiera_t`, ...) or YAML path; guessed
            from the file name when omitted.
        hub_kernels: let transformers swap layers for compiled kernels downloaded from the Hub
            (`kernels-community/*`, through the `kernels` package) when the model moves between train and eval
            mode on CUDA. Off by default: it runs code fetched at run time, and offline it fails at the first
            `eval()`. transformers' `from_pretrained` turns it on by default; here it stays off unless asked.

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
    if name == TINY_RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_RANDOM_SEED)
            model = Sam2Model(tiny_random_config())
        model.config._name_or_path = TINY_RANDOM
    elif name.endswith(".pt"):
        from sam2_peft.export import load_official_checkpoint

        model = load_official_checkpoint(name, sam2_config)
    else:
        model = _from_pretrained(name, revision, hub_kernels)
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


def _from_pretrained(name: str, revision: str | None, hub_kernels: bool = False) -> Sam2Model:
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} is a folder but has no config.json; save one with `model.save_pretrained(dir)`")
    try:
        # use_kernels=False: transformers would otherwise kernelize from the Hub on CUDA (see `load_sam2`).
        return Sam2Model.from_pretrained(name, revision=revision, use_kernels=hub_kernels)
    except OSError as err:
        if path.exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise ModelLoadError(
            f"Could not load SAM2 weights for {name!r} (revision={revision!r}). Tried: a local folder of that name "
            f"(none), the Hugging Face cache and the Hub ({'offline mode' if offline else 'unreachable or unknown id'})."
            " Ways out: pass a local model folder (`model.save_pretrained(dir)` on a machine with access), prefill "
            "the cache (`huggingface-cli download <id>`) and set HF_HUB_OFFLINE=1, load an official checkpoint "
            f"(`*.pt`), or use `{TINY_RANDOM}` for a dry run. Known ids: {', '.join(HUB_MODELS)}. "
            f"Cause: {str(err).splitlines()[0]}"
        ) from err


def build_image_processor(model: Sam2Model) -> Sam2ImageProcessor:
    """Build the `Sam2ImageProcessor` that matches `model`'s input size (ImageNet mean/std, square resize)."""
    size = model.config.prompt_encoder_config.image_size
    return Sam2ImageProcessor(size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4})


# Config keys that record where or how a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def _architecture(config: dict) -> dict:
    return {
        key: _architecture(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in _VOLATILE_CONFIG_KEYS
    }


def model_fingerprint(model: Sam2Model) -> str:
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
