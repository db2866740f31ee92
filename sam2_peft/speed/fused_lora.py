"""A LoRA linear layer that adds its low-rank update in place: two fewer output-sized tensors per adapted layer.

PEFT's `lora.Linear` computes `result = result + lora_B(lora_A(x)) * scaling`, which writes two extra tensors of
the layer's output size (`lora_B`'s output scaled, then the sum). In Hiera's first stages outputs are large (the
first stage-change `qkv` at 1024 px: 65,536 tokens x 576 channels, 144 MB), so those passes over memory cost 8-12%
of a LoRA training step on CPU (hiera-tiny, 1024 px). `InPlaceLoraLinear` folds the update into the base output
with one `addmm_` instead. It has the same parameters, state dict, saving, merging and gradients as PEFT's layer,
which it falls back to for everything but plain LoRA (DoRA and other variants, dropout, a bias on B, mixed-adapter
batches, merged or disabled adapters). It also lowers LoRA's peak where that is the first stage-change block's
backward (whole-block gradient checkpointing): 745 MB instead of PEFT's 841 MB (hiera-tiny, 1024 px, 4 objects,
freed memory returned to the OS).

`apply_strategy` registers it for every LoRA config through PEFT's custom-module API
(`LoraConfig._register_custom_module`); an adapter saved from it is an ordinary PEFT LoRA adapter. The `reference`
backend (`sam2_peft.speed.select_backend`) turns the in-place update off (`in_place = False` on each layer), so that
the layer runs exactly PEFT's `lora.Linear.forward`.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class InPlaceLoraLinear(LoraLinear):
    """PEFT's `lora.Linear`, with the plain-LoRA update added in place to the base layer's fresh output.

    Attributes:
        in_place: whether plain LoRA takes the in-place path; False runs PEFT's forward (the reference).
    """

    in_place = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self._in_place_applies():
            return super().forward(x, *args, **kwargs)
        # The base layer runs on a 2-D view of `x`, so that its output is a fresh tensor and not a view: autograd
        # turns an in-place update of a view into `CopySlices`, whose backward clones the output-sized gradient.
        rows = x.reshape(-1, x.shape[-1])
        flat = self.base_layer(rows)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a = self.lora_A[name]
            hidden = lora_a(self._cast_input_dtype(rows, lora_a.weight.dtype))
            # The scaling goes into B (out x r, small): it may be a tensor (hotswap-ready adapters), which `alpha=`
            # would turn into a graph break under torch.compile.
            update = (self.lora_B[name].weight * self.scaling[name]).t().to(flat.dtype)
            # Linear's backward does not need its output, so updating it in place is safe for autograd.
            flat.addmm_(hidden.to(flat.dtype), update)
        return flat.view(*x.shape[:-1], flat.shape[-1])

    def _in_place_applies(self) -> bool:
        if not self.in_place or self.disable_adapters or self.merged:
            return False
        return all(
            name not in self.lora_variant
            and isinstance(self.lora_dropout[name], nn.Identity)
            and self.lora_B[name].bias is None
            for name in self.active_adapters
            if name in self.lora_A
        )
