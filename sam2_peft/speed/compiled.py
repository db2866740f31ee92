"""The `cuda` backend's compiled regions: Hiera blocks (one function, a graph per kind of block) and the mask decoder
at bucketed object counts.

    blocks = CompiledBlocks()                  # torch.compile(hiera_block), shared by every block
    hidden = blocks(block, hidden)             # compiled once per (width, window, stride, input shape)
    decode = BucketedDecoder(decode_masks)     # N objects padded to a bucket (1, 2, 4, ..., 64, 128, 192, ...)

Regional compilation: one `torch.compile` of `speed.hiera.hiera_block` serves every block. Its parameters are graph
inputs (dynamo inlines `nn.Module`s), so blocks that differ only in their weights share a graph; a new kind of block
(stage, window size, query stride) or a new input shape compiles a new one. hiera-large's 48 blocks are 8 kinds, so
its compile time is that of 8 blocks, not 48. The decoder's shapes follow the number of objects, which varies from
batch to batch: padded to a bucket, N takes few values, and each compiles once (static shapes, which CUDA graphs
and autotuning need). Padding repeats the last object; the padded rows' outputs are dropped, so they get no
gradient and add nothing to the weights'. Both raise dynamo's recompile limit (8 graphs per function) around their
calls, to `RECOMPILE_LIMIT`, so a model with more kinds does not fall back to eager silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sam2_peft.speed.hiera import hiera_block

RECOMPILE_LIMIT = 64
# Up to this many objects, buckets are powers of two; above, multiples of it.
BUCKET_STEP = 64


def object_bucket(count: int) -> int:
    """The padded object count: the next power of two up to `BUCKET_STEP`, then the next multiple of it."""
    if count <= BUCKET_STEP:
        return 1 << max(count - 1, 0).bit_length()
    return BUCKET_STEP * math.ceil(count / BUCKET_STEP)


class CompiledBlocks:
    """`hiera_block` under one `torch.compile`, called as `blocks(block, hidden)`.

    Args:
        compiler: `torch.compile`'s backend ("inductor" on GPU; "aot_eager" tests the forward and backward graphs
            on CPU without a C++ compiler).
        **options: more `torch.compile` options (`mode=`, `fullgraph=`...).
    """

    def __init__(self, compiler: str = "inductor", **options):
        self._forward = torch.compile(hiera_block, backend=compiler, dynamic=False, **options)

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._forward(block, hidden)


class BucketedDecoder:
    """A `decode_masks` function compiled with static shapes, on object counts padded to `object_bucket`.

    Args:
        decode: `speed.decoder.decode_masks` or `speed.reference.decode_masks` (same signature).
        compiler: `torch.compile`'s backend.
        **options: more `torch.compile` options.
    """

    def __init__(self, decode: Callable, compiler: str = "inductor", **options):
        options.setdefault("dynamic", False)
        self._decode = torch.compile(decode, backend=compiler, **options)

    def __call__(self, sam, images, image_index, sparse, dense=None, *, grid, multimask_output=True):
        count = image_index.shape[0]
        padding = object_bucket(count) - count
        image_index, sparse, dense = (pad_rows(tensor, padding) for tensor in (image_index, sparse, dense))
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            outputs = self._decode(sam, images, image_index, sparse, dense, grid=grid,
                                   multimask_output=multimask_output)
        return tuple(output[:count] for output in outputs)


def pad_rows(tensor: torch.Tensor | None, padding: int) -> torch.Tensor | None:
    """`tensor` with its last row repeated `padding` times along dimension 0 (None stays None)."""
    if tensor is None or padding == 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(padding, *tensor.shape[1:])])
