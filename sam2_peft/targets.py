"""Named PEFT target presets and Hiera block selection, resolved to exact module names.

Presets resolve against the model at hand, so a typo or a preset that matches nothing fails before PEFT runs:

    resolve_targets(model, "trunk.qkv", blocks="last:4")
    # ['vision_encoder.backbone.blocks.8.attn.qkv', ..., 'vision_encoder.backbone.blocks.11.attn.qkv']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

TRUNK_BLOCKS = "vision_encoder.backbone.blocks"
_BLOCK = re.escape(TRUNK_BLOCKS) + r"\.(\d+)\."

# Each preset is a full-match regex over module names; group 1, when present, is the Hiera block index.
PRESETS: dict[str, str] = {
    "trunk.qkv": _BLOCK + r"attn\.qkv",
    "trunk.attn": _BLOCK + r"attn\.(?:qkv|proj)",
    "trunk.mlp": _BLOCK + r"mlp\.proj_(?:in|out)",
    # Every Linear of the selected blocks, the stage-change skip projections (block-level `proj`) included.
    "trunk.all": _BLOCK + r"(?:attn\.qkv|attn\.proj|mlp\.proj_(?:in|out)|proj)",
    "decoder.attn": r"mask_decoder\.transformer\..*\.[qkvo]_proj",
    "decoder.all": r"mask_decoder\..*",
}

# A block-level `proj` exists only in stage-change blocks, where it projects the residual to the new width. A pattern
# ending in `proj` silently catches these alongside `attn.proj`, which is rarely what was meant.
_STAGE_CHANGE_PROJ = re.compile(_BLOCK + r"proj")


def num_trunk_blocks(model: nn.Module) -> int:
    """Return the number of Hiera blocks in `model` (a Sam2Model or a PeftModel around one)."""
    indices = {int(m.group(1)) for name, _ in model.named_modules() if (m := re.search(_BLOCK, name))}
    return max(indices) + 1 if indices else 0


def select_blocks(blocks: str | Sequence[int] | None, num_blocks: int) -> list[int]:
    """Turn a block selection into sorted block indices.

    Args:
        blocks: `None` or `"all"` for every block, `"last:N"` / `"first:N"` for a slice, or explicit indices
            (negative indices count from the end, as in Python).
        num_blocks: the number of Hiera blocks in the model.

    Example:
        >>> select_blocks("last:2", 12)
        [10, 11]
    """
    if blocks is None or blocks == "all":
        return list(range(num_blocks))
    if isinstance(blocks, str):
        match = re.fullmatch(r"(first|last):(\d+)", blocks.strip())
        if match is None:
            raise ValueError(f"blocks={blocks!r} is not understood; use 'all', 'last:N', 'first:N' or a list of ints.")
        count = int(match.group(2))
        if not 1 <= count <= num_blocks:
            raise ValueError(f"blocks={blocks!r}: N must be between 1 and {num_blocks}, the model's Hiera block count.")
        return list(range(num_blocks - count, num_blocks)) if match.group(1) == "last" else list(range(count))
    selected = set()
    for index in blocks:
        if not -num_blocks <= int(index) < num_blocks:
            raise ValueError(f"blocks={list(blocks)!r}: index {index} is out of range for {num_blocks} Hiera blocks.")
        selected.add(int(index) % num_blocks)
    if not selected:
        raise ValueError("blocks=[] selects no Hiera block; pass None for all of them.")
    return sorted(selected)


def split_targets(targets: str | Iterable[str]) -> list[str]:
    """Split `"trunk.qkv+decoder.attn"` (or a comma-separated string, or a list) into its parts."""
    parts = re.split(r"[+,]", targets) if isinstance(targets, str) else list(targets)
    parts = [part.strip() for part in parts if part.strip()]
    if not parts:
        raise ValueError("targets is empty; use a preset such as 'trunk.qkv' or module-name regexes.")
    return parts


def resolve_targets(
    model: nn.Module,
    targets: str | Iterable[str] = "trunk.qkv",
    blocks: str | Sequence[int] | None = None,
) -> list[str]:
    """Resolve presets and module-name regexes to the exact names of the `nn.Linear` modules to adapt.

    Args:
        model: a `Sam2Model`.
        targets: presets (`trunk.qkv`, `trunk.attn`, `trunk.mlp`, `trunk.all`, `decoder.attn`, `decoder.all`),
            combinable with `+` or as a list; anything else is a full-match regex over module names.
        blocks: Hiera block selection for the trunk presets and regexes (see `select_blocks`); decoder modules are
            never filtered by it.

    Returns:
        Sorted module names, each an `nn.Linear`.

    Example:
        >>> resolve_targets(load_sam2("tiny-random"), "trunk.qkv", blocks="last:1")
        ['vision_encoder.backbone.blocks.7.attn.qkv']
    """
    selected = set(select_blocks(blocks, num_trunk_blocks(model)))
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    resolved: set[str] = set()
    for part in split_targets(targets):
        is_preset = part in PRESETS
        pattern = re.compile(PRESETS[part] if is_preset else part)
        matched = []
        for name in linear_names:
            if not pattern.fullmatch(name):
                continue
            block = re.match(_BLOCK, name)
            if block is not None and int(block.group(1)) not in selected:
                continue
            matched.append(name)
        if not matched:
            raise ValueError(
                f"targets={part!r} matched no nn.Linear module (blocks={blocks!r}); use a preset "
                f"({', '.join(PRESETS)}) or a full-match regex: Hiera attention looks like "
                f"'{TRUNK_BLOCKS}.0.attn.qkv', the decoder's like 'mask_decoder.transformer.layers.0.self_attn.q_proj'."
            )
        trapped = [name for name in matched if _STAGE_CHANGE_PROJ.fullmatch(name)]
        if trapped and not is_preset:
            raise ValueError(
                f"targets={part!r} matched the block-level `proj` of stage-change blocks ({', '.join(trapped)}), which "
                "projects the residual to a new width and exists in only some blocks. For the attention output use "
                "'trunk.attn' or a pattern ending in 'attn\\.proj'; to include these projections on purpose use "
                "'trunk.all'."
            )
        resolved.update(matched)
    return sorted(resolved)
