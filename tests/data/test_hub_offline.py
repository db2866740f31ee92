"""Hub dataset ids load without network from a repo snapshot prefilled in the Hugging Face Hub cache.

`datasets.load_dataset("user/name")` offline looks only in its own cache of prepared datasets (HF_DATASETS_CACHE),
never at snapshots in the Hub cache (HF_HUB_CACHE); `load_source` falls back to the snapshot. The loading runs in a
subprocess because `datasets` and `huggingface_hub` read HF_HUB_OFFLINE and the cache paths when imported.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOAD = """
import json, sys
import numpy as np
from sam2_peft.data import DataError, decode_row, load_source

splits = load_source("user/cells", image_column="img", mask_column="label")
arrays = {}
for name, rows in splits.items():
    for i, row in enumerate(rows):
        arrays[f"{name}/{i}/image"], arrays[f"{name}/{i}/labels"] = decode_row(row, where=name)
np.savez(sys.argv[1], **arrays)
errors = {}
for repo_id in ("user/missing", "user/empty"):
    try:
        load_source(repo_id)
    except DataError as err:
        errors[repo_id] = str(err)
print(json.dumps({"ids": {name: list(rows["image_id"]) for name, rows in splits.items()}, "errors": errors}))
"""


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _prefill_hub_cache(hub_cache: Path, rng: np.random.Generator) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Write `user/cells` as the hub client stores a downloaded dataset repo: refs/main, blobs, snapshot symlinks."""
    repo = hub_cache / "datasets--user--cells"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    pairs = {}
    for split, count in (("train", 3), ("validation", 2)):
        pairs[split] = []
        for _ in range(count):
            labels = np.zeros((12, 16), np.uint8)
            labels[2:6, 3:9], labels[7:11, 10:15] = 1, 2
            pairs[split].append((rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), labels))
        rows = datasets.Dataset.from_dict(
            {"img": [_png(image) for image, _ in pairs[split]], "label": [_png(labels) for _, labels in pairs[split]]},
            features=datasets.Features(img=datasets.Image(), label=datasets.Image()),
        )
        parquet = repo / "blobs" / "staging.parquet"
        rows.to_parquet(str(parquet))
        blob = parquet.rename(repo / "blobs" / hashlib.sha256(parquet.read_bytes()).hexdigest())
        link = repo / "snapshots" / COMMIT / "data" / f"{split}-00000-of-00001.parquet"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return pairs


def test_hub_id_loads_offline_from_the_hub_cache(tmp_path):
    pairs = _prefill_hub_cache(tmp_path / "hub", np.random.default_rng(0))
    empty = tmp_path / "hub" / "datasets--user--empty"  # a snapshot without data files
    (empty / "refs").mkdir(parents=True)
    (empty / "refs" / "main").write_text(COMMIT)
    (empty / "snapshots" / COMMIT).mkdir(parents=True)
    (empty / "snapshots" / COMMIT / "README.md").write_text("# no data\n")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("HF_DATASETS_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path / "rows.npz")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ids"] == {"train": ["train/0", "train/1", "train/2"], "val": ["validation/0", "validation/1"]}
    arrays = np.load(tmp_path / "rows.npz")
    for ours, theirs in (("train", "train"), ("val", "validation")):
        for i, (image, labels) in enumerate(pairs[theirs]):
            np.testing.assert_array_equal(arrays[f"{ours}/{i}/image"], image)
            np.testing.assert_array_equal(arrays[f"{ours}/{i}/labels"], labels)
    # Ids not to be had offline: the error names the id, why, and every way to load it offline.
    errors = result["errors"]
    assert sorted(errors) == ["user/empty", "user/missing"]
    for repo_id, error in errors.items():
        cache = str(tmp_path / "hub" / f"datasets--{repo_id.replace('/', '--')}")
        for part in (f"data={repo_id!r}", "image/mask folder", "save_to_disk", f"{cache}/refs/main", "HF_HUB_OFFLINE=1"):
            assert part in error, (part, error)
    assert "The Hub cache has no snapshot of it" in errors["user/missing"]
    assert "did not load (EmptyDatasetError" in errors["user/empty"]
