import pytest
import torch
from torch import nn
from transformers.models.sam2.modeling_sam2 import Sam2LayerNorm

from sam2_peft.mask_decoder import (
    channel_norm,
    decode_masks,
    decoder_images,
    from_sub_pixel_order,
    sub_pixel_order,
    transposed_conv_2x2,
)
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import Sam2Segmenter, combine_prompts
from sam2_peft.strategies import apply_strategy

GRID = (16, 16)  # tiny-random's image tokens at 256 px


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


def reference_decode(sam, feat_s0, feat_s1, embeddings, image_index, sparse, dense, multimask_output):
    """transformers' `Sam2MaskDecoder.forward` on per-object copies of the maps (the old `Sam2Segmenter.decode`)."""
    count = image_index.shape[0]
    masks, iou_scores, _, object_score_logits = sam.mask_decoder(
        image_embeddings=(embeddings + sam.no_memory_embedding.view(1, -1, 1, 1)).index_select(0, image_index),
        image_positional_embeddings=sam.get_image_wide_positional_embeddings().expand(count, -1, -1, -1),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        high_resolution_features=[feat_s0.index_select(0, image_index), feat_s1.index_select(0, image_index)],
    )
    return masks[:, 0], iou_scores[:, 0], object_score_logits[:, 0]


def decoder_inputs(sam, image_index, masks: bool):
    """Random FPN-like maps for `image_index.max() + 1` images, prompt embeddings for each object, and the leaf
    tensors among them. Without mask prompts `dense` is the no-mask embedding broadcast to every object and pixel
    (stride 0), as the prompt encoder returns it."""
    generator = torch.Generator().manual_seed(int(image_index.numel()))
    images = int(image_index.max()) + 1
    feat_s0 = torch.randn(images, 8, 64, 64, generator=generator, requires_grad=True)
    feat_s1 = torch.randn(images, 16, 32, 32, generator=generator, requires_grad=True)
    embeddings = torch.randn(images, 64, *GRID, generator=generator, requires_grad=True)
    count = image_index.shape[0]
    boxes = torch.rand(count, 2, 2, generator=generator).sort(dim=1).values.reshape(-1, 4) * 256
    coords, labels = combine_prompts(boxes=boxes)
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(coords[:, None], labels[:, None], None, None)
    sparse = sparse.detach().requires_grad_()
    leaves = [feat_s0, feat_s1, embeddings, sparse]
    if masks:
        dense = torch.randn(count, 64, *GRID, generator=generator, requires_grad=True)
        leaves.append(dense)
    else:
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(count, -1, *GRID)
    return feat_s0, feat_s1, embeddings, sparse, dense, leaves


@pytest.mark.parametrize("image_index", [[0, 0, 0], [1, 0, 1, 2]], ids=["one image", "three images"])
@pytest.mark.parametrize("multimask_output, training", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("path", ["shared first layer", "hooked first layer", "mask prompts"])
def test_decode_masks_is_transformers_decoder(image_index, multimask_output, training, path):
    """Outputs and gradients (weights and all inputs) of `Sam2MaskDecoder.forward`. Without mask prompts the first
    layer's image side is made once per image, unless that layer has hooks (an FSDP unit's, here any hook), which
    must see it called; with mask prompts everything is per object. One image takes the broadcast path, several
    `index_select`; outside training, one mask is chosen by stability, as transformers does."""
    sam = load_sam2("tiny-random").train(training)
    sam.mask_decoder.dynamic_multimask_via_stability = True
    sam.prompt_encoder.requires_grad_(True)
    calls = []
    if path == "hooked first layer":
        sam.mask_decoder.transformer.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    image_index = torch.tensor(image_index)
    feat_s0, feat_s1, embeddings, sparse, dense, inputs = decoder_inputs(sam, image_index, path == "mask prompts")
    weights = None

    def run(decode):
        nonlocal weights
        sam.zero_grad()
        for tensor in inputs:
            tensor.grad = None
        outputs = decode()
        if weights is None:
            generator = torch.Generator().manual_seed(5)
            weights = [torch.randn(out.shape, generator=generator) for out in outputs]
        sum((out * w).sum() for out, w in zip(outputs, weights)).backward()
        grads = {name: p.grad.clone() for name, p in sam.named_parameters() if p.grad is not None}
        grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs) if t.grad is not None})
        return outputs, grads

    expected, expected_grads = run(
        lambda: reference_decode(sam, feat_s0, feat_s1, embeddings, image_index, sparse, dense, multimask_output)
    )
    images = decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=path == "mask prompts")
    assert (images.first_layer is not None) == (path == "shared first layer")
    own_dense = None if path == "shared first layer" else dense
    calls.clear()
    outputs, grads = run(lambda: decode_masks(sam, images, image_index, sparse, own_dense, grid=GRID,
                                              multimask_output=multimask_output))
    assert len(calls) == (path == "hooked first layer")
    masks_per_object = 3 if multimask_output else 1
    assert outputs[0].shape == (len(image_index), masks_per_object, 64, 64)
    for ours, theirs, name in zip(outputs, expected, ["masks", "iou_scores", "object_score_logits"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)
    # The same parameters get gradients (also the unused mask tokens' MLPs: zeros, as in transformers, so that DDP
    # sees every parameter used; and the no-mask embedding), and the gradients agree to float rounding of their scale.
    assert grads.keys() == expected_grads.keys() and {f"input{i}" for i in range(len(inputs))} <= grads.keys()
    assert ("prompt_encoder.no_mask_embed.weight" in grads) == (path != "mask prompts")
    for name, grad in expected_grads.items():
        atol = 2e-5 * grad.abs().max().item() + 2e-6
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=atol, msg=name)


