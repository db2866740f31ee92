"""Load an adapter folder onto a base model, refusing adapters made for another base before touching a weight.

    model = load_adapter(load_sam2("facebook/sam2.1-hiera-tiny"), "user/sam2-lora-ct", revision="v1")
    model = load_adapter(load_sam2("tiny-random"), "runs/decoder/final")      # trained tensors, strict keys
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from peft import PeftModel, PeftType
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sam2_peft.hub.files import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    SAM2_PEFT_JSON,
    TRAINED_TENSORS,
    AdapterFileError,
    base_fingerprint,
    base_state_dict,
    read_json,
    resolve_adapter,
)
from sam2_peft.hub.preprocessing import note_missing, read_preprocessing, record_preprocessing
from sam2_peft.segmenter import base_sam2

# PEFT's state-dict keys start with this; the rest is the module path inside the Sam2Model.
_PEFT_PREFIX = "base_model.model."
_MAX_LISTED = 5


class AdapterMismatchError(ValueError):
    """Raised when an adapter was made for a base with another architecture than the model it is loaded onto."""


def load_adapter(
    model: nn.Module,
    adapter: str | os.PathLike,
    *,
    revision: str | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> nn.Module:
    """Load an adapter folder (PEFT or trained tensors) onto `model`, after checking it fits.

    Args:
        model: a `Sam2Model`, or a `PeftModel` that already holds other adapters (PEFT folders only).
        adapter: a local folder, or a Hub id (`user/name`); with `HF_HUB_OFFLINE=1` Hub ids resolve from the HF
            cache.
        revision: the Hub branch, tag or commit to pin.
        adapter_name: the name of the PEFT adapter inside the model (for `set_adapter`).
        is_trainable: PEFT: load the adapter trainable (to resume training). Trained tensors: make exactly the
            loaded parameters trainable; otherwise `requires_grad` is left as it is.

    Returns:
        A `PeftModel` for PEFT folders (`model` itself if it already was one); `model` for trained tensors.

    Raises:
        AdapterMismatchError: the adapter's tensors do not fit this model (another size or configuration). The
            model is unchanged.
        AdapterFileError: the folder or repository is not a safe, complete adapter.
        PreprocessingError: its `preprocessor_config.json` is malformed or another family's.

    The adapter's preprocessing (`preprocessor_config.json`) is recorded on the model under `adapter_name`, for
    `adapter_preprocessing(model)`; adapters saved without one (older ones) record None and log a note.

    Example:
        >>> model = load_adapter(load_sam2("tiny-random"), "runs/lora/final")
    """
    folder = resolve_adapter(adapter, revision)
    where = f"adapter {str(adapter)!r}"
    check_compatible(model, folder, where=where)
    preprocessing = read_preprocessing(folder, model)  # a malformed record fails here, before any weight moves
    if preprocessing is None:
        note_missing(where)
    if (folder / PEFT_WEIGHTS).is_file():
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
    else:
        model = _load_tensors(model, folder / TRAINED_TENSORS, is_trainable)
    record_preprocessing(model, adapter_name, preprocessing)
    return model


def check_compatible(model: nn.Module, folder: Path, *, where: str = "the adapter") -> None:
    """Refuse an adapter folder whose tensors do not fit `model`; warn when only the base weights differ.

    Checks, without loading any tensor: every tensor of the adapter names a module or weight that exists in the
    model, with matching shapes (LoRA `A` matrices against input sizes, `B` against output sizes, saved modules
    exactly). When `sam2_peft.json` records a base fingerprint that differs from the model's, the architecture
    still fits (different weights, or another dtype): that is a warning.

    Raises:
        AdapterMismatchError: listing up to five offending tensors and the fix.
    """
    base = {key: tuple(t.shape) for key, t in base_state_dict(model).items()}
    peft = (folder / PEFT_WEIGHTS).is_file()
    if peft:
        _check_peft_config(folder)
        shapes = _header_shapes(folder / PEFT_WEIGHTS)
        problems = _peft_problems(shapes, base)
    else:
        if isinstance(model, PeftModel):
            raise AdapterMismatchError(
                f"{where} holds trained tensors (from a decoder/partial/full run) and must be loaded onto a plain "
                "Sam2Model, not a PeftModel: load it first, then add PEFT adapters."
            )
        shapes = _header_shapes(folder / TRAINED_TENSORS)
        problems = _tensor_problems(shapes, base)
    record = read_json(folder, SAM2_PEFT_JSON) or {}
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        listed += f"; ... ({len(problems)} in all)" if len(problems) > _MAX_LISTED else ""
        raise AdapterMismatchError(
            f"{where} was made for another base ({record.get('base_model_name_or_path', 'unknown')}) and does not "
            f"fit this model: {listed}. Load the base it was trained on (see {SAM2_PEFT_JSON} or "
            f"base_model_name_or_path in {PEFT_CONFIG}). Nothing was loaded."
        )
    expected = record.get("base_fingerprint")
    # Trained tensors record either the whole base or, when saved without it, only its frozen part.
    if expected and expected != (actual := base_fingerprint(model)) and (
        peft or expected != base_fingerprint(model, exclude=shapes)
    ):
        warnings.warn(
            f"{where} was trained on base {expected} ({record.get('base_model_name_or_path')}) but this model is "
            f"{actual}: same architecture, different weights or dtype. Results may differ from the reported metrics.",
            stacklevel=3,
        )


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    # safe_open reads only the JSON header here: no tensor data, no code.
    with safe_open(path, framework="pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def _check_peft_config(folder: Path) -> None:
    config = read_json(folder, PEFT_CONFIG)
    known = {t.value for t in PeftType}
    if config.get("peft_type") not in known:
        raise AdapterFileError(
            f"{folder / PEFT_CONFIG} has peft_type={config.get('peft_type')!r}; expected one of {sorted(known)}."
        )


def _owner(name: str, base: dict[str, tuple[int, ...]]) -> tuple[str, str] | None:
    """Split an adapter tensor name into (the base module it adapts, the adapter's part name)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if f"{module}.weight" in base:
            return module, parts[cut]
    return None


def _peft_problems(shapes: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    for key, shape in shapes.items():
        name = ".".join(p for p in key.removeprefix(_PEFT_PREFIX).split(".") if p != "modules_to_save")
        if name in base:  # a module saved whole (`modules_to_save`)
            if shape != base[name]:
                problems.append(f"{name} has shape {shape}, the model's {base[name]}")
            continue
        owner = _owner(name, base)
        if owner is None:
            problems.append(f"{name} adapts a module this model does not have")
            continue
        module, part = owner
        weight = base[f"{module}.weight"]
        # LoRA: A is (r, in, ...), B is (out, r, ...), DoRA's magnitude is (out,); as in nn.Linear / nn.Conv2d.
        checks = {"lora_A": (1, 1), "lora_B": (0, 0), "lora_magnitude_vector": (0, 0)}
        if part in checks:
            axis, base_axis = checks[part]
            if len(shape) <= axis or len(weight) <= base_axis or shape[axis] != weight[base_axis]:
                problems.append(f"{name} has shape {shape}, which does not fit {module}.weight of shape {weight}")
    return problems


def _tensor_problems(shapes: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]]) -> list[str]:
    problems = [f"{key} is not a weight of this model" for key in shapes if key not in base]
    problems += [
        f"{key} has shape {shape}, the model's {base[key]}"
        for key, shape in shapes.items()
        if key in base and shape != base[key]
    ]
    return problems


def _load_tensors(model: nn.Module, path: Path, is_trainable: bool) -> nn.Module:
    sam = base_sam2(model)
    tensors = load_file(path)
    state = sam.state_dict()
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[key].copy_(tensor)
    if is_trainable:
        for key, param in sam.named_parameters():
            param.requires_grad_(key in tensors)
    return model
