"""The data configuration every command that reads images shares: source, columns, splits, intensities, masks.

    sam2-peft train --data D --intensity percentile --ct_window abdomen ...
    sam2-peft eval  --model M --adapter A --data D            # intensity etc. from the adapter when not given
    sam2-peft predict --model M --adapter A --image scan.tif --box 10,10,90,90 --ct_window 40,400
    sam2-peft train --task video --data examples/data_video --clip_length 8 ...

`train`, `eval`, `predict`, `compare` (and the Python API) take the same `DataConfig` fields, parsed the same way
(`HfArgumentParser`, a YAML `--config` and `--<field>` flags, unknown keys refused). The preprocessing fields
(`intensity`, `intensity_percentiles`, `ct_window`, `mask_type`, `num_classes`) default to None, meaning "what the
adapter was trained with" (its `preprocessor_config.json`), and without an adapter record the documented default.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from sam2_peft.data.clip_sources import ClipRecord, load_clips
from sam2_peft.data.intensity import IntensityConfig
from sam2_peft.data.sources import load_source
from sam2_peft.errors import ConfigError, MissingFileError

# The fields that decide what the model sees and how masks become objects: they travel with an adapter.
PREPROCESSING_FIELDS = ("intensity", "intensity_percentiles", "ct_window", "mask_type", "num_classes")
# The defaults of those fields when neither the user nor an adapter sets them.
PREPROCESSING_DEFAULTS = {
    "intensity": "auto",
    "intensity_percentiles": "0.5,99.5",
    "ct_window": None,
    "mask_type": "instance",
    "num_classes": None,
}
# Fields that together say how raw intensities become [0, 1]: setting one replaces the adapter's whole setting.
INTENSITY_FIELDS = ("intensity", "intensity_percentiles", "ct_window")
TASKS = ("image", "video")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    """Where images come from and how they become model inputs and objects; see each field's help."""

    data: str = _help("Image/mask folder, Hub dataset id, COCO json, NIfTI folder, or a dataset saved with save_to_disk.", default="examples/data")
    mask_type: str | None = _help("instance: every label value is one object; semantic: every value is one class. Unset: the adapter's, else instance.", default=None)
    num_classes: int | None = _help("Semantic masks: the largest valid class id (larger values are refused). Unset: the adapter's, else unchecked.", default=None)
    image_column: str = _help("Image column of a `datasets` dataset.", default="image")
    mask_column: str = _help("Mask column of a `datasets` dataset.", default="mask")
    train_split: str = _help("Name of the training split.", default="train")
    val_split: str | None = _help("Name of the validation split (default: validation, val, valid or dev); when there is none, `val_fraction` of train is held out.", default=None)
    val_fraction: float = _help("Held-out fraction when the source has no validation split.", default=0.1)
    nifti_axis: int = _help("NIfTI volumes: the axis to slice along (2: axial for RAS volumes).", default=2)
    intensity: str | None = _help("Intensity to [0, 1]: auto (8-bit /255, else percentile clip), percentile, minmax, range. Unset: the adapter's, else auto.", default=None)
    intensity_percentiles: str | None = _help("Lower,upper percentile of the percentile clip (and of auto on non-8-bit images). Unset: the adapter's, else '0.5,99.5'.", default=None)
    ct_window: str | None = _help("CT window instead: abdomen, lung, bone, or 'level,width' (e.g. '40,400'); none unsets one from --config. Unset: the adapter's, else none.", default=None)
    keep_empty_images: bool = _help("Keep images without objects as negatives for the object-score head.", default=False)
    min_object_area: int = _help("Objects with fewer pixels are dropped (and counted).", default=16)
    num_workers: int | None = _help("DataLoader worker processes. Unset: 0 on CPU (workers would take the training's cores), on a GPU min(8, CPU cores per process), with pinned memory and non-blocking copies.", default=None)
    task: str = _help("image: 2-D images (NIfTI volumes as slices); video: clips, from videos/<clip>/ frame folders with masks/<clip>/, or NIfTI volumes as clips of slices along `nifti_axis`.", default="image")
    clip_length: int = _help("task video: consecutive frames per training clip (shorter clips use all their frames); evaluation reads whole clips.", default=8)

    def __post_init__(self):
        if self.mask_type not in (None, "instance", "semantic"):
            raise ConfigError(f"`--mask_type {self.mask_type}` is unknown; use instance or semantic.")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"`--val_fraction` must be in [0, 1), got {self.val_fraction}.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"`--num_classes` must be at least 1, got {self.num_classes}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"`--num_workers` must be >= 0, got {self.num_workers}.")
        if self.ct_window is not None and self.ct_window.lower() in ("", "none"):
            self.ct_window = None  # `--ct_window none` unsets a YAML's window
        if self.task not in TASKS:
            raise ConfigError(f"`--task {self.task}` is unknown; use {' or '.join(TASKS)}.")
        if self.clip_length < 1:
            raise ConfigError(f"`--clip_length` must be at least 1 frame, got {self.clip_length}.")
        self.intensity_config()  # validates intensity, intensity_percentiles and ct_window together

    def resolved(self) -> DataConfig:
        """This config with every unset preprocessing field at its default (for runs without an adapter record)."""
        unset = {name: value for name, value in PREPROCESSING_DEFAULTS.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset)

    def intensity_config(self) -> IntensityConfig:
        """The data pipeline's intensity handling for `intensity`, `intensity_percentiles` and `ct_window`."""
        percentiles = _percentiles(self.intensity_percentiles or PREPROCESSING_DEFAULTS["intensity_percentiles"])
        if self.ct_window is None:
            return IntensityConfig(mode=self.intensity or "auto", percentiles=percentiles)
        if "," in self.ct_window:
            try:
                level, width = (float(part) for part in self.ct_window.split(","))
            except ValueError:
                raise ConfigError(f"`--ct_window {self.ct_window}`: use a preset or 'level,width', e.g. '40,400'.") from None
            return IntensityConfig(mode="window", window=(level, width))
        return IntensityConfig(mode="window", window=self.ct_window)

    def data_config(self) -> DataConfig:
        """The `DataConfig` part of this config (of a subclass such as `TrainConfig`)."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})

    def load_splits(self, *, seed: int = 0):
        """Load `data` as splits (`sam2_peft.data.load_source`) with this config's columns, splits and axis."""
        return load_source(
            self.data,
            image_column=self.image_column,
            mask_column=self.mask_column,
            train_split=self.train_split,
            val_split=self.val_split,
            val_fraction=self.val_fraction,
            seed=seed,
            mask_type=self.mask_type or PREPROCESSING_DEFAULTS["mask_type"],
            nifti_axis=self.nifti_axis,
        )

    def load_clip_splits(self, *, seed: int = 0) -> dict[str, list[ClipRecord]]:
        """Load `data` as splits of clips (`sam2_peft.data.clip_sources.load_clips`): frame folders or NIfTI
        volumes cut along `nifti_axis`, `val_fraction` of train held out (seeded) when there is no val/ folder."""
        return load_clips(self.data, nifti_axis=self.nifti_axis, val_fraction=self.val_fraction, seed=seed)


