import pytest
import torch

from sam2_peft.training import build_optimizer, initialise_optimizer_state


def train(eager: bool, amsgrad: bool = False) -> tuple[dict, torch.optim.Optimizer]:
    """Four AdamW steps on two layers; the second gets no gradient before step 3 (like an unused prompt path)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    optimizer = build_optimizer(model, learning_rate=1e-2, weight_decay=0.1)
    for group in optimizer.param_groups:
        group["amsgrad"] = amsgrad
    if eager:
        initialise_optimizer_state(optimizer)
        assert all(optimizer.state[p]["step"] == 0 for p in model.parameters())
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        hidden = model[0](inputs)
        out = model[1](hidden) if step >= 2 else hidden
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, optimizer


@pytest.mark.parametrize("amsgrad", [False, True])
def test_eager_optimizer_state_changes_no_update(amsgrad):
    lazy, _ = train(eager=False, amsgrad=amsgrad)
    eager, optimizer = train(eager=True, amsgrad=amsgrad)
    for name in lazy:
        assert torch.equal(lazy[name], eager[name]), name
    steps = sorted(int(state["step"]) for state in optimizer.state.values())
    assert steps == [2, 2, 4, 4]  # the late layer counts only its own updates, as lazily initialised state does


def test_fused_adamw_updates_like_the_reference_loop():
    """build_optimizer's fused kernel (CPU too) against PyTorch's single-tensor AdamW with the same groups."""
    fused, _ = train(eager=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=1e-2, foreach=False, fused=False)
    assert build_optimizer(model, 1e-2, 0.1).defaults["fused"]
    inputs = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        hidden = model[0](inputs)
        (model[1](hidden) if step >= 2 else hidden).square().mean().backward()
        reference.step()
        reference.zero_grad()
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.detach(), rtol=1e-6, atol=1e-7, msg=name)
