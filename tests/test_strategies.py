import pytest
import torch
from peft import LoraConfig, OFTConfig, PeftModel
from transformers import Sam2Model

from sam2_peft.segmenter import Sam2Segmenter
from sam2_peft.strategies import PEFT_STRATEGIES, apply_strategy, trainable_summary


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_count(linears, r: int) -> int:
    return sum(r * (layer.in_features + layer.out_features) for layer in linears)


def full_loss(model, batch) -> torch.Tensor:
    """A loss that reaches every parameter: both output modes, all three heads and a mask prompt."""
    segmenter = Sam2Segmenter(model).train()
    multi = segmenter(**batch, multimask_output=True)
    mask_inputs = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    single = segmenter(**batch, mask_inputs=mask_inputs, multimask_output=False)
    return sum(out.mask_logits.mean() + out.iou_scores.sum() + out.object_score_logits.sum() for out in (multi, single))


def test_decoder_trains_exactly_the_mask_decoder(tiny_model):
    decoder_params = numel(tiny_model.mask_decoder)
    model = apply_strategy(tiny_model, "decoder")
    assert n_trainable(model) == decoder_params
    model = apply_strategy(model, "decoder", train_prompt_encoder=True)
    assert n_trainable(model) == decoder_params + numel(model.prompt_encoder)


def test_partial_trains_last_blocks_and_decoder(tiny_model):
    blocks = tiny_model.vision_encoder.backbone.blocks
    expected = numel(blocks[6]) + numel(blocks[7]) + numel(tiny_model.mask_decoder)
    assert n_trainable(apply_strategy(tiny_model, "partial", num_blocks=2)) == expected
    with_neck = apply_strategy(tiny_model, "partial", blocks=[0], train_neck=True)
    assert n_trainable(with_neck) == numel(blocks[0]) + numel(tiny_model.mask_decoder) + numel(
        tiny_model.vision_encoder.neck
    )


def test_full_trains_everything(tiny_model):
    assert n_trainable(apply_strategy(tiny_model, "full")) == numel(tiny_model)


def test_lora_counts_match_r_times_in_plus_out(tiny_model):
    blocks = tiny_model.vision_encoder.backbone.blocks
    qkv = [block.attn.qkv for block in blocks]
    model = apply_strategy(tiny_model, "lora", r=4)
    assert isinstance(model, PeftModel)
    assert n_trainable(model) == lora_count(qkv, 4)
    assert model.peft_config["default"].lora_alpha == 8


def test_lora_block_selection_and_decoder_modes():
    from sam2_peft.models import load_sam2

    base = load_sam2("tiny-random")
    last = [base.vision_encoder.backbone.blocks[i] for i in (6, 7)]
    attn = [layer for block in last for layer in (block.attn.qkv, block.attn.proj)]
    model = apply_strategy(base, "lora", r=2, targets="trunk.attn", blocks="last:2", decoder="full")
    # modules_to_save keeps a trainable copy of the decoder beside the frozen original.
    assert n_trainable(model) == lora_count(attn, 2) + numel(base.mask_decoder.modules_to_save["default"])
    base = load_sam2("tiny-random")
    decoder_linears = [m for n, m in base.mask_decoder.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    model = apply_strategy(base, "lora", r=2, blocks=[0], decoder="adapter")
    assert n_trainable(model) == lora_count([base.vision_encoder.backbone.blocks[0].attn.qkv] + decoder_linears, 2)


@pytest.mark.parametrize("strategy,options", [
    ("decoder", {}), ("partial", {"num_blocks": 2}), ("full", {}), ("lora", {"init_lora_weights": False}),
])
def test_gradients_only_on_trainable_and_frozen_stay_bit_identical(tiny_model, tiny_batch, strategy, options):
    model = apply_strategy(tiny_model, strategy, **options)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    full_loss(model, tiny_batch).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} trains but got no gradient"
        else:
            assert param.grad is None, f"{name} is frozen but got a gradient"
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} did not move"
        else:
            assert torch.equal(param, before[name]), f"{name} is frozen but changed"


def test_lora_changes_outputs_and_merges_to_a_plain_sam2model(tiny_model, tiny_batch):
    with torch.no_grad():
        base_out = Sam2Segmenter(tiny_model)(**tiny_batch).mask_logits.clone()
        model = apply_strategy(tiny_model, "lora", r=4, init_lora_weights=False)
        adapted = Sam2Segmenter(model)(**tiny_batch).mask_logits
        merged = model.merge_and_unload()
        merged_out = Sam2Segmenter(merged)(**tiny_batch).mask_logits
    assert type(merged) is Sam2Model
    assert (adapted - base_out).abs().max() > 1e-3
    torch.testing.assert_close(merged_out, adapted, rtol=0, atol=1e-5)


TUNER_OPTIONS = {"boft": {"boft_block_size": 4}, "fourierft": {"n_frequency": 16}, "vera": {"r": 4}}


