"""Conversion of sources that are not label maps yet (COCO, NIfTI) into rows, cached as an Arrow file.

    dataset = convert_rows(_coco_rows, [json_path, *image_paths], path=..., image_dir=..., mask_type="instance")
    skipped_counts(dataset)          # {"COCO annotations with an empty segmentation": 2, ...}

Conversion streams rows into an Arrow file in the `datasets` cache (`Dataset.from_generator`), so memory stays flat
however large the source; loading the same unchanged files with the same options again reads that file instead of
converting again. Cells are stored as lossless TIFF bytes, so int16 CT values and float intensities survive.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets

from sam2_peft.data.io import DataError, row_features

# Part of every conversion's cache key: bump it when a conversion's output changes, so cached ones are rebuilt.
CONVERSION_VERSION = 1


def source_row(image: dict, mask: dict, image_id: str) -> dict:
    return {"image": image, "mask": mask, "image_id": image_id, "domain": None, "skipped": None}


def with_skipped(rows: Iterator[dict], skipped: dict[str, int], none_left: Callable[[], str]) -> Iterator[dict]:
    """Yield `rows`, the last one holding the final `skipped` counts as JSON (a generator's only way to hand them on,
    and they stay with the cached conversion); raise `DataError(none_left())` when there is no row."""
    last = None
    for row in rows:
        if last is not None:
            yield last
        last = row
    if last is None:
        raise DataError(none_left())
    yield {**last, "skipped": json.dumps(skipped)}


def convert_rows(generator, sources: list[Path], **options) -> datasets.Dataset:
    """Run a row generator through `Dataset.from_generator`, cached under the sources' paths, sizes and mtimes, the
    options and `CONVERSION_VERSION`; move its skipped counts into the dataset's info (`skipped_counts`)."""
    stamps = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in sources if path.exists()]
    key = json.dumps([generator.__name__, CONVERSION_VERSION, stamps, options], sort_keys=True, default=str)
    features = row_features()
    features["skipped"] = datasets.Value("string")
    try:
        dataset = datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=options, fingerprint=hashlib.sha256(key.encode()).hexdigest()
        )
    except datasets.exceptions.DatasetGenerationError as err:
        # Show what the conversion raised (a DataError names the file and the fix) rather than datasets' wrapper.
        cause = err.__cause__
        if cause is None:
            raise
        cause.__suppress_context__ = True
        raise cause
    skipped = json.loads(dataset[len(dataset) - 1]["skipped"])
    dataset = dataset.remove_columns("skipped")
    dataset.info.description = json.dumps({"sam2_peft_skipped": {k: v for k, v in skipped.items() if v}})
    return dataset


def skipped_counts(dataset: datasets.Dataset) -> dict[str, int]:
    """Return what a converting source skipped while building `dataset` (e.g. empty NIfTI slices), by reason."""
    try:
        return dict(json.loads(dataset.info.description or "{}").get("sam2_peft_skipped", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}
