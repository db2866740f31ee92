"""Check a dataset before training: what is in it, and what would be skipped and why.

    from sam2_peft.data import inspect_dataset
    print(inspect_dataset("examples/data"))        # what `sam2-peft data DIR` prints

Every row is decoded and checked (so a bad file fails here, with its name, not an hour into training); nothing
is left out without being counted under a reason.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import datasets
import numpy as np

from sam2_peft.data.io import decode_row
from sam2_peft.data.objects import TOO_SMALL, extract_objects
from sam2_peft.data.sources import load_source

EMPTY_SKIPPED = "images without objects (skipped; keep_empty_images=True keeps them as negatives)"
EMPTY_KEPT = "images without objects (kept as negatives)"


@dataclass
class SplitReport:
    """What one split holds.

    Attributes:
        name: the split (`train`, `val`, `test`).
        num_rows: rows in the source.
        usable: indices of the rows that become training/evaluation items.
        objects_per_row: objects kept in each row (after `min_object_area`).
        class_counts: objects per label value (class id for semantic maps).
        skipped: what was left out, by reason (objects or images, as the reason says).
        sizes: (H, W) of every row.
        dtypes: image dtype -> rows.
        channels: image channels -> rows.
        intensity_range: smallest and largest raw image value.
        domains: domain -> rows (None when the source has none).
    """

    name: str
    num_rows: int = 0
    usable: list[int] = field(default_factory=list)
    objects_per_row: list[int] = field(default_factory=list)
    class_counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    dtypes: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    intensity_range: tuple[float, float] = (float("inf"), float("-inf"))
    domains: Counter = field(default_factory=Counter)

    @property
    def num_objects(self) -> int:
        return int(sum(self.objects_per_row))

    def format(self) -> str:
        """Render as a few indented lines."""
        counts = np.array(self.objects_per_row or [0])
        heights, widths = zip(*self.sizes) if self.sizes else ((0,), (0,))
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(self.class_counts.items())) or "none"
        lines = [
            f"{self.name}: {self.num_rows} images, {len(self.usable)} usable, {self.num_objects} objects",
            f"  objects per image: min {counts.min()}, mean {counts.mean():.1f}, max {counts.max()}",
            f"  label values (objects): {classes}",
            f"  sizes (HxW): {min(heights)}x{min(widths)} to {max(heights)}x{max(widths)}",
            f"  image dtypes: {_counts(self.dtypes)}; channels: {_counts(self.channels)}; "
            f"intensity range {self.intensity_range[0]:g}..{self.intensity_range[1]:g}",
        ]
        if any(d is not None for d in self.domains):
            lines.append(f"  domains: {_counts(self.domains)}")
        skipped = "; ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "nothing"
        lines.append(f"  skipped: {skipped}")
        return "\n".join(lines)


@dataclass
class DataReport:
    """The reports of all splits; `str(report)` is the text `sam2-peft data` prints."""

    splits: dict[str, SplitReport]

    def format(self) -> str:
        return "\n".join(report.format() for report in self.splits.values())

    __str__ = format


def scan_split(
    rows: datasets.Dataset,
    name: str,
    *,
    mask_type: str = "instance",
    num_classes: int | None = None,
    min_object_area: int = 0,
    keep_empty_images: bool = False,
    skipped: Mapping[str, int] | None = None,
) -> SplitReport:
    """Decode and check every row of one split and count its objects (raises `DataError` on the first bad row).

    Args:
        rows: one split (of `load_source`'s `Splits`).
        name: its name, for messages.
        mask_type: `instance` or `semantic`.
        num_classes: for semantic maps, the largest valid class id (checked when given).
        min_object_area: objects with fewer pixels are skipped (and counted).
        keep_empty_images: keep images without objects as negatives instead of skipping them.
        skipped: what loading left out of the split before these rows, by reason (`Splits.skipped[name]`); it is
            reported with what the scan skips.
    """
    report = SplitReport(name=name, num_rows=len(rows))
    report.skipped.update(skipped or {})
    low, high = report.intensity_range
    for index, row in enumerate(rows):
        image, labels = decode_row(row, where=f"split {name!r}, row {index}", mask_type=mask_type, num_classes=num_classes)
        objects = extract_objects(labels, mask_type=mask_type, min_object_area=min_object_area)
        report.skipped.update({TOO_SMALL: objects.dropped.get(TOO_SMALL, 0)})
        report.objects_per_row.append(len(objects))
        report.class_counts.update(objects.ids.tolist())
        if len(objects) or keep_empty_images:
            report.usable.append(index)
        if not len(objects):
            report.skipped[EMPTY_KEPT if keep_empty_images else EMPTY_SKIPPED] += 1
        report.sizes.append(labels.shape)
        report.dtypes[str(image.dtype)] += 1
        report.channels[image.shape[-1]] += 1
        report.domains[row.get("domain")] += 1
        if image.size:
            low, high = min(low, float(np.nanmin(image))), max(high, float(np.nanmax(image)))
    report.intensity_range = (low, high)
    report.skipped = Counter({k: v for k, v in report.skipped.items() if v})
    return report


def inspect_dataset(
    data: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    mask_type: str = "instance",
    num_classes: int | None = None,
    min_object_area: int = 0,
    keep_empty_images: bool = False,
    **source_options,
) -> DataReport:
    """Load `data` like training does and report every split.

    Args:
        data: anything `load_source` takes.
        mask_type: `instance` or `semantic`.
        num_classes: for semantic maps, the largest valid class id (checked when given).
        min_object_area: objects with fewer pixels are skipped (and counted).
        keep_empty_images: keep images without objects as negatives instead of skipping them.
        **source_options: passed to `load_source` (`image_column`, `mask_column`, `val_fraction`, ...).

    Example:
        >>> print(inspect_dataset("examples/data"))   # doctest: +SKIP
        train: 24 images, 24 usable, 118 objects
        ...
    """
    splits = load_source(data, mask_type=mask_type, **source_options)
    return DataReport(
        {
            name: scan_split(
                rows,
                name,
                mask_type=mask_type,
                num_classes=num_classes,
                min_object_area=min_object_area,
                keep_empty_images=keep_empty_images,
                skipped=splits.skipped[name],
            )
            for name, rows in splits.items()
        }
    )


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key}: {value}" for key, value in sorted(counter.items(), key=lambda kv: str(kv[0])))