@pytest.mark.parametrize("tuner", PEFT_STRATEGIES)
def test_every_peft_tuner_trains_a_step_and_merges(tiny_model, tiny_batch, tuner):
    model = apply_strategy(tiny_model, tuner, **TUNER_OPTIONS.get(tuner, {}))
    segmenter = Sam2Segmenter(model)
    with torch.no_grad():
        start = segmenter(**tiny_batch).mask_logits.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    segmenter(**tiny_batch).mask_logits.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        trained = Sam2Segmenter(model)(**tiny_batch).mask_logits
        merged = Sam2Segmenter(model.merge_and_unload())(**tiny_batch).mask_logits
    change = ((trained - start).abs().max() / start.abs().max()).item()
    assert change > 1e-3, f"{tuner}: one step changed the outputs by only {change:.1e} (relative)"
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-4)


def test_trainable_summary_agrees_with_peft(tiny_model):
    model = apply_strategy(tiny_model, "lora", r=4, targets="trunk.qkv", blocks="last:2", decoder="full")
    summary = trainable_summary(model)
    trainable, total = model.get_nb_trainable_parameters()
    assert summary["all"] == {"trainable": trainable, "total": total}
    assert summary["adapters"]["trainable"] == 4 * ((96 + 576) + (192 + 576))  # qkv of blocks 6 and 7
    assert summary["trunk.blocks.7"]["trainable"] == 0
    assert summary["mask_decoder"]["trainable"] == trainable - summary["adapters"]["trainable"]
    table = str(summary)
    assert table.splitlines()[0].split() == ["component", "trainable", "total", "%"]
    assert "trunk.blocks.7" in table and table.splitlines()[-1].startswith("all")


def test_trainable_summary_rows_for_partial(tiny_model):
    summary = trainable_summary(apply_strategy(tiny_model, "partial", num_blocks=1))
    assert summary["trunk.blocks.7"]["trainable"] == summary["trunk.blocks.7"]["total"] > 0
    assert summary["trunk.blocks.6"]["trainable"] == 0
    assert list(summary)[:2] == ["trunk.stem", "trunk.blocks.0"]
    assert summary["all"]["total"] == sum(p.numel() for p in tiny_model.parameters())


# Each refused call: the error, its message, and the call.
REFUSALS = {
    "unknown strategy": (ValueError, "strategy='adapterz' is unknown", lambda m: apply_strategy(m, "adapterz")),
    "option of another strategy": (TypeError, r"has no option\(s\) \['num_blocks'\]",
                                   lambda m: apply_strategy(m, "decoder", num_blocks=2)),
    "too many blocks": (ValueError, "num_blocks=9 is out of range: this model has 8 Hiera blocks",
                        lambda m: apply_strategy(m, "partial", num_blocks=9)),
    "no blocks": (ValueError, "num_blocks=0 is out of range", lambda m: apply_strategy(m, "partial", num_blocks=0)),
    "targets match nothing": (ValueError, "matched no nn.Linear module",
                              lambda m: apply_strategy(m, "lora", targets="trunk.nothing")),
    "block-level proj pattern": (ValueError, "block-level `proj`",
                                 lambda m: apply_strategy(m, "lora", targets=r".*blocks\.\d+\.proj")),
    "block-level proj config": (ValueError, "block-level `proj`",
                                lambda m: apply_strategy(m, LoraConfig(target_modules=["proj"]))),
    "config matches nothing": (ValueError, "matched no module",
                               lambda m: apply_strategy(m, LoraConfig(target_modules=["does_not_exist"]))),
    "oft by name": (ValueError, "OFT cannot adapt SAM2", lambda m: apply_strategy(m, "oft")),
    "oft config": (ValueError, "OFT cannot adapt SAM2",
                   lambda m: apply_strategy(m, OFTConfig(target_modules=["q_proj"], oft_block_size=32))),
    "unknown decoder mode": (ValueError, "decoder='train' is unknown",
                             lambda m: apply_strategy(m, "lora", decoder="train")),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_strategy_leaves_the_model_as_it_was(tiny_model, case):
    error, message, call = REFUSALS[case]
    # A mixed pattern (every third tensor frozen), so that a strategy that set requires_grad before refusing shows.
    for index, param in enumerate(tiny_model.parameters()):
        param.requires_grad_(index % 3 != 0)
    trainable = {name: p.requires_grad for name, p in tiny_model.named_parameters()}
    modules = {name: type(module) for name, module in tiny_model.named_modules()}
    state = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    with pytest.raises(error, match=message):
        call(tiny_model)
    assert {name: p.requires_grad for name, p in tiny_model.named_parameters()} == trainable
    # No adapter layer injected, no module replaced, no tensor added or changed.
    assert {name: type(module) for name, module in tiny_model.named_modules()} == modules
    assert not hasattr(tiny_model, "peft_config")
    after = tiny_model.state_dict()
    assert after.keys() == state.keys()
    assert [name for name, tensor in state.items() if not torch.equal(after[name], tensor)] == []


def test_peft_config_passes_through(tiny_model):
    config = LoraConfig(r=2, target_modules=None)
    model = apply_strategy(tiny_model, config, targets="trunk.qkv", blocks=[7])
    assert set(model.peft_config["default"].target_modules) == {"vision_encoder.backbone.blocks.7.attn.qkv"}
    assert config.target_modules is None, "the caller's config must not be mutated"
