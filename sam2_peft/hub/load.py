"""Load an adapter folder onto a base model, refusing adapters made for another base before touching a weight.

    model = load_adapter(load_sam2("facebook/sam2.1-hiera-tiny"), "user/sam2-lora-ct", revision="v1")
    model = load_adapter(load_sam2("tiny-random"), "runs/decoder/final")      # trained tensors, strict keys
    model = load_adapted("tiny-random", "runs/memory/final")     # the base as the image or video model it needs

Image and video models share every image-path parameter: an adapter trained on `Sam2Model` loads onto
`Sam2VideoModel` unchanged, and one trained on the video model loads onto the image model unless it changed the
memory path (`sam2_peft.json` `requires_video_model`, or memory tensors in the file), which is refused with the fix.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, PeftType, get_peft_model, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from torch import nn

from sam2_peft.errors import UserError
from sam2_peft.hub.files import (
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    SAM2_PEFT_JSON,
    TRAINED_TENSORS,
    AdapterFileError,
    base_fingerprint,
    base_state_dict,
    header_shapes,
    image_fingerprint,
    read_json,
    recorded_base,
    requires_video_model,
    resolve_adapter,
    touches_memory,
)
from sam2_peft.hub.preprocessing import note_missing, read_preprocessing, record_preprocessing
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import base_sam2
from sam2_peft.targets import is_video_model

_MAX_LISTED = 5


class AdapterMismatchError(UserError, ValueError):
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
        model: a `Sam2Model` (or another family model: `Sam2VideoModel`, ...), or a `PeftModel` that already holds
            other adapters (PEFT folders only). An adapter trained on the image model loads onto the video model
            unchanged; one that changed the video model's memory path loads onto the video model only.
        adapter: a local folder, or a Hub id (`user/name`); with `HF_HUB_OFFLINE=1` Hub ids resolve from the HF
            cache.
        revision: the Hub branch, tag or commit to pin.
        adapter_name: the name of the PEFT adapter inside the model (for `set_adapter`).
        is_trainable: PEFT: load the adapter trainable (to resume training). Trained tensors: make exactly the
            loaded parameters trainable; otherwise `requires_grad` is left as it is.

    Returns:
        A `PeftModel` for PEFT folders (`model` itself if it already was one); `model` for trained tensors.

    Raises:
        AdapterMismatchError: the adapter's tensors do not fit this model (another size or configuration, or memory
            tensors for an image model). The model is unchanged.
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


def load_adapted(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike,
    *,
    video: bool | None = None,
    revision: str | None = None,
    adapter_revision: str | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **load_options,
) -> nn.Module:
    """Load the base an adapter needs, as the image or the video model, then the adapter onto it.

    Args:
        model: the base as `load_sam2` takes it (Hub id, folder, `.pt`, preset); None: the base the adapter records
            (`base_model_name_or_path` in `sam2_peft.json`, else in `adapter_config.json`) when that is a Hub id or
            an existing folder.
        adapter: a local adapter folder or a Hub id, as for `load_adapter`.
        video: None: the video model (`load_sam2(..., video=True)`) when the adapter changes the memory path
            (`requires_video_model`), else the image model. True: the video model always (image adapters load
            onto it unchanged). False: the image model (an adapter that needs the video model is refused).
        revision: the base's Hub revision; with `model=None`, default the one the adapter records.
        adapter_revision: the adapter's Hub revision.
        adapter_name: as in `load_adapter`.
        is_trainable: as in `load_adapter`.
        **load_options: further `load_sam2` options (`dtype`, `device`, `sam2_config`, `hub_kernels`).

    Raises:
        ModelLoadError: `model=None` and the adapter names its base only by fingerprint (trained on a preset, a
            local folder or an official checkpoint): pass `model`.

    Example:
        >>> model = load_adapted("tiny-random", "runs/memory/final")    # a PeftModel around a Sam2VideoModel
    """
    folder = resolve_adapter(adapter, adapter_revision)
    if video is None:
        video = requires_video_model(folder)
    if model is None:
        model, recorded_revision = recorded_base(folder, f"adapter {str(adapter)!r}")
        revision = recorded_revision if revision is None else revision
    base = load_sam2(model, revision=revision, video=video, **load_options)
    return load_adapter(base, adapter, revision=adapter_revision, adapter_name=adapter_name,
                        is_trainable=is_trainable)


def check_compatible(model: nn.Module, folder: Path, *, where: str = "the adapter") -> None:
    """Refuse an adapter folder whose tensors do not fit `model`; warn when only the base weights differ.

    Checks, without loading any tensor or touching `model`: PEFT folders are injected, with their own
    `adapter_config.json`, into a meta-device copy of the modules they target, and the adapter tensors that this
    gives must be the file's, key for key and shape for shape (any tuner, `modules_to_save` included); the weight
    shapes that `sam2_peft.json` records for the adapted modules (`adapted_shapes`) must be the model's, which
    catches FourierFT, whose tensors have the same shapes on every base. Trained tensors must be weights of the
    model with the same shapes. An adapter that changes the video model's memory path is refused on an image model
    first, with that fix. When `sam2_peft.json` records a base fingerprint that differs from the model's, the
    architecture still fits (different weights, or another dtype): that is a warning, unless the two differ only in
    being the image or the video model of the same weights (`image_fingerprint`).

    Raises:
        AdapterMismatchError: listing up to five offending modules or tensors, their shapes, and the fix.
    """
    base = {key: tuple(t.shape) for key, t in base_state_dict(model).items()}
    record = read_json(folder, SAM2_PEFT_JSON) or {}
    peft = (folder / PEFT_WEIGHTS).is_file()
    shapes = header_shapes(folder / (PEFT_WEIGHTS if peft else TRAINED_TENSORS))
    _check_video(model, record, shapes, where)
    if peft:
        _check_peft_config(folder)
        config = PeftConfig.from_pretrained(str(folder))
        problems = _recorded_problems(record.get("adapted_shapes", {}), base)
        problems = problems or _peft_problems(base_sam2(model), config, shapes)
    else:
        if isinstance(model, PeftModel):
            raise AdapterMismatchError(
                f"{where} holds trained tensors (from a decoder/partial/full/memory run) and must be loaded onto a plain "
                "Sam2Model, not a PeftModel: load it first, then add PEFT adapters."
            )
        config = None
        problems = _tensor_problems(shapes, base)
    if problems:
        made_for = record.get("base_model_name_or_path") or getattr(config, "base_model_name_or_path", None)
        listed = "; ".join(problems[:_MAX_LISTED])
        listed += f"; ... ({len(problems)} in all)" if len(problems) > _MAX_LISTED else ""
        raise AdapterMismatchError(
            f"{where} was made for another base ({made_for or 'unknown'}) and does not fit this model: {listed}. "
            f"Load the base it was trained on (see {SAM2_PEFT_JSON} or base_model_name_or_path in {PEFT_CONFIG}). "
            "Nothing was loaded."
        )
    expected = record.get("base_fingerprint")
    if expected and not _same_base(model, record, () if peft else shapes):
        warnings.warn(
            f"{where} was trained on base {expected} ({record.get('base_model_name_or_path')}) but this model is "
            f"{base_fingerprint(model)}: same architecture, different weights or dtype. Results may differ from the "
            "reported metrics.",
            stacklevel=3,
        )


def _check_video(model: nn.Module, record: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse, with the fix, an adapter that changes the memory path when `model` is an image model."""
    memory = touches_memory(shapes)
    if is_video_model(model) or not (memory or record.get("requires_video_model")):
        return
    what = f" ({memory[0].removeprefix(PEFT_PREFIX)}, ... {len(memory)} tensors)" if memory else ""
    raise AdapterMismatchError(
        f"{where} was trained on SAM2's video model and changes its memory path{what}, which "
        f"{type(base_sam2(model)).__name__} does not have. Load the video model: `load_sam2(name, video=True)` "
        "(`--task video`), or `load_adapted(name, adapter)`, which picks the model the adapter needs. Nothing was "
        "loaded."
    )


