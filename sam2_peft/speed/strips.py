"""Checkpointing a windowed block in horizontal strips of whole windows (`cpu`, `cuda`; `reference`: whole blocks).

    block._gradient_checkpointing_func = partial(checkpoint_in_strips, window_size=8, strips=4)

`memory.enable_gradient_checkpointing` sets this on the blocks through the backend (`Backend.block_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_whole(function: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """Non-reentrant checkpointing (the recommended mode: it handles inputs without grad and keyword arguments)."""
    return checkpoint(function, *args, use_reentrant=False)


def checkpoint_in_strips(
    function: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor, *, window_size: int, strips: int
) -> torch.Tensor:
    """Checkpoint a windowed block as horizontal strips of whole windows, concatenated.

    Everything in such a block (Hiera's, or SAM3's ViT layer, whose rotary positions restart in every window) works
    window by window (attention, query pooling, which stays inside a window) or token by token (norms, projections,
    MLP), and windows are counted from the top-left corner with the padding at the bottom and right, so each strip
    of `rows` (a multiple of `window_size`) gives exactly its rows of the whole block's output. Each strip is its
    own checkpoint: the backward recomputes and holds one strip at a time. At 1024 px the first stage-change block's
    backward holds about 500 MB at once (its `qkv` output alone is 144 MB at hiera-tiny); four strips hold a quarter
    of that.

    Args:
        function: the block's forward (what `GradientCheckpointingLayer` passes), taking (B, H, W, C) tokens.
        hidden_states: the block's input.
        window_size: the block's attention window, in input tokens.
        strips: the most strips to cut; fewer when the map is fewer windows high.
    """
    windows = math.ceil(hidden_states.shape[1] / window_size)
    rows = window_size * math.ceil(windows / strips)
    outputs = [checkpoint_whole(function, part) for part in hidden_states.split(rows, dim=1)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
