"""The preprocessing an adapter was trained with, saved beside its weights and applied wherever it is loaded.

    write_preprocessing("runs/ct/final", model, cfg.data_config())     # preprocessor_config.json
    AutoImageProcessor.from_pretrained("runs/ct/final")                 # transformers reads it as Sam2ImageProcessor
    model = load_adapter(load_sam2("tiny-random"), "runs/ct/final")     # records it on the model
    data = resolve_data_config(DataConfig(data="scans/"), adapter_preprocessing(model), where="--adapter runs/ct/final")

`preprocessor_config.json` is `Sam2ImageProcessor`'s file (image size, rescale, ImageNet mean/std) plus a
`sam2_peft` section with what reproduces the training pixels and objects exactly: the intensity mode and its
percentile bounds, the CT window, how channels become RGB, and the mask type and class ids. Commands apply it when
the user gives no data flag; a flag that disagrees wins, with one warning naming both values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from torch import nn

from sam2_peft.data.config import INTENSITY_FIELDS, PREPROCESSING_FIELDS, DataConfig
from sam2_peft.data.intensity import IntensityConfig
from sam2_peft.errors import UserError
from sam2_peft.hub.files import PREPROCESSOR_CONFIG, read_json
from sam2_peft.models import build_image_processor
from sam2_peft.segmenter import base_sam2

logger = logging.getLogger(__name__)

RECORD_KEY = "sam2_peft"
# Grayscale is repeated to three channels and RGBA loses its alpha (`sam2_peft.data.intensity`).
CHANNELS = "gray-to-rgb,drop-alpha"
_PROCESSOR_TYPES = ("Sam2ImageProcessor", "Sam2ImageProcessorFast")
# The attribute of the base model where `load_adapter` records each adapter's preprocessing, by adapter name.
_REGISTRY = "_sam2_peft_preprocessing"


class PreprocessingError(UserError, ValueError):
    """Raised when an adapter's `preprocessor_config.json` is malformed or made for another model family."""


@dataclass(frozen=True)
class AdapterPreprocessing:
    """What turns a raw image and label map into the model inputs and objects an adapter was trained on.

    Attributes:
        image_size: the model's square input side in pixels.
        data: the `DataConfig` preprocessing fields (`PREPROCESSING_FIELDS`), every one resolved.
        source: the file it was read from (None when built in memory), for messages.
    """

    image_size: int
    data: dict
    source: Path | None = dataclasses.field(default=None, compare=False)

    def intensity_config(self) -> IntensityConfig:
        """The intensity handling, as `DataConfig.intensity_config` builds it."""
        return DataConfig(**self.data).intensity_config()


def write_preprocessing(folder: str | Path, model: nn.Module, data: DataConfig) -> Path:
    """Write `folder/preprocessor_config.json`: `model`'s `Sam2ImageProcessor` plus the `sam2_peft` section.

    Args:
        folder: an adapter folder (or a merged model folder).
        model: the model (any adapters are ignored); its input size goes into the processor.
        data: the data configuration the adapter was trained with; unset fields are written at their defaults.
    """
    folder = Path(folder)
    build_image_processor(base_sam2(model)).save_pretrained(folder)
    path = folder / PREPROCESSOR_CONFIG
    record = json.loads(path.read_text())
    resolved = data.resolved()
    record[RECORD_KEY] = {"channels": CHANNELS, **{name: getattr(resolved, name) for name in PREPROCESSING_FIELDS}}
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_preprocessing(folder: str | Path, model: nn.Module | None = None) -> AdapterPreprocessing | None:
    """Read an adapter's preprocessing; None when it has no `preprocessor_config.json` or no `sam2_peft` section.

    Args:
        folder: the adapter (or merged model) folder.
        model: when given, the processor's image size must be the model's input size.

    Raises:
        PreprocessingError: the file is not valid JSON, is another family's processor, or holds a key or value
            sam2-peft does not know; the message names the file and the key.
    """
    path = Path(folder) / PREPROCESSOR_CONFIG
    record = read_json(Path(folder), PREPROCESSOR_CONFIG, error=PreprocessingError)
    if record is None:
        return None
    kind = record.get("image_processor_type")
    if kind not in _PROCESSOR_TYPES:
        raise PreprocessingError(
            f"{path}: key 'image_processor_type' is {kind!r}, not a SAM2 image processor ({', '.join(_PROCESSOR_TYPES)}); "
            "this file belongs to another model family. Remove it, or save the adapter again with sam2-peft."
        )
    size = record.get("size")
    if not isinstance(size, dict) or size.get("height") != size.get("width") or not isinstance(size.get("height"), int):
        raise PreprocessingError(f"{path}: key 'size' must be {{'height': S, 'width': S}}, got {size!r}.")
    if model is not None and size["height"] != (expected := base_sam2(model).config.prompt_encoder_config.image_size):
        raise PreprocessingError(
            f"{path}: key 'size' is {size['height']} px but the model's input is {expected} px: the adapter was made "
            "for another base. Load the base it was trained on."
        )
    section = record.get(RECORD_KEY)
    if section is None:
        return None
    return AdapterPreprocessing(size["height"], _data_fields(section, path), path)


