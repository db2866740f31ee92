"""`hiera_block` (fused attention on the windows) against `Sam2MultiScaleBlock.forward`, forward and backward."""

import pytest
import torch

from sam2_peft.models import load_sam2
from sam2_peft.speed.hiera import fuses, hiera_block


@pytest.mark.parametrize("size", [64, 60])  # 60: the windows of every stage need padding
def test_every_block_matches_transformers(size):
    blocks = load_sam2("tiny-random").vision_encoder.backbone.blocks
    hidden = torch.randn(2, size, size, 24, generator=torch.Generator().manual_seed(0))
    for index, block in enumerate(blocks):  # window, stage-change (q-pool) and global blocks
        ours_in, ref_in = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        ours, expected = hiera_block(block, ours_in), block(ref_in)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5, msg=f"block {index}")
        weights = torch.randn_like(expected)
        ours_grads = torch.autograd.grad((ours * weights).sum(), [ours_in, *block.parameters()])
        ref_grads = torch.autograd.grad((expected * weights).sum(), [ref_in, *block.parameters()])
        for ours_grad, ref_grad in zip(ours_grads, ref_grads, strict=True):
            torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-4, atol=1e-5, msg=f"block {index}")
        hidden = expected.detach()


def test_a_block_with_hooks_is_not_fused():
    block = load_sam2("tiny-random").vision_encoder.backbone.blocks[0]
    assert fuses(block)
    handle = block.attn.register_forward_hook(lambda *args: None)
    assert not fuses(block)
    handle.remove()
    block.register_forward_pre_hook(lambda *args: None)
    assert not fuses(block)
