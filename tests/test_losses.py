"""SAM2 losses against formulas written out by hand in numpy, and their gradient routing."""

import numpy as np
import pytest
import torch

from sam2_peft import Sam2Segmenter, load_sam2
from sam2_peft.losses import LossWeights, downsample_targets, sam2_loss, sam2_multistep_loss
from sam2_peft.segmenter import SegmenterOutput


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_terms(logits, target, alpha=0.25, gamma=2.0):
    """Focal, Dice and real IoU of one (h, w) candidate against a binary (h, w) target, pixel by pixel."""
    p = sigmoid(logits.astype(np.float64))
    t = target.astype(np.float64)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = np.where(t == 1, p, 1 - p)
    alpha_t = np.where(t == 1, alpha, 1 - alpha)
    focal = np.mean(alpha_t * (1 - p_t) ** gamma * ce)
    dice = 1 - (2 * np.sum(p * t) + 1) / (np.sum(p) + np.sum(t) + 1)
    pred = logits > 0
    union = np.sum(pred | (t > 0))
    real_iou = np.sum(pred & (t > 0)) / max(union, 1)
    return focal, dice, real_iou


def reference_loss(logits, iou_scores, object_logits, targets, present, w=LossWeights(), all_iou=True):
    """The whole loss, object by object: best candidate by 20 * focal + dice, L1 IoU, BCE object score."""
    n, m = logits.shape[:2]
    out = dict(focal=0.0, dice=0.0, iou=0.0, object_score=0.0)
    best = []
    for i in range(n):
        terms = [reference_terms(logits[i, j], targets[i]) for j in range(m)]
        j = int(np.argmin([w.focal * f + w.dice * d for f, d, _ in terms]))
        best.append(j)
        iou_errors = [abs(iou_scores[i, k] - terms[k][2]) for k in range(m)]
        if present[i]:
            out["focal"] += terms[j][0] / n
            out["dice"] += terms[j][1] / n
            out["iou"] += (np.mean(iou_errors) if all_iou else iou_errors[j]) / n
        q = sigmoid(float(object_logits[i, 0]))
        out["object_score"] += -(np.log(q) if present[i] else np.log(1 - q)) / n
    out["loss"] = sum(getattr(w, name) * value for name, value in out.items())
    return out, best


def random_batch(n=4, m=3, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, m, size, size, generator=gen, dtype=torch.float64) * 3
    iou_scores = torch.rand(n, m, generator=gen, dtype=torch.float64)
    object_logits = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    targets = torch.rand(n, size, size, generator=gen) > 0.6
    return logits, iou_scores, object_logits, targets


@pytest.mark.parametrize("all_iou", [True, False])
def test_every_term_equals_the_hand_written_reference(all_iou):
    logits, iou_scores, object_logits, targets = random_batch()
    present = torch.tensor([True, True, False, True])
    weights = LossWeights(focal=20.0, dice=1.0, iou=1.0, object_score=1.0)
    got = sam2_loss(logits, iou_scores, object_logits, targets, present, weights, supervise_all_iou=all_iou)
    expected, _ = reference_loss(
        logits.numpy(), iou_scores.numpy(), object_logits.numpy(), targets.numpy(), present.numpy(), weights, all_iou
    )
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, rel=1e-10), name


def test_mse_iou_loss_and_custom_weights():
    logits, iou_scores, object_logits, targets = random_batch(n=2, m=1)
    weights = LossWeights(focal=5.0, dice=2.0, iou=0.5, object_score=0.0)
    got = sam2_loss(logits, iou_scores, object_logits, targets, weights=weights, iou_loss="mse")
    real_iou = [reference_terms(logits[i, 0].numpy(), targets[i].numpy())[2] for i in range(2)]
    mse = np.mean([(iou_scores[i, 0].item() - real_iou[i]) ** 2 for i in range(2)])
    assert got["iou"].item() == pytest.approx(mse, rel=1e-10)
    expected = 5 * got["focal"] + 2 * got["dice"] + 0.5 * got["iou"]
    assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_best_candidate_is_the_one_matching_the_target():
    _, iou_scores, object_logits, targets = random_batch(n=3, m=3)
    logits = torch.full((3, 3, 8, 8), -4.0, dtype=torch.float64)
    matching = torch.tensor([2, 0, 1])
    for i, j in enumerate(matching):
        logits[i, j] = torch.where(targets[i], 6.0, -6.0)
    _, best = reference_loss(
        logits.numpy(), iou_scores.numpy(), object_logits.numpy(), targets.numpy(), np.ones(3, bool)
    )
    assert best == matching.tolist()
    got = sam2_loss(logits, iou_scores, object_logits, targets)
    matched_focal = np.mean([reference_terms(logits[i, j].numpy(), targets[i].numpy())[0] for i, j in enumerate(best)])
    assert got["focal"].item() == pytest.approx(matched_focal, rel=1e-10)


