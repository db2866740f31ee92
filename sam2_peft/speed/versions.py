"""The transformers versions the fast paths are tested on, and what happens outside them.

    check_transformers()            # ConfigError outside SUPPORTED_TRANSFORMERS
    transformers_supported()        # False outside it (`select_backend("auto")` then runs `reference`)

The `cpu` and `cuda` backends compute transformers' modules from their weights and internals: `Sam2MaskDecoder`'s
and `Sam2TwoWayAttentionBlock`'s submodule names and `_dynamic_multimask_via_stability`, the neck's `convs` and
`fpn_top_down_levels`, `Sam2MultiScaleBlock`'s attributes and `window_partition` / `do_pool`, the attention
interface registry. None of that is public API; a transformers release may rename or reorder it, and a fast path
that read a renamed attribute would fail, and one that read a reordered computation could train on wrong numbers
without failing. So they run only on the versions the suite passed on (tests/speed/ compare every path with the
`reference` backend, which calls transformers' modules as its `Sam2Model.forward` does).
"""

from __future__ import annotations

import re
from importlib.metadata import version

from packaging.specifiers import SpecifierSet

from sam2_peft.errors import ConfigError

# What pyproject.toml pins too; written once, in the order people read a range.
SUPPORTED_RANGE = ">=5.25,<5.26"
SUPPORTED_TRANSFORMERS = SpecifierSet(SUPPORTED_RANGE)
# The same range as (major, minor) tuples: comparing them is pure, where `SpecifierSet` and `Version` cache parsed
# state on first use, which torch.compile would guard on (and recompile for) when a compiled forward picks its backend.
_LOWEST, _BEYOND = (5, 25), (5, 26)


def installed_transformers() -> str:
    """The installed transformers version string."""
    return version("transformers")


def transformers_supported(installed: str | None = None) -> bool:
    """Whether `installed` (default: the installed transformers) is in `SUPPORTED_TRANSFORMERS`."""
    match = re.match(r"(\d+)\.(\d+)", installed or installed_transformers())
    return match is not None and _LOWEST <= (int(match[1]), int(match[2])) < _BEYOND


def unsupported_message(installed: str, backend: str) -> str:
    """What to say when `backend` is asked for on transformers `installed`, outside the tested range."""
    return (
        f"--backend {backend}: its fast paths use private transformers internals tested on transformers"
        f"{SUPPORTED_RANGE}, and transformers {installed} is installed. Install a tested version "
        f"(pip install 'transformers{SUPPORTED_RANGE}') or run the plain transformers modules with "
        "--backend reference (slower, always correct)."
    )


def check_transformers(backend: str, installed: str | None = None) -> None:
    """Raise a `ConfigError` naming both versions if `installed` transformers is outside the tested range."""
    installed = installed or installed_transformers()
    if not transformers_supported(installed):
        raise ConfigError(unsupported_message(installed, backend))