def _data_fields(section: object, path: Path) -> dict:
    if not isinstance(section, dict):
        raise PreprocessingError(f"{path}: key '{RECORD_KEY}' must be an object, got {type(section).__name__}.")
    known = {"channels", *PREPROCESSING_FIELDS}
    if unknown := sorted(set(section) - known):
        raise PreprocessingError(
            f"{path}: unknown key(s) {[f'{RECORD_KEY}.{key}' for key in unknown]}; known: {sorted(known)}. It was "
            "written by a newer sam2-peft, or edited by hand."
        )
    if section.get("channels", CHANNELS) != CHANNELS:
        raise PreprocessingError(f"{path}: key '{RECORD_KEY}.channels' is {section['channels']!r}; only {CHANNELS!r} exists.")
    fields = {name: section.get(name) for name in PREPROCESSING_FIELDS}
    for name, value in fields.items():
        kind = int if name == "num_classes" else str
        if value is not None and not isinstance(value, kind):
            raise PreprocessingError(
                f"{path}: key '{RECORD_KEY}.{name}' must be {kind.__name__} or null, got {value!r}."
            )
    try:
        resolved = DataConfig(**fields).resolved()
    except ValueError as err:
        raise PreprocessingError(f"{path}: the '{RECORD_KEY}' section holds an invalid value: {err}") from err
    return {name: getattr(resolved, name) for name in PREPROCESSING_FIELDS}


def record_preprocessing(model: nn.Module, adapter_name: str, preprocessing: AdapterPreprocessing | None) -> None:
    """Remember on `model` (its base `Sam2Model`) which preprocessing adapter `adapter_name` was trained with."""
    base = base_sam2(model)
    registry = getattr(base, _REGISTRY, None)
    if registry is None:
        registry = {}
        setattr(base, _REGISTRY, registry)
    registry[adapter_name] = preprocessing


def adapter_preprocessing(model: nn.Module, adapter_name: str | None = None) -> AdapterPreprocessing | None:
    """The preprocessing recorded by `load_adapter` for `adapter_name` (default: the active adapter).

    Returns None for a model without a loaded adapter, and for adapters saved without a record (older ones).

    Example:
        >>> adapter_preprocessing(load_adapter(load_sam2("tiny-random"), "runs/ct/final")).intensity_config()
        IntensityConfig(mode='window', percentiles=(0.5, 99.5), window=(40.0, 400.0))
    """
    if adapter_name is None:
        adapter_name = model.active_adapter if isinstance(model, PeftModel) else "default"
    return (getattr(base_sam2(model), _REGISTRY, None) or {}).get(adapter_name)


def resolve_data_config(data: DataConfig, preprocessing: AdapterPreprocessing | None, *, where: str) -> DataConfig:
    """Fill the preprocessing fields the user left unset from the adapter's record; the user's wins where both are set.

    The intensity fields (`intensity`, `intensity_percentiles`, `ct_window`) are one setting: giving any of them
    replaces the adapter's whole setting. Where the user's value disagrees with the adapter's, one warning names both.

    Args:
        data: the command's data configuration (None = unset).
        preprocessing: the adapter's record, or None (no adapter, or an older adapter without one).
        where: the adapter, for messages (e.g. "--adapter runs/ct/final").

    Returns:
        A `DataConfig` with every preprocessing field set.
    """
    if preprocessing is None:
        return data.resolved()
    adapter = preprocessing.data
    merged, disagreements = {}, []
    if any(getattr(data, name) is not None for name in INTENSITY_FIELDS):
        mine, theirs = data.intensity_config(), preprocessing.intensity_config()
        if mine != theirs:
            disagreements.append(f"intensity {_describe(mine)} (flags) vs {_describe(theirs)} (adapter)")
    else:
        merged.update({name: adapter[name] for name in INTENSITY_FIELDS})
    for name in ("mask_type", "num_classes"):
        value = getattr(data, name)
        if value is None:
            merged[name] = adapter[name]
        elif value != adapter[name]:
            disagreements.append(f"--{name} {value} vs {adapter[name]} (adapter)")
    if disagreements:
        warnings.warn(
            f"{where} was trained with other preprocessing than the flags ask for; using the flags: "
            f"{'; '.join(disagreements)}. Drop the flags to use the adapter's ({preprocessing.source}).",
            stacklevel=2,
        )
    return dataclasses.replace(data, **merged).resolved()


def _describe(config: IntensityConfig) -> str:
    if config.mode == "window":
        return f"window={config.window}"
    return f"{config.mode} {config.percentiles}" if config.mode in ("auto", "percentile") else config.mode


def note_missing(where: str) -> None:
    """Log that an adapter carries no preprocessing record (saved before sam2-peft wrote one)."""
    logger.info("%s has no %s with a '%s' section (an older adapter): using the data flags, else the defaults.",
                where, PREPROCESSOR_CONFIG, RECORD_KEY)
