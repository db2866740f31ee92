"""Conversion of sources that are not label maps yet (COCO, NIfTI) into rows, cached as an Arrow file.

    rows, skipped = convert_rows(_coco_rows, [json_path], path=..., image_dir=..., mask_type="instance")
    skipped                          # {"COCO annotations with an empty segmentation": 2, ...}

Conversion streams rows into an Arrow file in the `datasets` cache (`Dataset.from_generator`), so memory stays flat
however large the source; loading the same unchanged files with the same options again reads that file instead of
converting again. Cells are stored as lossless TIFF bytes, so int16 CT values and float intensities survive.
A cached conversion does not run its generator, so the skip counts are kept beside it, in a JSON file named after
the same fingerprint: a cache hit reports what the conversion skipped, like the run that built it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import datasets

from sam2_peft.data.io import DataError, row_features

# Part of every conversion's cache key: bump it when a conversion's output changes, so cached ones are rebuilt.
# 2: skip counts in a JSON file beside the cache instead of the last row; NIfTI volumes converted in one call.
CONVERSION_VERSION = 2


class Conversion(NamedTuple):
    """A converted source: its rows and what the conversion left out.

    Attributes:
        rows: the rows `{image, mask, image_id, domain}`, in an Arrow file of the `datasets` cache.
        skipped: reason -> count of the items left out (e.g. empty NIfTI slices); only reasons with a count.
    """

    rows: datasets.Dataset
    skipped: dict[str, int]


def source_row(image: dict, mask: dict, image_id: str) -> dict:
    return {"image": image, "mask": mask, "image_id": image_id, "domain": None}


def require_rows(rows: Iterator[dict], none_left: Callable[[], str]) -> Iterator[dict]:
    """Yield `rows`; raise `DataError(none_left())` when there is none (called once the source is exhausted)."""
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DataError(none_left())


def convert_rows(generator: Callable[..., Iterator[dict]], sources: list[Path], **options) -> Conversion:
    """Convert a source with `generator(skipped=counts, **options)` (which yields rows and adds to `counts`, a dict
    of reason -> count), cached under the sources' paths, sizes and mtimes, the options and `CONVERSION_VERSION`.

    Returns:
        The rows and the counts the generator left in `skipped`, the same on a cache hit as on the first run.
    """
    stamps = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in sources if path.exists()]
    key = json.dumps([generator.__name__, CONVERSION_VERSION, stamps, options], sort_keys=True, default=str)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    counts_file = Path(datasets.config.HF_DATASETS_CACHE) / "sam2_peft_conversions" / f"{fingerprint}.json"
    rows = _generate(generator, options, fingerprint, counts_file)
    if not counts_file.is_file():
        # A cache entry without its counts (the file was deleted): convert again rather than report nothing skipped.
        for cache_file in rows.cache_files:
            shutil.rmtree(Path(cache_file["filename"]).parent, ignore_errors=True)
        rows = _generate(generator, options, fingerprint, counts_file)
    skipped = {reason: count for reason, count in json.loads(counts_file.read_text()).items() if count}
    return Conversion(rows, skipped)


def _generate(generator, options: dict, fingerprint: str, counts_file: Path) -> datasets.Dataset:
    try:
        # gen_kwargs holds no list: `datasets` would split a list into shards and call the generator once per item.
        return datasets.Dataset.from_generator(
            _counted_rows,
            features=row_features(),
            gen_kwargs={"generator": generator, "options": options, "counts_file": str(counts_file)},
            fingerprint=fingerprint,
        )
    except datasets.exceptions.DatasetGenerationError as err:
        # Show what the conversion raised (a DataError names the file and the fix) rather than datasets' wrapper.
        cause = err.__cause__
        if cause is None:
            raise
        cause.__suppress_context__ = True
        raise cause


def _counted_rows(generator, options: dict, counts_file: str) -> Iterator[dict]:
    """Yield the generator's rows, then write its skip counts to `counts_file` (atomically, before `datasets`
    finishes the Arrow file, so a finished cache entry always has its counts)."""
    skipped: dict[str, int] = {}
    yield from generator(skipped=skipped, **options)
    path = Path(counts_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(skipped, sort_keys=True))
    os.replace(partial, path)
