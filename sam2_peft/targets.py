"""Named PEFT target presets and image-encoder block selection, resolved to exact module names.

Presets resolve against the model at hand, so a typo or a preset that matches nothing fails before PEFT runs:

    resolve_targets(model, "trunk.qkv", blocks="last:4")
    # ['vision_encoder.backbone.blocks.8.attn.qkv', ..., 'vision_encoder.backbone.blocks.11.attn.qkv']

The trunk presets mean the same layers in every encoder of the family (`family.image_trunk`): `trunk.qkv` is Hiera's
`attn.qkv` and the ViT's (SAM3) `attention.{q,k,v}_proj`; `trunk.mlp` is their MLPs and RepViT's (EdgeTAM) 1x1
channel-mixer convolutions. RepViT has no attention, so `trunk.qkv` and `trunk.attn` fail there with the way out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from sam2_peft.family import Trunk, image_trunk
from sam2_peft.segmenter import base_sam2

TRUNK_PRESETS = ("trunk.qkv", "trunk.attn", "trunk.mlp", "trunk.all")
# Full-match regexes over module names.
DECODER_PRESETS = {
    "decoder.attn": r"mask_decoder\.transformer\..*\.[qkvo]_proj",
    "decoder.all": r"mask_decoder\..*",
}
PRESET_NAMES = TRUNK_PRESETS + tuple(DECODER_PRESETS)


def model_trunk(model: nn.Module) -> Trunk:
    """The image encoder's `Trunk` of a family model or of the PeftModel around one."""
    return image_trunk(base_sam2(model).vision_encoder)


def num_trunk_blocks(model: nn.Module) -> int:
    """Return the number of image-encoder blocks in `model` (a family model or a PeftModel around one)."""
    return len(model_trunk(model).blocks)


def select_blocks(blocks: str | Sequence[int] | None, num_blocks: int) -> list[int]:
    """Turn a block selection into sorted block indices.

    Args:
        blocks: `None` or `"all"` for every block, `"last:N"` / `"first:N"` for a slice, or explicit indices
            (negative indices count from the end, as in Python).
        num_blocks: the number of image-encoder blocks in the model.

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
            raise ValueError(f"blocks={blocks!r}: N must be between 1 and {num_blocks}, the model's block count.")
        return list(range(num_blocks - count, num_blocks)) if match.group(1) == "last" else list(range(count))
    selected = set()
    for index in blocks:
        if not -num_blocks <= int(index) < num_blocks:
            raise ValueError(f"blocks={list(blocks)!r}: index {index} is out of range for {num_blocks} encoder blocks.")
        selected.add(int(index) % num_blocks)
    if not selected:
        raise ValueError("blocks=[] selects no encoder block; pass None for all of them.")
    return sorted(selected)


def split_targets(targets: str | Iterable[str]) -> list[str]:
    """Split `"trunk.qkv+decoder.attn"` (or a comma-separated string, or a list) into its parts."""
    parts = re.split(r"[+,]", targets) if isinstance(targets, str) else list(targets)
    parts = [part.strip() for part in parts if part.strip()]
    if not parts:
        raise ValueError("targets is empty; use a preset such as 'trunk.qkv' or module-name regexes.")
    return parts


def is_adaptable(trunk: Trunk, name: str, module: nn.Module) -> bool:
    """An `nn.Linear`, or in a CNN trunk's blocks an ungrouped `nn.Conv2d`: what the target presets pick from."""
    if isinstance(module, nn.Linear):
        return True
    convolution = isinstance(module, nn.Conv2d) and module.groups == 1
    return convolution and trunk.adapts_convs and trunk.block_of(name) is not None


def trapped_names(trunk: Trunk, names: Iterable[str]) -> list[str]:
    """The names among `names` that are the trunk's `trap` layers (Hiera's stage-change `proj`)."""
    if trunk.trap is None:
        return []
    located = [(name, trunk.locate(name)) for name in names]
    return [name for name, where in located if where is not None and re.fullmatch(trunk.trap, where[1])]


def _matcher(trunk: Trunk, part: str):
    """A `(name) -> bool` for one target part: a trunk preset (names inside blocks), a decoder preset or a regex."""
    if part in TRUNK_PRESETS:
        if part not in trunk.presets:
            raise ValueError(f"targets={part!r}: {trunk.missing[part]}")
        local = re.compile(trunk.presets[part])

        def inside_blocks(name: str) -> bool:
            where = trunk.locate(name)
            return where is not None and local.fullmatch(where[1]) is not None

        return inside_blocks
    return re.compile(DECODER_PRESETS.get(part, part)).fullmatch


def resolve_targets(
    model: nn.Module,
    targets: str | Iterable[str] = "trunk.qkv",
    blocks: str | Sequence[int] | None = None,
) -> list[str]:
    """Resolve presets and module-name regexes to the exact names of the layers to adapt.

    Args:
        model: a `Sam2Model`, `Sam3TrackerModel` or `EdgeTamModel`.
        targets: presets (`trunk.qkv`, `trunk.attn`, `trunk.mlp`, `trunk.all`, `decoder.attn`, `decoder.all`),
            combinable with `+` or as a list; anything else is a full-match regex over module names.
        blocks: encoder block selection for the trunk presets and regexes (see `select_blocks`); decoder modules are
            never filtered by it.

    Returns:
        Sorted module names, each an `nn.Linear` (or, in EdgeTAM's RepViT blocks, an ungrouped `nn.Conv2d`).

    Example:
        >>> resolve_targets(load_sam2("tiny-random"), "trunk.qkv", blocks="last:1")
        ['vision_encoder.backbone.blocks.7.attn.qkv']
    """
    trunk = model_trunk(model)
    selected = set(select_blocks(blocks, len(trunk.blocks)))
    candidates = [name for name, module in model.named_modules() if is_adaptable(trunk, name, module)]
    resolved: set[str] = set()
    for part in split_targets(targets):
        matches = _matcher(trunk, part)
        matched = []
        for name in candidates:
            block = trunk.block_of(name)
            if matches(name) and (block is None or block in selected):
                matched.append(name)
        if not matched:
            raise ValueError(
                f"targets={part!r} matched no nn.Linear module (blocks={blocks!r}); use a preset "
                f"({', '.join(PRESET_NAMES)}) or a full-match regex: {trunk.name} layers look like "
                f"'{trunk.example}', the decoder's like 'mask_decoder.transformer.layers.0.self_attn.q_proj'."
            )
        trapped = trapped_names(trunk, matched)
        if trapped and part not in TRUNK_PRESETS:
            raise ValueError(
                f"targets={part!r} matched the block-level `proj` of stage-change blocks ({', '.join(trapped)}), which "
                "projects the residual to a new width and exists in only some blocks. For the attention output use "
                "'trunk.attn' or a pattern ending in 'attn\\.proj'; to include these projections on purpose use "
                "'trunk.all'."
            )
        resolved.update(matched)
    return sorted(resolved)
