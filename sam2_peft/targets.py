"""Named PEFT target presets and image-encoder block selection, resolved to exact module names.

Presets resolve against the model at hand, so a typo or a preset that matches nothing fails before PEFT runs:

    resolve_targets(model, "trunk.qkv", blocks="last:4")
    # ['vision_encoder.backbone.blocks.8.attn.qkv', ..., 'vision_encoder.backbone.blocks.11.attn.qkv']

The trunk presets mean the same layers in every encoder of the family (`family.image_trunk`): `trunk.qkv` is Hiera's
`attn.qkv` and the ViT's (SAM3) `attention.{q,k,v}_proj`; `trunk.mlp` is their MLPs and RepViT's (EdgeTAM) 1x1
channel-mixer convolutions. RepViT has no attention, so `trunk.qkv` and `trunk.attn` fail there with the way out.

The memory presets adapt a `Sam2VideoModel`'s memory path (`load_sam2(name, video=True)`) and fail on image models:
`memory.attn` is the memory-attention layers' self- and cross-attention projections, `memory.all` every nn.Linear of
the memory attention, the memory encoder (its fuser's pointwise layers) and the object-pointer projections. Neither
takes the memory encoder's convolutions: its mask downsampler maps 1 -> 4 -> 16 -> 64 channels, where a rank-8
update is nearly full rank, its fuser's token mixers are depthwise (which LoRA cannot adapt at a useful rank), and
leaving convolutions out keeps the presets usable by every PEFT tuner (VeRA and FourierFT adapt nn.Linear only).
Train those convolutions with the `memory` strategy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from sam2_peft.errors import UserError
from sam2_peft.family import Trunk, image_trunk
from sam2_peft.segmenter import base_sam2

TRUNK_PRESETS = ("trunk.qkv", "trunk.attn", "trunk.mlp", "trunk.all")
# Full-match regexes over module names.
DECODER_PRESETS = {
    "decoder.attn": r"mask_decoder\.transformer\..*\.[qkvo]_proj",
    "decoder.all": r"mask_decoder\..*",
}
# The video model's memory path; module names as in transformers' `Sam2VideoModel`.
MEMORY_PRESETS = {
    "memory.attn": r"memory_attention\.layers\.\d+\.(?:self_attn|cross_attn_image)\.[qkvo]_proj",
    "memory.all": r"(?:memory_attention|memory_encoder|object_pointer_proj)\..+"
                  r"|temporal_positional_encoding_projection_layer",
}
PRESET_NAMES = TRUNK_PRESETS + tuple(DECODER_PRESETS) + tuple(MEMORY_PRESETS)


class VideoModelRequiredError(UserError, ValueError):
    """Raised when a strategy or target needs the video model's memory modules and got an image model."""


def is_video_model(model: nn.Module) -> bool:
    """Whether `model` (a family model or a PeftModel around one) has SAM2's video memory path (`Sam2VideoModel`)."""
    return hasattr(base_sam2(model), "memory_attention")


def require_video_model(model: nn.Module, what: str) -> None:
    """Raise `VideoModelRequiredError` naming `what` unless `model` is a video model.

    Args:
        model: a family model or a PeftModel around one.
        what: what asked for the memory path, e.g. "strategy='memory'" or "targets='memory.attn'".
    """
    if not is_video_model(model):
        raise VideoModelRequiredError(
            f"{what} adapts SAM2's video memory path (memory attention, memory encoder, object pointers), which "
            f"{type(base_sam2(model)).__name__} does not have. Load the video model: `load_sam2(name, video=True)` "
            "(on the command line: `--task video`)."
        )


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
    r"""Split `"trunk.qkv+decoder.attn"` (or a comma-separated string, or a list) into its parts.

    In a string, a `+` or `,` between two regexes belongs to them (`.*blocks\.\d+\.proj` stays whole); it separates
    parts next to a preset name. A list keeps its parts as they are (for several regexes holding `+` or `,`).

    Example:
        >>> split_targets(r"trunk.qkv+.*blocks\.\d+\.mlp\.proj_in")
        ['trunk.qkv', '.*blocks\\.\\d+\\.mlp\\.proj_in']
    """
    parts = _split_at_presets(targets) if isinstance(targets, str) else list(targets)
    parts = [part.strip() for part in parts if part.strip()]
    if not parts:
        raise ValueError("targets is empty; use a preset such as 'trunk.qkv' or module-name regexes.")
    return parts


def _split_at_presets(targets: str) -> list[str]:
    pieces = re.split(r"([+,])", targets)  # text, separator, text, ...
    parts = [pieces[0]]
    for separator, piece in zip(pieces[1::2], pieces[2::2]):
        before, after = parts[-1].strip(), piece.strip()
        if before and after and before not in PRESET_NAMES and after not in PRESET_NAMES:
            parts[-1] += separator + piece  # a regex's own quantifier or repetition count
        else:
            parts.append(piece)
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
    """A `(name) -> bool` for one target part: a trunk preset (names inside blocks), a decoder or memory preset, or a
    regex."""
    if part in TRUNK_PRESETS:
        if part not in trunk.presets:
            raise ValueError(f"targets={part!r}: {trunk.missing[part]}")
        local = re.compile(trunk.presets[part])

        def inside_blocks(name: str) -> bool:
            where = trunk.locate(name)
            return where is not None and local.fullmatch(where[1]) is not None

        return inside_blocks
    return re.compile({**DECODER_PRESETS, **MEMORY_PRESETS}.get(part, part)).fullmatch


def resolve_targets(
    model: nn.Module,
    targets: str | Iterable[str] = "trunk.qkv",
    blocks: str | Sequence[int] | None = None,
) -> list[str]:
    """Resolve presets and module-name regexes to the exact names of the layers to adapt.

    Args:
        model: a `Sam2Model`, `Sam3TrackerModel`, `EdgeTamModel` or `Sam2VideoModel`.
        targets: presets (`trunk.qkv`, `trunk.attn`, `trunk.mlp`, `trunk.all`, `decoder.attn`, `decoder.all`, and on
            a `Sam2VideoModel` `memory.attn`, `memory.all`), combinable with `+` or as a list; anything else is a
            full-match regex over module names.
        blocks: image-encoder block selection for the trunk presets and regexes (see `select_blocks`); decoder and
            memory modules are never filtered by it (pick memory-attention layers with a regex instead).

    Returns:
        Sorted module names, each an `nn.Linear` (or, in EdgeTAM's RepViT blocks, an ungrouped `nn.Conv2d`).

    Example:
        >>> resolve_targets(load_sam2("tiny-random"), "trunk.qkv", blocks="last:1")
        ['vision_encoder.backbone.blocks.7.attn.qkv']
    """
    trunk = model_trunk(model)
    selected = set(select_blocks(blocks, len(trunk.blocks)))
    parts = split_targets(targets)
    for part in parts:
        if part in MEMORY_PRESETS:
            require_video_model(model, f"targets={part!r}")
    candidates = [name for name, module in model.named_modules() if is_adaptable(trunk, name, module)]
    resolved: set[str] = set()
    for part in parts:
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
