import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn
from transformers.models.sam2.modeling_sam2 import Sam2LayerNorm

from sam2_peft.speed.layers import (
    channel_norm,
    from_sub_pixel_order,
    has_hooks,
    pointwise_conv,
    sub_pixel_order,
    transposed_conv_2x2,
)


def test_has_hooks_sees_torch_and_accelerate_hooks():
    modules = [nn.Linear(2, 2) for _ in range(4)]
    modules[1].register_forward_pre_hook(lambda *args: None)
    modules[2].register_full_backward_hook(lambda *args: None)
    add_hook_to_module(modules[3], ModelHook())  # accelerate's way: it wraps `forward`, registers no torch hook
    assert [has_hooks(module) for module in modules] == [False, True, True, True]


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_is_the_convolution_and_calls_anything_else(channels_last):
    features = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    if channels_last:  # what the neck reads: Hiera's (B, H, W, C) tokens, permuted
        features = features.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    conv = torch.nn.Conv2d(16, 4, 1)
    out = pointwise_conv(conv, features)
    torch.testing.assert_close(out, conv(features), rtol=1e-5, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    no_bias = torch.nn.Conv2d(16, 4, 1, bias=False)
    torch.testing.assert_close(pointwise_conv(no_bias, features), no_bias(features), rtol=1e-5, atol=1e-6)
    wider = torch.nn.Conv2d(16, 4, 3, padding=1)  # not 1x1: called as it is
    torch.testing.assert_close(pointwise_conv(wider, features), wider(features), rtol=0, atol=0)
    seen = []
    conv.register_forward_hook(lambda *args: seen.append(1))  # a hook of its own: called, so the hook runs
    pointwise_conv(conv, features)
    assert seen == [1]


def test_sub_pixel_order_puts_each_pixels_children_together():
    maps = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    tokens = sub_pixel_order(maps, 2)  # a 2 x 3 grid, each token 4 x 4 pixels
    assert tokens.shape == (2, 6 * 16, 3)
    # token (i, j, a1, b1, a2, b2) is pixel (4i + 2a1 + a2, 4j + 2b1 + b2); its index is row-major over those.
    i, j, a1, b1, a2, b2 = 1, 2, 1, 0, 0, 1
    index = ((((i * 3 + j) * 2 + a1) * 2 + b1) * 2 + a2) * 2 + b2
    torch.testing.assert_close(tokens[1, index], maps[1, :, 4 * i + 2 * a1 + a2, 4 * j + 2 * b1 + b2])
    torch.testing.assert_close(sub_pixel_order(maps, 0), maps.flatten(2).transpose(1, 2))
    for level in (0, 1, 2):
        grid = (8 >> level, 12 >> level)
        assert torch.equal(from_sub_pixel_order(sub_pixel_order(maps, level), level, grid), maps)


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_conv_2x2_is_the_convolution(level, bias):
    conv = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2, bias=bias)
    maps = torch.randn(3, 8, 4 << level, 6 << level, generator=torch.Generator().manual_seed(level))
    tokens = transposed_conv_2x2(conv, sub_pixel_order(maps, level), level, (4, 6))
    torch.testing.assert_close(from_sub_pixel_order(tokens, level + 1, (4, 6)), conv(maps), rtol=1e-5, atol=1e-6)


def test_modules_that_are_not_plain_are_called():
    """A hook (accelerate's device hooks, say) or an adapter around a module must run, so it is called on the map."""
    maps = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    conv = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2)
    norm = Sam2LayerNorm(8, data_format="channels_first")  # the decoder's upscaling norm
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
    for module, call in [
        (conv, lambda m, t: from_sub_pixel_order(transposed_conv_2x2(m, t, 1, (4, 4)), 2, (4, 4))),
        (norm, lambda m, t: from_sub_pixel_order(channel_norm(m, t, 1, (4, 4)), 1, (4, 4))),
    ]:
        tokens = sub_pixel_order(maps, 1)
        plain = call(module, tokens)
        seen = []
        handle = module.register_forward_hook(lambda *args: seen.append(1))
        hooked = call(module, tokens)
        handle.remove()
        assert seen == [1]
        torch.testing.assert_close(hooked, module(maps), rtol=0, atol=0)
        torch.testing.assert_close(plain, hooked, rtol=1e-5, atol=1e-5)
