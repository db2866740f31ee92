"""Helpers of the speed tests (imported by name: pytest puts tests/speed on the path): outputs and gradients of one
training forward, for comparing backends."""

import torch

from sam2_peft.models import load_sam2
from sam2_peft.segmenter import Sam2Segmenter
from sam2_peft.strategies import apply_strategy


def training_forward(backend, strategy: str, batch: dict, **options) -> tuple[dict, dict]:
    """(outputs, gradients) of one `Sam2Segmenter` forward + backward of a fixed scalar, on a fresh tiny model."""
    torch.manual_seed(0)  # the same adapter initialisation for every backend
    model = apply_strategy(load_sam2("tiny-random"), strategy, **options).train()
    out = Sam2Segmenter(model, backend=backend).train()(**batch)
    (out.mask_logits.square().mean() + out.iou_scores.sum() + out.object_score_logits.sum()).backward()
    outputs = {"mask_logits": out.mask_logits, "iou_scores": out.iou_scores, "objects": out.object_score_logits}
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in outputs.items()}, grads


def assert_same(ours: tuple[dict, dict], reference: tuple[dict, dict], rtol: float = 1e-4) -> None:
    """Outputs within float rounding; every gradient within `rtol` of its largest entry (sums in another order)."""
    (out, grads), (ref_out, ref_grads) = ours, reference
    for name, value in ref_out.items():
        torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        atol = max(rtol * grad.abs().max().item(), 1e-7)
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=atol, msg=name)
