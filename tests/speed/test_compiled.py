"""The `cuda` backend's compiled regions on CPU (`aot_eager`: dynamo's graphs and autograd, no C++ compiler)
against eager: outputs, gradients, and a number of graphs that stays bounded."""

import torch
from transformers import Sam2Model

from sam2_peft.models import load_sam2
from sam2_peft.presets import tiny_random_config
from sam2_peft.speed import CudaBackend
from sam2_peft.speed.compiled import BucketedDecoder, CompiledBlocks, object_bucket
from sam2_peft.speed.decoder import decode_masks
from sam2_peft.speed.hiera import hiera_block
from speed_helpers import assert_same, training_forward


def test_object_buckets():
    assert [object_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64, 65, 129)] == [
        1, 2, 4, 4, 8, 8, 16, 64, 64, 128, 192]


def block_kind(block, hidden) -> tuple:
    return block.dim, block.dim_out, block.window_size, tuple(block.query_stride or ()), tuple(hidden.shape)


def test_one_compiled_function_serves_blocks_of_the_same_kind(fresh_dynamo):
    """Ten blocks, of which three (stage 2's windowed ones) are one kind: eight graphs, and none more on a rerun."""
    config = tiny_random_config()
    config.vision_config.backbone_config.blocks_per_stage = [1, 2, 5, 2]
    config.vision_config.backbone_config.global_attention_blocks = [6]
    torch.manual_seed(0)
    blocks = Sam2Model(config).vision_encoder.backbone.blocks
    compiled = CompiledBlocks("aot_eager")
    hidden = torch.randn(1, 32, 32, 24, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ours, expected, kinds = hidden, hidden, set()
    for block in blocks:
        kinds.add(block_kind(block, ours))
        ours, expected = compiled(block, ours), block(expected)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert fresh_dynamo["stats"]["unique_graphs"] == len(kinds) == 8 < len(blocks)
    ours_grads = torch.autograd.grad(ours.square().sum(), [hidden, *blocks.parameters()])
    ref_grads = torch.autograd.grad(expected.square().sum(), [hidden, *blocks.parameters()])
    for ours_grad, ref_grad in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-4, atol=1e-5)
    compiled(blocks[5], torch.randn(1, 8, 8, 96, requires_grad=True))  # block 4's kind: compiled already
    assert fresh_dynamo["stats"]["unique_graphs"] == 8


def test_bucketed_decoder_matches_eager_with_few_graphs(fresh_dynamo, tiny_batch):
    """Object counts 1, 3, 4, 5: buckets 1, 4, 4, 8 (three graphs); padded rows change nothing, gradients included."""
    from sam2_peft.segmenter import Sam2Segmenter

    sam = load_sam2("tiny-random").train()
    segmenter = Sam2Segmenter(sam, backend="cpu")
    with torch.no_grad():
        features = segmenter.project(segmenter.encode_images(tiny_batch["pixel_values"]))
    backend = segmenter.backend_for(torch.device("cpu"))
    images = backend.decoder_images(sam, *features, mask_prompts=False)
    sparse, _ = sam.prompt_encoder(input_points=tiny_batch["point_coords"][:, None],
                                   input_labels=tiny_batch["point_labels"][:, None], input_boxes=None, input_masks=None)
    compiled = BucketedDecoder(decode_masks, "aot_eager")
    for count in (1, 3, 4, 5):
        index = torch.arange(count) % 2
        rows = sparse[torch.arange(count) % 3]
        ours = compiled(sam, images, index, rows, grid=(16, 16))
        expected = decode_masks(sam, images, index, rows, grid=(16, 16))
        for name, value, reference in zip(("masks", "iou", "objects"), ours, expected, strict=True):
            assert value.shape == reference.shape
            torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5, msg=f"{count} objects: {name}")
        if count == 3:
            # Key biases get no true gradient (a softmax ignores what they add to all of a query's logits): what
            # they get is rounding noise, which another batch size sums differently; they are left out.
            names, params = zip(*[(name, p) for name, p in sam.mask_decoder.named_parameters()
                                  if not name.endswith("k_proj.bias")])
            ours_grads = torch.autograd.grad(sum(o.square().sum() for o in ours), params, allow_unused=True,
                                             retain_graph=True)  # `images` is shared with the eager run
            ref_grads = torch.autograd.grad(sum(o.square().sum() for o in expected), params, allow_unused=True)
            for name, ours_grad, ref_grad in zip(names, ours_grads, ref_grads, strict=True):
                if ref_grad is not None:  # objects sum into the weights' gradients in another order
                    atol = 1e-4 * ref_grad.abs().max().item()
                    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=atol, msg=name)
    assert fresh_dynamo["stats"]["unique_graphs"] == 3


def test_cuda_backend_matches_reference(tiny_batch, fresh_dynamo):
    """The whole GPU path on CPU: compiled fused blocks, in-place LoRA under compile, the bucketed decoder (with
    mask prompts, so per-object dense embeddings are padded too)."""
    mask_inputs = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    batch = {**tiny_batch, "mask_inputs": mask_inputs}
    options = {"init_lora_weights": False}
    ours = training_forward(CudaBackend(compiler="aot_eager"), "lora", batch, **options)
    assert fresh_dynamo["stats"]["unique_graphs"] >= 9  # eight block kinds and the decoder ran compiled
    assert_same(ours, training_forward("reference", "lora", batch, **options))


def test_fused_blocks_without_compile_match(tiny_batch):
    backend = CudaBackend(compile_blocks=False, compile_decoder=False)
    assert backend._block is hiera_block
    assert_same(training_forward(backend, "full", tiny_batch), training_forward("reference", "full", tiny_batch))
