"""Memory and speed switches for training: activation checkpointing, `torch.compile` of the decoder.

    model = apply_strategy(load_sam2("tiny-random"), "lora")
    enable_gradient_checkpointing(model)        # --gradient_checkpointing: recompute layer activations in backward
    compile_trainable(model)                    # --compile: compile the mask decoder in place

`Sam2Model` does not support `gradient_checkpointing_enable()`, but its Hiera blocks and the mask decoder's two-way
attention layers are transformers' `GradientCheckpointingLayer`s: with `gradient_checkpointing = True` and a
`_gradient_checkpointing_func` set, a layer in training mode with autograd on runs its `forward` through that
function. Module hooks (and so PEFT's adapter layers, which are submodules) stay inside the recomputed region, so it
works on PEFT-wrapped models too. bf16 autocast needs nothing here: the training loop runs the forward under
`accelerator.autocast()`, and non-reentrant checkpointing replays the layer under the same autocast state.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

from sam2_peft.segmenter import base_sam2


def hiera_blocks(model: nn.Module) -> nn.ModuleList:
    """The Hiera blocks of a `Sam2Model` or of the PeftModel around one."""
    return base_sam2(model).vision_encoder.backbone.blocks


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The mask decoder's two-way attention layers of a `Sam2Model` or of the PeftModel around one."""
    return base_sam2(model).mask_decoder.transformer.layers


def enable_gradient_checkpointing(model: nn.Module, blocks: str = "trainable", decoder: bool = True) -> int:
    """Recompute activations during backward instead of storing them (less memory, more compute).

    Args:
        model: a `Sam2Model` or the PeftModel from `apply_strategy`; it must be in training mode for the switch to
            act (`model.train()`, as the training loop does).
        blocks: which Hiera blocks. "trainable" checkpoints the blocks from the first one that trains (or that
            receives a trainable input) on; the frozen blocks before it store no activations anyway. "all"
            checkpoints every block. A block's recompute costs about a third of its forward and backward.
        decoder: also checkpoint the mask decoder's two-way attention layers. The decoder runs once per object, so
            what they store grows with the objects per image (about 12 MB per object and layer at 1024 px, of
            which checkpointing keeps the 4 MB input); the recompute adds about 15% to a decoder step on CPU.

    Returns:
        The number of layers now checkpointed (Hiera blocks, then decoder layers).

    Example:
        >>> model = apply_strategy(load_sam2("tiny-random"), "lora")
        >>> enable_gradient_checkpointing(model)
        10
    """
    if blocks not in ("trainable", "all"):
        raise ValueError(f"blocks={blocks!r} is unknown; use 'trainable' or 'all'.")
    modules = list(hiera_blocks(model))
    start = 0
    if blocks == "trainable":
        trains = [any(p.requires_grad for p in block.parameters()) for block in modules]
        stem_trains = any(
            p.requires_grad for name, p in base_sam2(model).vision_encoder.backbone.named_parameters()
            if not name.startswith("blocks.")
        )
        start = 0 if stem_trains else next((index for index, flag in enumerate(trains) if flag), len(modules))
    flags = [index >= start for index in range(len(modules))]
    # Gradients reach the decoder's layers whenever anything trains: everything that trains feeds the decoder.
    modules += list(decoder_layers(model))
    flags += [decoder] * len(decoder_layers(model))
    # Non-reentrant checkpointing: the recommended mode; it handles inputs without grad and keyword arguments.
    function = partial(checkpoint, use_reentrant=False)
    for module, flag in zip(modules, flags):
        module.gradient_checkpointing = flag
        module._gradient_checkpointing_func = function
    return sum(flags)


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Store activations again (undo `enable_gradient_checkpointing`)."""
    for module in [*hiera_blocks(model), *decoder_layers(model)]:
        module.gradient_checkpointing = False


def is_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether any Hiera block or decoder layer is checkpointed."""
    return any(module.gradient_checkpointing for module in [*hiera_blocks(model), *decoder_layers(model)])


def compile_trainable(model: nn.Module, **compile_options) -> list[str]:
    """Compile the mask decoder in place with `torch.compile` (`nn.Module.compile`), keeping parameter names.

    The decoder is what trains in every strategy and what runs on every step once image features are cached.
    Compiling in place (rather than `torch.compile(module)`, which wraps it in an `_orig_mod`) leaves state-dict
    keys, PEFT adapters and checkpoints unchanged. The number of objects per batch varies, so the first steps
    recompile once with dynamic shapes. Needs a C++ compiler on CPU (inductor); pass `backend="eager"` to test the
    plumbing without one.

    Args:
        model: a `Sam2Model` or the PeftModel from `apply_strategy`.
        **compile_options: passed to `torch.compile` (`mode="max-autotune"`, `backend=`, `dynamic=`...).

    Returns:
        Names of the compiled modules.
    """
    decoder = base_sam2(model).mask_decoder
    decoder.compile(**compile_options)
    return ["mask_decoder"]

