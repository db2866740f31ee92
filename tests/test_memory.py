from unittest import mock

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import Sam2Model

from sam2_peft.memory import (
    checkpoint_in_strips,
    checkpoint_per_object,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    hiera_blocks,
    is_gradient_checkpointing,
)
from sam2_peft.models import load_sam2
from sam2_peft.presets import tiny_random_config
from sam2_peft.segmenter import Sam2Segmenter, base_sam2
from sam2_peft.speed import strips as strips_module
from sam2_peft.speed.decoder import decode_masks
from sam2_peft.strategies import apply_strategy


def encoder_gradients(strategy: str, strips: int | None, autocast: bool = False, **options):
    """Gradients of a scalar of the encoder output (checkpointed in `strips`, or plain for None), the number of block
    forwards that went through the checkpointing function and the number of `checkpoint` calls they made."""
    torch.manual_seed(0)  # the same adapter initialisation for both runs
    model = apply_strategy(load_sam2("tiny-random"), strategy, **options).train()
    blocks, checkpoints = [], []
    if strips is not None:
        enable_gradient_checkpointing(model, strips=strips)
        for block in hiera_blocks(model):
            inner = block._gradient_checkpointing_func
            block._gradient_checkpointing_func = lambda *a, _inner=inner, **k: blocks.append(1) or _inner(*a, **k)
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with mock.patch.object(strips_module, "checkpoint", side_effect=lambda *a, **k: checkpoints.append(1) or checkpoint(*a, **k)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            features = base_sam2(model).vision_encoder(pixel_values).fpn_hidden_states
            loss = sum(level.float().square().mean() for level in features)
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return grads, len(blocks), len(checkpoints)


# tiny-random's 8 blocks, 4 strips: blocks 0-3 are 8 windows high (4 strips each), 5 and 6 two windows (2 strips),
# 4 and 7 attend globally (whole).
STRIPS = {1: 8, 4: 4 + 4 + 4 + 4 + 1 + 2 + 2 + 1}


@pytest.mark.parametrize("strips", [1, 4])
@pytest.mark.parametrize(
    "strategy, options, expected_blocks",
    [("full", {}, 8), ("lora", {"init_lora_weights": False}, 8), ("partial", {"num_blocks": 3}, 3)],
)
def test_checkpointed_blocks_give_the_same_gradients(strategy, options, expected_blocks, strips):
    """Whole blocks replay exactly; strips change only the order in which weight gradients sum over tokens."""
    plain, plain_blocks, _ = encoder_gradients(strategy, None, **options)
    checkpointed, blocks, checkpoints = encoder_gradients(strategy, strips, **options)
    assert plain_blocks == 0 and blocks == expected_blocks
    if strategy != "partial":
        assert checkpoints == STRIPS[strips]
    assert sorted(checkpointed) == sorted(plain) and len(plain) > 0
    for name, grad in plain.items():
        atol = 0 if strips == 1 else 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=atol, msg=name)


def relative_error(grads: dict, reference: dict) -> float:
    """The largest relative L2 error of any parameter's gradient."""
    return max(((grads[name] - grad).norm() / grad.norm()).item() for name, grad in reference.items())


def test_checkpointing_under_bf16_autocast_gives_the_same_gradients():
    """Whole blocks replay bf16 exactly; strips sum in another order, which bf16 shows, but are as close to the
    fp32 gradients as the plain bf16 run is."""
    plain, _, _ = encoder_gradients("full", None, autocast=True)
    whole, blocks, _ = encoder_gradients("full", 1, autocast=True)
    assert blocks == 8
    for name, grad in plain.items():
        torch.testing.assert_close(whole[name], grad, rtol=0, atol=0, msg=name)
    strips, _, checkpoints = encoder_gradients("full", 4, autocast=True)
    reference, _, _ = encoder_gradients("full", None)
    assert checkpoints == STRIPS[4]
    # bf16 keeps 8 bits of mantissa: small gradients come out a few tenths off (0.18 with 2 threads, 0.24 with 1);
    # a wrong gradient is off by 1 or more.
    assert relative_error(strips, reference) <= 1.1 * relative_error(plain, reference) < 0.5


def test_strips_are_whole_windows_from_the_top():
    heights = []
    tokens = torch.randn(2, 20, 5, 3, requires_grad=True)
    out = checkpoint_in_strips(lambda x: heights.append(x.shape[1]) or x * 2, tokens, window_size=3, strips=4)
    assert heights == [6, 6, 6, 2]  # 7 windows high (the last one padded): 2 windows per strip
    torch.testing.assert_close(out, tokens * 2, rtol=0, atol=0)
    heights.clear()
    checkpoint_in_strips(lambda x: heights.append(x.shape[1]) or x, tokens, window_size=32, strips=4)
    assert heights == [20]  # one window high


def test_strips_match_a_whole_block_with_padded_windows():
    """Windows of 6 on a 64-token map (the last row of windows padded), with and without a stage change, on a batch
    of two (so strips are not contiguous)."""
    config = tiny_random_config()
    config.vision_config.backbone_config.window_size_per_stage = [6, 4, 6, 4]
    torch.manual_seed(0)
    blocks = Sam2Model(config).vision_encoder.backbone.blocks
    for block, height in [(blocks[0], 64), (blocks[1], 64)]:  # block 1 pools 64 -> 32 inside windows of 6
        tokens = torch.randn(2, height, height, block.dim, generator=torch.Generator().manual_seed(1))
        whole_in, strips_in = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
        whole = block(whole_in)
        strips = checkpoint_in_strips(block.forward, strips_in, window_size=block.window_size, strips=4)
        assert strips.shape == whole.shape
        torch.testing.assert_close(strips, whole, rtol=1e-5, atol=1e-6)
        whole.square().sum().backward()
        strips.square().sum().backward()
        torch.testing.assert_close(strips_in.grad, whole_in.grad, rtol=1e-4, atol=1e-6)


