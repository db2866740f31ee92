"""Activation checkpointing for training: recompute activations in backward instead of storing them.

    model = apply_strategy(load_sam2("tiny-random"), "lora")
    enable_gradient_checkpointing(model)        # --gradient_checkpointing

`Sam2Model` does not support `gradient_checkpointing_enable()`, but its Hiera blocks (and `Sam3TrackerModel`'s ViT
layers) are transformers' `GradientCheckpointingLayer`s: with `gradient_checkpointing = True` and a
`_gradient_checkpointing_func` set, a block in training mode with autograd on runs its `forward` through that
function. Submodules, and so PEFT's adapter layers and their hooks, stay inside the recomputed region, so it works
on PEFT-wrapped models too; a block's own hooks (FSDP2's) run once, outside. `EdgeTamModel`'s timm blocks get the
same two attributes, which `family.run_block` honours (their own hooks run inside the checkpoint there). The mask
decoder gets the same two attributes, which `Sam2Segmenter` honours: it runs the decoder `objects_per_checkpoint`
objects at a time, each group its own checkpoint, so the decoder's submodules run a number of times that depends on
the batch; under FSDP keep them out of their own units (`recipes/accelerate/fsdp.yaml` leaves the decoder in the
root unit), or the processes' all-gathers fall out of step (and a decoder with hooks runs as transformers' slower
forward, see `speed.decoder.decode_masks`). bf16 autocast needs nothing here: the training loop runs the forward
under `accelerator.autocast()`, and non-reentrant checkpointing replays each region under the same autocast state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from sam2_peft.family import image_trunk
from sam2_peft.segmenter import base_sam2, model_device
from sam2_peft.speed import Backend, select_backend

# The strips are a fast path (the backend picks them); `checkpoint_whole` is also the decoder's checkpoint here.
from sam2_peft.speed.strips import checkpoint_in_strips, checkpoint_whole  # noqa: F401 (re-exported)


def hiera_blocks(model: nn.Module) -> list[nn.Module]:
    """The image encoder's blocks (Hiera's; SAM3's ViT layers, EdgeTAM's RepViT blocks) of a family model or of the
    PeftModel around one."""
    return image_trunk(base_sam2(model).vision_encoder).blocks


def enable_gradient_checkpointing(
    model: nn.Module,
    blocks: str = "trainable",
    decoder: bool = True,
    strips: int = 4,
    objects_per_checkpoint: int = 1,
    backend: str | Backend = "auto",
) -> int:
    """Recompute activations during backward instead of storing them (less memory, more compute).

    Args:
        model: a `Sam2Model` or the PeftModel from `apply_strategy`; it must be in training mode for the switch to
            act (`model.train()`, as the training loop does).
        blocks: which encoder blocks. "trainable" checkpoints the blocks from the first one that trains (or that
            receives a trainable input) on; the frozen blocks before it store no activations anyway. "all"
            checkpoints every block. A block's recompute costs about a third of its forward and backward.
        decoder: also checkpoint the mask decoder, `objects_per_checkpoint` objects at a time
            (`checkpoint_per_object`), in `Sam2Segmenter` (a direct `Sam2Model.forward` does not). The decoder
            runs once per object and stores about 70 MB per object at 1024 px (the two-way layers' image tokens, the
            upscaling's 4x and 16x larger maps); checkpointed, the forward keeps only each object's prompts and
            outputs, and the backward holds one checkpoint's activations at a time. The recompute adds one decoder
            forward.
        strips: run each windowed block (Hiera's, or SAM3's ViT layers) as up to this many horizontal strips of
            whole windows, each its own checkpoint (`checkpoint_in_strips`), so that a block's backward holds one
            strip's activations; 1 checkpoints whole blocks. Global-attention blocks, and blocks without windows
            (EdgeTAM's), are always whole. At hiera-tiny, 1024 px, 4 strips
            lower full fine-tuning's peak from 1149 to 817 MB and LoRA's from 760 to 496 MB (freed memory
            returned) and make steps 5-12% faster on CPU (smaller working sets); gradients differ from whole blocks
            only by the order of sums over tokens.
        objects_per_checkpoint: objects per decoder checkpoint; more run the decoder in bigger batches (fewer,
            larger kernels on a GPU) and hold more at once in backward.
        backend: `--backend` ("auto" by the model's device; see `sam2_peft.speed`): the `reference` backend
            checkpoints whole blocks (transformers' own checkpointing), whatever `strips` says.

    Returns:
        The number of modules now checkpointed: encoder blocks, plus 1 for the mask decoder.

    Example:
        >>> model = apply_strategy(load_sam2("tiny-random"), "lora")
        >>> enable_gradient_checkpointing(model)
        9
    """
    if blocks not in ("trainable", "all"):
        raise ValueError(f"blocks={blocks!r} is unknown; use 'trainable' or 'all'.")
    if strips < 1 or objects_per_checkpoint < 1:
        raise ValueError(f"strips={strips} and objects_per_checkpoint={objects_per_checkpoint} must be at least 1.")
    backend = select_backend(backend, model_device(model))
    trunk = image_trunk(base_sam2(model).vision_encoder)
    modules = trunk.blocks
    start = 0
    if blocks == "trainable":
        first = trunk.first_trainable()
        start = len(modules) if first is None else first
    for index, block in enumerate(modules):
        window_size = getattr(block, "window_size", 0)  # 0 for global attention and for blocks without windows
        block.gradient_checkpointing = index >= start
        block._gradient_checkpointing_func = backend.block_checkpoint(window_size, strips)
    # Gradients reach the decoder whenever anything trains: everything that trains feeds it.
    mask_decoder = base_sam2(model).mask_decoder
    mask_decoder.gradient_checkpointing = decoder
    mask_decoder._gradient_checkpointing_func = partial(
        checkpoint_per_object, objects_per_checkpoint=objects_per_checkpoint
    )
    return len(modules) - start + int(decoder)


def checkpoint_per_object(
    function: Callable[..., tuple[torch.Tensor, ...]],
    images: Sequence,
    objects: Sequence[torch.Tensor],
    *,
    objects_per_checkpoint: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Run `function(*images, *objects)` as one checkpoint per group of objects and concatenate its outputs.

    Objects are independent in the mask decoder, so the groups' outputs are exactly the rows of one whole run. The
    images' tensors are shared by every group (saved once); each group's slice of `objects` and its outputs are
    all the forward keeps, and the backward recomputes and holds one group at a time.

    Args:
        function: returns a tuple of tensors whose first dimension is the objects'.
        images: per-image inputs (tensors, or structures of them), passed whole to every group.
        objects: per-object inputs, split along their first dimension.
        objects_per_checkpoint: the group size.
    """
    count = objects[0].shape[0]
    if count == 0:
        raise ValueError("checkpoint_per_object got no objects; every batch needs at least one object.")
    groups = [
        checkpoint_whole(function, *images, *(tensor[start : start + objects_per_checkpoint] for tensor in objects))
        for start in range(0, count, objects_per_checkpoint)
    ]
    return groups[0] if len(groups) == 1 else tuple(torch.cat(parts) for parts in zip(*groups))


def checkpointable_modules(model: nn.Module) -> list[nn.Module]:
    """The encoder blocks and the mask decoder: what `enable_gradient_checkpointing` marks."""
    return [*hiera_blocks(model), base_sam2(model).mask_decoder]


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Store activations again (undo `enable_gradient_checkpointing`)."""
    for module in checkpointable_modules(model):
        module.gradient_checkpointing = False


def is_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether any encoder block or the mask decoder is checkpointed."""
    return any(getattr(module, "gradient_checkpointing", False) for module in checkpointable_modules(model))
