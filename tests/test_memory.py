import pytest
import torch

from sam2_peft.memory import (
    compile_trainable,
    decoder_layers,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    hiera_blocks,
    is_gradient_checkpointing,
)
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import Sam2Segmenter, base_sam2
from sam2_peft.strategies import apply_strategy


def encoder_gradients(strategy: str, checkpointed: bool, autocast: bool = False, **options):
    """Gradients of a scalar of the encoder output, and how many block forwards went through the checkpoint."""
    torch.manual_seed(0)  # the same adapter initialisation for both runs
    model = apply_strategy(load_sam2("tiny-random"), strategy, **options).train()
    calls = []
    if checkpointed:
        enable_gradient_checkpointing(model)
        for block in hiera_blocks(model):
            inner = block._gradient_checkpointing_func
            block._gradient_checkpointing_func = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        features = base_sam2(model).vision_encoder(pixel_values).fpn_hidden_states
        loss = sum(level.float().square().mean() for level in features)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return grads, len(calls)


@pytest.mark.parametrize(
    "strategy, options, expected_blocks",
    [("full", {}, 8), ("lora", {"init_lora_weights": False}, 8), ("partial", {"num_blocks": 3}, 3)],
)
def test_checkpointed_blocks_give_the_same_gradients(strategy, options, expected_blocks):
    plain, plain_calls = encoder_gradients(strategy, checkpointed=False, **options)
    checkpointed, calls = encoder_gradients(strategy, checkpointed=True, **options)
    assert plain_calls == 0 and calls == expected_blocks
    assert sorted(checkpointed) == sorted(plain) and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


def test_checkpointing_under_bf16_autocast_gives_the_same_gradients():
    plain, _ = encoder_gradients("full", checkpointed=False, autocast=True)
    checkpointed, calls = encoder_gradients("full", checkpointed=True, autocast=True)
    assert calls == 8
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


def test_checkpointing_switches_and_modes():
    model = apply_strategy(load_sam2("tiny-random"), "partial", num_blocks=2)
    assert not is_gradient_checkpointing(model)
    assert enable_gradient_checkpointing(model) == 2 + 2
    assert [block.gradient_checkpointing for block in hiera_blocks(model)] == [False] * 6 + [True] * 2
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, True]
    assert enable_gradient_checkpointing(model, blocks="all", decoder=False) == 8
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    disable_gradient_checkpointing(model)
    assert not is_gradient_checkpointing(model)
    assert enable_gradient_checkpointing(apply_strategy(load_sam2("tiny-random"), "decoder")) == 2  # decoder only
    with pytest.raises(ValueError, match="blocks='some'"):
        enable_gradient_checkpointing(model, blocks="some")


@pytest.mark.parametrize("strategy, options", [("decoder", {}), ("lora", {"init_lora_weights": False})])
def test_checkpointed_decoder_layers_give_the_same_gradients(strategy, options, tiny_batch):
    """The whole training forward, plain and checkpointed. With LoRA the decoder is frozen, but the trunk's gradients
    go back through its checkpointed layers."""
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = apply_strategy(load_sam2("tiny-random"), strategy, **options).train()
        calls = []
        if checkpointed:
            enable_gradient_checkpointing(model)
            for layer in decoder_layers(model):
                inner = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
        out = Sam2Segmenter(model)(**tiny_batch)
        (out.mask_logits.square().mean() + out.iou_scores.sum()).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((grads, len(calls)))
    (plain, plain_calls), (checkpointed, calls) = results
    assert plain_calls == 0 and calls == 2
    assert sorted(checkpointed) == sorted(plain) and len(plain) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


def test_compile_in_place_keeps_outputs_and_parameter_names(tiny_model, tiny_batch):
    segmenter = Sam2Segmenter(tiny_model)
    inputs = {key: value for key, value in tiny_batch.items() if key != "pixel_values"}
    with torch.no_grad():
        features = segmenter.encode_images(tiny_batch["pixel_values"])
        reference = segmenter(image_features=features, **inputs)
        names = list(tiny_model.state_dict())
        # The eager backend runs the dynamo capture without needing a C++ compiler, so the test stays fast.
        assert compile_trainable(tiny_model, backend="eager") == ["mask_decoder"]
        compiled = segmenter(image_features=features, **inputs)
    assert list(tiny_model.state_dict()) == names
    torch.testing.assert_close(compiled.mask_logits, reference.mask_logits, rtol=0, atol=1e-6)