def test_checkpointing_switches_and_modes():
    model = apply_strategy(load_sam2("tiny-random"), "partial", num_blocks=2)
    decoder = base_sam2(model).mask_decoder
    assert not is_gradient_checkpointing(model)
    assert enable_gradient_checkpointing(model) == 2 + 1
    assert [block.gradient_checkpointing for block in hiera_blocks(model)] == [False] * 6 + [True] * 2
    assert decoder.gradient_checkpointing and decoder._gradient_checkpointing_func.keywords == {
        "objects_per_checkpoint": 1}
    assert enable_gradient_checkpointing(model, blocks="all", decoder=False, objects_per_checkpoint=3) == 8
    assert not decoder.gradient_checkpointing
    disable_gradient_checkpointing(model)
    assert not is_gradient_checkpointing(model)
    assert enable_gradient_checkpointing(apply_strategy(load_sam2("tiny-random"), "decoder")) == 1  # decoder only
    with pytest.raises(ValueError, match="blocks='some'"):
        enable_gradient_checkpointing(model, blocks="some")
    with pytest.raises(ValueError, match="objects_per_checkpoint=0"):
        enable_gradient_checkpointing(model, objects_per_checkpoint=0)


def test_checkpoint_per_object_splits_objects_and_shares_images():
    image = torch.randn(2, 4, requires_grad=True)
    index = torch.tensor([0, 1, 1, 0, 1])
    scale = torch.arange(1.0, 6.0).view(5, 1).requires_grad_()
    calls = []

    def function(image, index, scale):
        calls.append(len(index))
        rows = image.index_select(0, index) * scale
        return rows, rows.sum(1, keepdim=True)

    rows, sums = checkpoint_per_object(function, [image], [index, scale], objects_per_checkpoint=2)
    assert calls == [2, 2, 1]
    expected_rows, expected_sums = function(image, index, scale)
    torch.testing.assert_close(rows, expected_rows, rtol=0, atol=0)
    torch.testing.assert_close(sums, expected_sums, rtol=0, atol=0)
    (rows.square().sum() + sums.sum()).backward()
    grads = image.grad.clone(), scale.grad.clone()
    image.grad = scale.grad = None
    (expected_rows.square().sum() + expected_sums.sum()).backward()
    torch.testing.assert_close(grads[0], image.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], scale.grad, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no objects"):
        checkpoint_per_object(function, [image], [index[:0], scale[:0]])


@pytest.mark.parametrize(
    "strategy, options, group, runs",
    [
        ("decoder", {}, 1, [1, 1, 1]),  # tiny_batch's 3 objects, one per checkpoint
        ("lora", {"init_lora_weights": False}, 1, [1, 1, 1]),
        ("lora", {"decoder": "full"}, 2, [2, 1]),
    ],
)
@pytest.mark.parametrize("masks", [False, True])
def test_checkpointed_decoder_gives_the_same_outputs_and_gradients(strategy, options, group, runs, masks, tiny_batch):
    """The whole training forward, plain and with the decoder run `group` objects per checkpoint (and mask prompts,
    which make the dense embeddings per object). Each group's decoder runs twice: forward, then the recompute in
    backward, in an order of autograd's choosing. With LoRA the decoder is frozen by default, but the trunk's
    gradients go back through it."""
    mask_inputs = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1)) if masks else None
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = apply_strategy(load_sam2("tiny-random"), strategy, **options).train()
        decoder_runs = []  # objects in each run of `decode_masks`
        if checkpointed:
            enable_gradient_checkpointing(model, objects_per_checkpoint=group)
        segmenter = Sam2Segmenter(model)

        def run(sam, images, image_index, *rest, **keywords):
            decoder_runs.append(len(image_index))
            return decode_masks(sam, images, image_index, *rest, **keywords)

        with mock.patch.object(segmenter, "_decoder", lambda backend: run):
            out = segmenter(**tiny_batch, mask_inputs=mask_inputs)
            (out.mask_logits.square().mean() + out.iou_scores.sum() + out.object_score_logits.sum()).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, decoder_runs))
    (plain_out, plain, plain_runs), (out, checkpointed, checkpointed_runs) = results
    forward, recomputed = checkpointed_runs[: len(runs)], checkpointed_runs[len(runs) :]
    assert plain_runs == [3] and forward == runs and sorted(recomputed) == sorted(runs)  # backward picks the order
    for name in ("mask_logits", "iou_scores", "object_score_logits"):
        torch.testing.assert_close(getattr(out, name), getattr(plain_out, name), rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(checkpointed) == sorted(plain) and len(plain) > 0
    # Objects sum into the decoder's weight gradients in another order, and the trunk's windowed blocks run in
    # strips (see above). Key biases get no true gradient (the softmax ignores them): their rounding noise (< 1e-7)
    # gets an absolute floor.
    for name, grad in plain.items():
        atol = max(2e-5 * grad.abs().max().item(), 1e-7)
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=atol, msg=name)