def _same_base(model: nn.Module, record: dict, trained: Iterable[str]) -> bool:
    """Whether `model` is the base `record` names: the same fingerprint, or the same image model inside both.

    Trained tensors record the base either whole or, when saved without it, only its frozen part (keys `trained`
    left out); records without `image_fingerprint` come from image models."""
    expected = record["base_fingerprint"]
    if expected in (base_fingerprint(model), *([base_fingerprint(model, exclude=trained)] if trained else [])):
        return True
    if not is_video_model(model) and "image_fingerprint" not in record:
        return False  # two image models: their image fingerprints are the ones compared above
    image = record.get("image_fingerprint", expected)
    return image in (image_fingerprint(model), *([image_fingerprint(model, exclude=trained)] if trained else []))


def _check_peft_config(folder: Path) -> None:
    config = read_json(folder, PEFT_CONFIG)
    known = {t.value for t in PeftType}
    if config.get("peft_type") not in known:
        raise AdapterFileError(
            f"{folder / PEFT_CONFIG} has peft_type={config.get('peft_type')!r}; expected one of {sorted(known)}."
        )


def _recorded_problems(recorded: dict[str, list[int]], base: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    for module, shape in recorded.items():
        found = base.get(f"{module}.weight")
        if found is None:
            problems.append(f"{module} (weight {tuple(shape)}) is not in this model")
        elif found != tuple(shape):
            problems.append(f"{module} had weight shape {tuple(shape)} in the adapter's base, {found} in this model")
    return problems


def _peft_problems(sam: nn.Module, config: PeftConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Compare the file's tensors with those `config` gives on a meta copy of `sam`'s targeted modules."""
    if config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:  # prompt learning: no layers to inject
        return []
    modules, targeted = _selected_modules(sam, config)
    try:
        # With no target in this model PEFT refuses to inject: the targets' tensors are reported below, by module.
        expected, adapted = _expected_shapes(modules, config) if targeted else ({}, set())
    except ValueError as err:  # PEFT refuses the config on these modules (e.g. a BOFT block size that does not divide)
        return [_injection_problem(modules, config, err)]
    problems = [
        f"{key.removeprefix(PEFT_PREFIX)} has shape {shape} in the adapter but this model needs {expected[key]}"
        for key, shape in shapes.items()
        if key in expected and shape != expected[key]
    ]
    # Tensors for modules this model lacks, one line per module.
    absent = defaultdict(int)
    for key in sorted(shapes.keys() - expected.keys()):
        name = key.removeprefix(PEFT_PREFIX)
        owner = next((m for m in _prefixes(name) if _is_target(config, m, []) or _is_saved(config, m)), None)
        if owner is None or (owner in modules and targeted):
            problems.append(f"{name} is not a tensor this adapter has on this model")
        elif owner not in modules:
            absent[owner] += 1
        # else: a saved module this model has, while no target matched, so PEFT gave nothing to compare it with
    problems += [f"{module} is not in this model (the adapter has {n} tensor{'s' * (n > 1)})" for module, n in
                 absent.items()]
    # Modules of this model that the adapter targets but has no tensor for: it was made for a base without them.
    owned = defaultdict(set)
    for key in expected:
        owned[next((m for m in _prefixes(key.removeprefix(PEFT_PREFIX)) if m in adapted), None)].add(key)
    owned.pop(None, None)
    problems += [
        f"{module} matches the adapter's target_modules but the adapter has no weights for it"
        for module, keys in owned.items()
        if keys.isdisjoint(shapes)
    ]
    return problems


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1)]


def _plain_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) of the base as it was before PEFT: adapted layers as their base layer, saved-module
    wrappers as the original module, so that an adapter checked onto a `PeftModel` sees the base's names."""
    for name, child in module.named_children():
        if isinstance(child, BaseTunerLayer):
            child = child.get_base_layer()
        elif isinstance(child, ModulesToSaveWrapper):
            child = child.original_module
        yield f"{prefix}{name}", child
        yield from _plain_modules(child, f"{prefix}{name}.")


def _selected_modules(sam: nn.Module, config: PeftConfig) -> tuple[dict[str, nn.Module], bool]:
    """The modules PEFT would adapt or save whole, by PEFT's own matching rules, none nested in another; and
    whether any of them, or of their submodules, is adapted (not only saved)."""
    selected, targeted = {}, False
    for name, module in _plain_modules(sam):
        target = _is_target(config, name, module._parameters)
        targeted |= target
        if not any(outer in selected for outer in _prefixes(name)) and (target or _is_saved(config, name)):
            selected[name] = module
    return selected, targeted


def _is_target(config: PeftConfig, name: str, parameters) -> bool:
    """Whether PEFT adapts module `name` (with direct `parameters`: LoRA's `target_parameters`)."""
    targets = getattr(config, "target_parameters", None) or []
    own = [f"{name}.{p}" for p in parameters]
    return bool(check_target_module_exists(config, name)) or any(
        p == t or p.endswith(f".{t}") for p in own for t in targets)


def _is_saved(config: PeftConfig, name: str) -> bool:
    """Whether PEFT saves module `name` whole (`modules_to_save`)."""
    return any(name.endswith(m) for m in config.modules_to_save or [])


def _skeleton(modules: dict[str, nn.Module]) -> nn.Module:
    """A tree holding a meta-device copy of each module at its path: no weight is copied, `modules` are not touched."""
    root = nn.Module()
    for name, module in modules.items():
        memo = {id(t): t.to("meta") for t in module.buffers()}
        memo |= {id(p): nn.Parameter(p.to("meta"), requires_grad=p.requires_grad) for p in module.parameters()}
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, copy.deepcopy(module, memo))
    return root


def _expected_shapes(modules: dict[str, nn.Module], config: PeftConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Inject `config` into a skeleton of `modules`; return PEFT's adapter state-dict shapes and the adapted names."""
    config = copy.deepcopy(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's warnings come again, once, when the adapter is really loaded
        try:
            with torch.device("meta"):  # adapter weights as shapes only: nothing allocated, no values drawn
                model = get_peft_model(_skeleton(modules), config)
        except RuntimeError:
            # Tuners that read values while building a layer (BOFT's permutation matrices) build on CPU; PEFT then
            # moves the adapter weights to the meta base layers.
            model = get_peft_model(_skeleton(modules), copy.deepcopy(config))
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    adapted = {name for name, module in model.base_model.model.named_modules() if isinstance(module, BaseTunerLayer)}
    return {key: tuple(t.shape) for key, t in state.items()}, adapted


def _injection_problem(modules: dict[str, nn.Module], config: PeftConfig, err: ValueError) -> str:
    """Name the first module PEFT cannot adapt with `config`, with its weight shape and PEFT's reason."""
    for name, module in modules.items():
        if not _is_target(config, name, module._parameters):
            continue  # a saved module alone has no target, which PEFT refuses for that reason only
        try:
            _expected_shapes({name: module}, config)
        except ValueError as single:
            weight = getattr(module, "weight", None)
            shape = f" (weight shape {tuple(weight.shape)})" if weight is not None else ""
            return f"PEFT cannot apply the adapter's {config.peft_type.value} config to {name}{shape}: {single}"
    return f"PEFT cannot apply the adapter's {config.peft_type.value} config to this model: {err}"


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