def _percentiles(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in str(text).split(","))
    except ValueError:
        raise ConfigError(f"`--intensity_percentiles {text}`: use 'low,high', e.g. '0.5,99.5'.") from None
    if not 0 <= low < high <= 100:
        raise ConfigError(f"`--intensity_percentiles {text}` must satisfy 0 <= low < high <= 100.")
    return low, high


def read_yaml_fields(path: str | Path, allowed: set[str], what: str) -> dict:
    """Read a `--config` YAML file as a mapping whose keys must all be in `allowed`.

    Args:
        path: the YAML file.
        allowed: the field names (flags without `--`) it may set.
        what: the command, for the error message (e.g. "sam2-peft eval").
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--config {path}: no such file.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(values).__name__}.")
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys are the `{what} --help` flags.")
    return values


def build_data_parser(prog: str, description: str) -> HfArgumentParser:
    """An argument parser with every `DataConfig` field as a flag and `--config FILE.yaml` (data fields only); add
    the command's own flags to it, then parse with `parse_data_args`."""
    parser = HfArgumentParser(DataConfig, prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file with any of the data fields (keys without `--`).")
    return parser


def parse_data_args(parser: HfArgumentParser, args: list[str]):
    """Parse `args` with a parser from `build_data_parser`: the YAML's data fields first, flags on top; unknown
    keys and flags are refused.

    Returns:
        (DataConfig, argparse.Namespace of the command's own flags).
    """
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=None)
    known, _ = config.parse_known_args(args)
    if known.config is not None:
        fields = {f.name for f in dataclasses.fields(DataConfig)}
        parser.set_defaults(**read_yaml_fields(known.config, fields, parser.prog))
    data, extra = parse_strictly(parser, args)
    return data, extra


def parse_strictly(parser: HfArgumentParser, args: list[str]) -> tuple:
    """`parser.parse_args_into_dataclasses(args)`, refusing flags that no field or option takes with a `ConfigError`
    naming them (the last output is the namespace of non-dataclass options, e.g. `--config`)."""
    *outputs, remaining = parser.parse_args_into_dataclasses(
        args=args, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise ConfigError(f"Unknown flag(s) {remaining}; `{parser.prog} --help` lists the flags.")
    return tuple(outputs)
