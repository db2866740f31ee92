import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from sam2_peft.speed.fused_lora import InPlaceLoraLinear
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import base_sam2
from sam2_peft.strategies import apply_strategy
from sam2_peft.targets import resolve_targets


def pair(**lora_options):
    """The same LoRA (same seed, non-zero B) through `apply_strategy` and through plain PEFT."""
    torch.manual_seed(0)
    ours = apply_strategy(load_sam2("tiny-random"), "lora", init_lora_weights=False, **lora_options)
    base = load_sam2("tiny-random")
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=resolve_targets(base, "trunk.qkv"),
                        **lora_options)
    return ours.train(), get_peft_model(base, config).train()


def encode(model, pixel_values, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        features = base_sam2(model).vision_encoder(pixel_values).fpn_hidden_states
        return sum(level.float().square().mean() for level in features)


def test_in_place_lora_equals_peft_in_outputs_and_gradients():
    ours, reference = pair()
    layers = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is InPlaceLoraLinear for m in layers)
    assert not any(type(m) is InPlaceLoraLinear for m in reference.modules())
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    loss, reference_loss = encode(ours, pixel_values), encode(reference, pixel_values)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    reference_loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == reference_grads.keys() and len(grads) == 2 * len(layers)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_in_place_lora_under_bf16_autocast_matches_peft():
    ours, reference = pair()
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    loss, reference_loss = encode(ours, pixel_values, True), encode(reference, pixel_values, True)
    torch.testing.assert_close(loss, reference_loss, rtol=2e-2, atol=1e-3)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("state", ["dropout", "disabled", "merged", "two adapters"])
def test_in_place_lora_matches_peft_in_every_adapter_state(state):
    """Dropout, disabled and merged adapters go through PEFT's own forward; two active adapters stay in place."""
    ours, reference = pair(lora_dropout=0.5 if state == "dropout" else 0.0)
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    if state == "dropout":
        ours.eval(), reference.eval()  # same (identity) dropout, through PEFT's own path
    if state == "merged":
        ours.merge_adapter(), reference.merge_adapter()
    if state == "two adapters":
        for model in (ours, reference):
            torch.manual_seed(4)
            model.add_adapter("other", LoraConfig(r=4, init_lora_weights=False, target_modules=["attn.qkv"]))
            model.base_model.set_adapter(["default", "other"])
    context = ours.disable_adapter() if state == "disabled" else torch.enable_grad()
    reference_context = reference.disable_adapter() if state == "disabled" else torch.enable_grad()
    with context:
        loss = encode(ours, pixel_values)
    with reference_context:
        reference_loss = encode(reference, pixel_values)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)


def test_adapter_from_the_in_place_layer_is_a_plain_peft_lora(tmp_path):
    ours, _ = pair()
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_sam2("tiny-random"), tmp_path)
    assert not any(type(m) is InPlaceLoraLinear for m in loaded.modules())
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(encode(loaded.eval(), pixel_values), encode(ours.eval(), pixel_values))


def test_tensor_scaling_compiles_without_graph_breaks():
    """Hotswap-ready adapters hold `scaling` as tensors; the in-place update must stay one graph under compile."""
    config = LoraConfig(r=4, init_lora_weights=False, target_modules=["0"])
    config._register_custom_module({torch.nn.Linear: InPlaceLoraLinear})
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config)
    layer = model.base_model.model[0]
    assert type(layer) is InPlaceLoraLinear
    inputs = torch.randn(3, 8)
    expected = model(inputs)
    layer.scaling["default"] = torch.tensor(layer.scaling["default"])
    torch.testing.assert_close(model(inputs), expected)
    assert torch._dynamo.explain(model)(inputs).graph_break_count == 0


def test_linear_subclasses_keep_peft_dispatch():
    """PEFT matches custom layers by isinstance; a subclass of nn.Linear (e.g. a quantised one) is left to PEFT."""

    class SubLinear(torch.nn.Linear):
        pass

    model = load_sam2("tiny-random")
    attn = base_sam2(model).vision_encoder.backbone.blocks[0].attn
    plain = attn.qkv
    attn.qkv = SubLinear(plain.in_features, plain.out_features)
    peft_model = apply_strategy(model, "lora")
    assert not any(type(m) is InPlaceLoraLinear for m in peft_model.modules())
    assert type(base_sam2(peft_model).vision_encoder.backbone.blocks[0].attn.qkv) is LoraLinear


def test_in_place_update_does_not_clone_the_gradient():
    """The update goes into the base layer's own output, not into a view of it: autograd would record an in-place
    update of a view as `CopySlices`, whose backward clones the output-sized gradient."""
    ours, _ = pair()
    layer = next(m for m in ours.modules() if type(m) is InPlaceLoraLinear)
    out = layer(torch.randn(2, 4, 4, layer.in_features))
    names, pending = set(), [out.grad_fn]
    while pending:
        node = pending.pop()
        names.add(node.name())
        pending += [child for child, _ in node.next_functions if child is not None]
    assert out.shape == (2, 4, 4, layer.out_features)
    assert "AddmmBackward0" in names and not any("CopySlices" in name for name in names)
