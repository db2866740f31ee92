import pytest
import torch

from sam2_peft.speed.decoder import decode_masks, decoder_images
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import Sam2Segmenter, combine_prompts
from sam2_peft.strategies import apply_strategy

GRID = (16, 16)  # tiny-random's image tokens at 256 px


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
@pytest.mark.parametrize("path", ["shared first layer", "hooked decoder", "mask prompts"])
def test_decode_masks_is_transformers_decoder(image_index, multimask_output, training, path):
    """Outputs and gradients (weights and all inputs) of `Sam2MaskDecoder.forward`. Without mask prompts the first
    layer's image side is made once per image; with mask prompts everything is per object; a decoder with a hook
    (accelerate's, an FSDP unit's; here any) runs as transformers' forward, so the hook runs. One image takes the
    broadcast path, several `index_select`; outside training, one mask is chosen by stability, as transformers."""
    sam = load_sam2("tiny-random").train(training)
    sam.mask_decoder.dynamic_multimask_via_stability = True
    sam.prompt_encoder.requires_grad_(True)
    calls = []
    if path == "hooked decoder":
        sam.mask_decoder.register_forward_pre_hook(lambda *args: calls.append(1))
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
    assert len(calls) == (path == "hooked decoder")
    masks_per_object = 3 if multimask_output else 1
    assert outputs[0].shape == (len(image_index), masks_per_object, 64, 64)
    for ours, theirs, name in zip(outputs, expected, ["masks", "iou_scores", "object_score_logits"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)
    # The same parameters get gradients (also the unused mask tokens' MLPs: zeros, as in transformers, so that DDP
    # sees every parameter used; and the no-mask embedding), and the gradients agree to float rounding of their scale.
    assert grads.keys() == expected_grads.keys() and {f"input{i}" for i in range(len(inputs))} <= grads.keys()
    assert ("prompt_encoder.no_mask_embed.weight" in grads) == (path != "mask prompts")
    for name, grad in expected_grads.items():
        # Softmax ignores a key bias: its true gradient is zero and both sides hold rounding noise (~1e-6, more or
        # less by the thread count), judged at the scale of the same projection's weight gradient.
        scale = expected_grads[name.removesuffix("bias") + "weight"] if name.endswith("k_proj.bias") else grad
        atol = 2e-5 * scale.abs().max().item() + 2e-6
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=atol, msg=name)


def test_decode_masks_wants_dense_exactly_without_a_shared_first_layer():
    sam = load_sam2("tiny-random")
    image_index = torch.tensor([0, 0])
    feat_s0, feat_s1, embeddings, sparse, dense, _ = decoder_inputs(sam, image_index, masks=False)
    for mask_prompts, given in [(False, dense), (True, None)]:
        images = decoder_images(sam, feat_s0, feat_s1, embeddings, mask_prompts=mask_prompts)
        with pytest.raises(ValueError, match="pass `dense` exactly when `images.first_layer` is None"):
            decode_masks(sam, images, image_index, sparse, given, grid=GRID)


def test_adapter_dropout_in_the_first_layer_is_drawn_per_object():
    """LoRA dropout on the first layer's image-side projections must differ between objects, as in transformers:
    in training they are not shared; in evaluation (no dropout) they are."""
    model = apply_strategy(load_sam2("tiny-random"), "lora", targets="decoder.attn", dropout=0.1)
    sam = model.get_base_model()
    maps = [torch.randn(1, 8, 64, 64), torch.randn(1, 16, 32, 32), torch.randn(1, 64, *GRID)]
    assert decoder_images(sam.train(), *maps, mask_prompts=False).first_layer is None
    assert decoder_images(sam.eval(), *maps, mask_prompts=False).first_layer is not None
    plain = load_sam2("tiny-random").train()  # no adapter: nothing random, shared in training too
    assert decoder_images(plain, *maps, mask_prompts=False).first_layer is not None


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