def test_gradients_reach_only_the_chosen_mask_of_present_objects():
    logits, iou_scores, object_logits, targets = random_batch(n=3, m=3, seed=3)
    logits.requires_grad_(True)
    iou_scores.requires_grad_(True)
    present = torch.tensor([True, False, True])
    sam2_loss(logits, iou_scores, object_logits, targets, present)["loss"].backward()
    _, best = reference_loss(
        logits.detach().numpy(), iou_scores.detach().numpy(), object_logits.numpy(), targets.numpy(), present.numpy()
    )
    touched = logits.grad.flatten(2).abs().amax(-1) > 0  # (N, M)
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[0, best[0]] = expected[2, best[2]] = True
    assert torch.equal(touched, expected)
    # The IoU head of all candidates of present objects is supervised (SAM2.1 config), none of absent ones.
    assert torch.equal(iou_scores.grad.abs() > 0, present[:, None].expand(3, 3))


def test_absent_objects_add_only_the_object_score_term():
    logits, iou_scores, object_logits, targets = random_batch(n=2)
    absent = sam2_loss(logits, iou_scores, object_logits, targets, torch.tensor([False, False]))
    assert absent["focal"].item() == absent["dice"].item() == absent["iou"].item() == 0.0
    q = torch.sigmoid(object_logits[:, 0])
    assert absent["object_score"].item() == pytest.approx(-torch.log(1 - q).mean().item(), rel=1e-12)
    # By default presence is read from the target: an all-zero target is an absent object.
    empty = torch.zeros_like(targets)
    assert sam2_loss(logits, iou_scores, object_logits, empty)["focal"].item() == 0.0


def test_loss_is_normalised_per_object():
    logits, iou_scores, object_logits, targets = random_batch(n=2)
    once = sam2_loss(logits, iou_scores, object_logits, targets)
    twice = sam2_loss(*(torch.cat([t, t]) for t in (logits, iou_scores, object_logits, targets)))
    for name in once:
        assert twice[name].item() == pytest.approx(once[name].item(), rel=1e-12)
    halved = sam2_loss(logits, iou_scores, object_logits, targets, num_objects=4)
    assert halved["loss"].item() == pytest.approx(once["loss"].item() / 2, rel=1e-12)


def test_soft_targets_use_the_l1_form_of_dice_and_threshold_half_for_iou():
    logits, iou_scores, object_logits, _ = random_batch(n=1, m=1)
    soft = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = sam2_loss(logits, iou_scores, object_logits, soft)
    p, t = sigmoid(logits[0, 0].numpy()), soft[0].numpy()
    dice = 1 - (p.sum() + t.sum() - np.abs(p - t).sum() + 1) / (p.sum() + t.sum() + 1)
    pred, true = logits[0, 0].numpy() > 0, t >= 0.5
    real_iou = np.sum(pred & true) / np.sum(pred | true)
    assert got["dice"].item() == pytest.approx(dice, rel=1e-10)
    assert got["iou"].item() == pytest.approx(abs(iou_scores[0, 0].item() - real_iou), rel=1e-10)


def test_multistep_loss_sums_the_steps():
    steps = [SegmenterOutput(*random_batch(seed=s)[:3]) for s in (1, 2, 3)]
    targets = random_batch()[3]
    total = sam2_multistep_loss(steps, targets)
    single = [sam2_loss(s.mask_logits, s.iou_scores, s.object_score_logits, targets) for s in steps]
    for name in total:
        assert total[name].item() == pytest.approx(sum(x[name].item() for x in single), rel=1e-12)
    with pytest.raises(ValueError, match="`steps` is empty"):
        sam2_multistep_loss([], targets)


def test_downsample_targets_is_the_block_average():
    masks = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    got = downsample_targets(masks, (4, 4))
    block_mean = masks.numpy().reshape(2, 4, 4, 4, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(got.numpy(), block_mean, rtol=1e-6)


def test_shape_errors_point_to_the_fix():
    logits, iou_scores, object_logits, targets = random_batch()
    with pytest.raises(ValueError, match="see `downsample_targets`"):
        sam2_loss(logits, iou_scores, object_logits, torch.zeros(4, 32, 32))
    with pytest.raises(ValueError, match=r"`object_present` must be \(N,\) = \(4,\), got \(4, 1\)"):
        sam2_loss(logits, iou_scores, object_logits, targets, torch.ones(4, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="'l1' or 'mse'"):
        sam2_loss(logits, iou_scores, object_logits, targets, iou_loss="l2")
    with pytest.raises(ValueError, match="`LossWeights.dice` must be >= 0"):
        LossWeights(dice=-1.0)


def test_loss_on_the_tiny_model_backpropagates_into_the_decoder():
    torch.manual_seed(0)
    segmenter = Sam2Segmenter(load_sam2("tiny-random"))
    masks = torch.zeros(2, 256, 256, dtype=torch.bool)
    masks[0, 40:120, 60:160] = True  # the second object is absent from its image
    out = segmenter(
        torch.randn(1, 3, 256, 256),
        image_index=torch.tensor([0, 0]),
        point_coords=torch.tensor([[[60.0, 40.0], [160.0, 120.0]]] * 2),
        point_labels=torch.tensor([[2, 3]] * 2),
    )
    targets = downsample_targets(masks, out.mask_logits.shape[-2:])
    losses = sam2_loss(out.mask_logits, out.iou_scores, out.object_score_logits, targets)
    assert targets.shape == (2, 64, 64) and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    grads = [p.grad for p in segmenter.sam.mask_decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