def test_decode_masks_wants_dense_exactly_without_a_shared_first_layer():
    sam = load_sam2("tiny-random")
    image_index = torch.tensor([0, 0])
    feat_s0, feat_s1, embeddings, sparse, dense, _ = decoder_inputs(sam, image_index, masks=False)
    for mask_prompts, given in [(False, dense), (True, None)]:
        images = decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=mask_prompts)
        with pytest.raises(ValueError, match="Pass `dense` exactly when `images` has no first layer"):
            decode_masks(sam, images, image_index, sparse, given, grid=GRID)


@pytest.mark.parametrize(
    "options",
    [{"targets": "decoder.attn", "init_lora_weights": False}, {"decoder": "full"}],
    ids=["LoRA in the decoder", "decoder in modules_to_save"],
)
def test_peft_decoders_run_their_adapters(options, tiny_batch):
    """The adapted decoder (LoRA layers in it, or PEFT's trainable copy of it) is what runs: the segmenter gives what
    the PeftModel's own `Sam2Model.forward` gives, and differs from the base model's decoder."""
    model = apply_strategy(load_sam2("tiny-random"), "lora", **options).eval()
    if "decoder" in options:  # the trained copy differs from the original
        with torch.no_grad():
            model.base_model.model.mask_decoder.modules_to_save["default"].upscale_conv2.bias.add_(1.0)
    pixel_values = tiny_batch["pixel_values"]
    boxes = torch.tensor([[[10.0, 20, 100, 120]], [[5.0, 6, 70, 80]]])
    coords, labels = combine_prompts(boxes=boxes.reshape(-1, 4))
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, input_boxes=boxes).pred_masks[:, 0]
        ours = Sam2Segmenter(model)(pixel_values, image_index=torch.tensor([0, 1]), point_coords=coords,
                                    point_labels=labels).mask_logits
        with model.disable_adapter():
            base = Sam2Segmenter(model)(pixel_values, image_index=torch.tensor([0, 1]), point_coords=coords,
                                        point_labels=labels).mask_logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3


def test_bf16_autocast_stays_close_to_transformers_decoder():
    sam = load_sam2("tiny-random").train()
    image_index = torch.tensor([0, 1])
    feat_s0, feat_s1, embeddings, sparse, dense, _ = decoder_inputs(sam, image_index, masks=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_decode(sam, feat_s0, feat_s1, embeddings, image_index, sparse, dense, True)
        images = decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=False)
        outputs = decode_masks(sam, images, image_index, sparse, grid=GRID)
    for ours, theirs in zip(outputs, expected, strict=True):
        assert ours.dtype == theirs.dtype
        scale = theirs.float().abs().max().item()
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=0.05 * scale)
