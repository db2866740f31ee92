"""Fixtures: tiny on-disk datasets for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_helpers import random_pair, write_pair


@pytest.fixture
def folder_with_splits(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            write_pair(tmp_path / split, f"{split}{i}", *random_pair(rng))
    return tmp_path
