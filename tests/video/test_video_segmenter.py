"""The grad-enabled memory forward against transformers' own tracking, and its gradients against finite differences."""

import numpy as np
import pytest
import torch
from transformers import Sam2ImageProcessor, Sam2VideoProcessor
from transformers.models.sam2_video import modeling_sam2_video
from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

from sam2_peft.models import load_sam2
from sam2_peft.video import VideoSegmenter
from sam2_peft.video.segmenter import NO_OBJECT_SCORE
from sam2_peft.video.tracking import track_clip

SIZE = 256
STEP = 1e-5  # finite-difference step (see test_memory_gradients_equal_finite_differences)


def moving_blobs(num_frames: int = 5) -> list[np.ndarray]:
    """(200, 240, 3) uint8 frames: a bright square drifting right and a green bar drifting left."""
    frames = []
    for t in range(num_frames):
        frame = np.full((200, 240, 3), 30, np.uint8)
        frame[40 + 5 * t : 100 + 5 * t, 50 + 6 * t : 120 + 6 * t] = 200
        frame[120:180, 150 - 4 * t : 210 - 4 * t, 1] = 250
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def video_model():
    return load_sam2("tiny-random", video=True)


@pytest.fixture(scope="module")
def processor():
    return Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(size={"height": SIZE, "width": SIZE}, mask_size={"height": 64, "width": 64}),
        video_processor=Sam2VideoVideoProcessor(size={"height": SIZE, "width": SIZE}),
    )


def transformers_tracking(model, processor, frames, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`Sam2VideoModel`'s own tracking from frame 0: (T, N, h, w) low-res logits, and the session's frames."""
    session = processor.init_video_session(video=frames, inference_device="cpu")
    processor.add_inputs_to_inference_session(session, frame_idx=0, **inputs)
    masks = [out.pred_masks[:, 0].clone() for out in model.propagate_in_video_iterator(session, start_frame_idx=0)]
    return torch.stack(masks), torch.stack([session.get_frame(i) for i in range(len(frames))])


def ours(model, pixel_values, **prompts) -> torch.Tensor:
    segmenter = VideoSegmenter(model).eval()  # memory_dtype="auto": bfloat16 memories in eval, as transformers
    with torch.no_grad():
        outputs = segmenter(segmenter.encode_frames(pixel_values), **prompts)
    return torch.stack([steps[-1].masks for steps in outputs])


def test_box_tracking_equals_transformers(video_model, processor):
    frames = moving_blobs()
    boxes = [[50, 40, 120, 100], [150, 120, 210, 180]]
    reference, pixel_values = transformers_tracking(video_model, processor, frames, obj_ids=[1, 2],
                                                    input_boxes=[boxes])
    coords = processor(images=frames[0], input_boxes=[boxes], return_tensors="pt")["input_boxes"][0].reshape(2, 2, 2)
    predicted = ours(video_model, pixel_values, point_coords=coords, point_labels=torch.tensor([[2, 3], [2, 3]]))

    absent = reference == NO_OBJECT_SCORE
    assert 0 < absent.float().mean() < 0.5  # both branches occur: present and absent objects
    assert torch.equal(predicted == NO_OBJECT_SCORE, absent)
    # Objects run batched here and one by one in transformers: float32 round-off only.
    torch.testing.assert_close(predicted, reference, atol=1e-3, rtol=0)


def test_long_tracking_equals_transformers(video_model, processor):
    """20 frames: past the 7 memories the bank holds (older ones drop out) and the 16 object pointers it reads."""
    frames = moving_blobs(20)
    boxes = [[50, 40, 120, 100], [150, 120, 210, 180]]
    reference, pixel_values = transformers_tracking(video_model, processor, frames, obj_ids=[1, 2],
                                                    input_boxes=[boxes])
    coords = processor(images=frames[0], input_boxes=[boxes], return_tensors="pt")["input_boxes"][0].reshape(2, 2, 2)
    predicted = ours(video_model, pixel_values, point_coords=coords, point_labels=torch.tensor([[2, 3], [2, 3]]))
    torch.testing.assert_close(predicted, reference, atol=1e-3, rtol=0)


def test_click_tracking_equals_transformers(video_model, processor):
    """One click: the prompted frame picks the best of three candidates (multimask), as do tracked frames."""
    frames = moving_blobs(4)
    clicks = [[[[85, 70]], [[180, 150]]]]
    reference, pixel_values = transformers_tracking(video_model, processor, frames, obj_ids=[1, 2],
                                                    input_points=clicks, input_labels=[[[1], [1]]])
    coords = processor(images=frames[0], input_points=clicks, return_tensors="pt")["input_points"][0]
    predicted = ours(video_model, pixel_values, point_coords=coords, point_labels=torch.ones(2, 1, dtype=torch.long))
    torch.testing.assert_close(predicted, reference, atol=1e-3, rtol=0)


def test_mask_prompt_tracking_equals_transformers(video_model, processor):
    frames = moving_blobs(4)
    mask = np.zeros((200, 240), bool)
    mask[40:100, 50:120] = True
    reference, pixel_values = transformers_tracking(video_model, processor, frames, obj_ids=[1], input_masks=[mask])
    # The processor's resize of the mask to the input size (antialiased bilinear, then >= 0.5).
    resized = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(SIZE, SIZE),
                                              mode="bilinear", align_corners=False, antialias=True)
    predicted = ours(video_model, pixel_values, mask_inputs=(resized >= 0.5).float())
    torch.testing.assert_close(predicted, reference, atol=1e-3, rtol=0)


def test_prompts_on_a_later_frame_track_as_transformers(video_model, processor):
    """Prompted on frame 2 of 6, an object has no mask before it, and from there on transformers' masks (the
    pointers' temporal encoding is normalised by the whole video's length, not the tracked part's)."""
    frames = moving_blobs(6)
    boxes = [[60, 50, 130, 110]]
    session = processor.init_video_session(video=frames, inference_device="cpu")
    processor.add_inputs_to_inference_session(session, frame_idx=2, obj_ids=[1], input_boxes=[boxes])
    reference = torch.stack([out.pred_masks[:, 0].clone()
                             for out in video_model.propagate_in_video_iterator(session, start_frame_idx=2)])
    pixel_values = torch.stack([session.get_frame(i) for i in range(len(frames))])
    coords = processor(images=frames[2], input_boxes=[boxes], return_tensors="pt")["input_boxes"][0].reshape(1, 2, 2)
    segmenter = VideoSegmenter(video_model).eval()
    item = {"pixel_values": pixel_values, "point_coords": coords, "point_labels": torch.tensor([[2, 3]]),
            "prompt_frames": torch.tensor([2])}
    with torch.no_grad():
        logits = track_clip(segmenter, item)
    assert (logits[:2] == NO_OBJECT_SCORE).all()
    torch.testing.assert_close(logits[2:], reference, atol=1e-3, rtol=0)


def rope_in_input_precision(q, k, cos, sin, num_k_exclude_rope=0, repeat_freqs_k=False):
    """transformers' `apply_rotary_pos_emb_2d`, computed in the inputs' dtype (transformers rotates in float32)."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    rotated_q = q * cos + modeling_sam2_video.rotate_pairwise(q) * sin
    split = k.shape[-2] - num_k_exclude_rope
    k_rot, k_pass = k[..., :split, :], k[..., split:, :]  # object-pointer keys (the last ones) are not rotated
    if k_rot.shape[-2] == 0:
        return rotated_q, k
    if repeat_freqs_k and k_rot.shape[-2] != q.shape[-2]:
        repeats = k_rot.shape[-2] // q.shape[-2]
        cos, sin = cos.repeat(1, 1, repeats, 1), sin.repeat(1, 1, repeats, 1)
    rotated_k = k_rot * cos + modeling_sam2_video.rotate_pairwise(k_rot) * sin
    return rotated_q, torch.cat([rotated_k, k_pass], dim=-2)


@torch.no_grad()
def central_difference(function, parameter: torch.Tensor, index: tuple, step: float) -> float:
    original = parameter[index].item()
    parameter[index] = original + step
    plus = function().item()
    parameter[index] = original - step
    minus = function().item()
    parameter[index] = original
    return (plus - minus) / (2 * step)


def richardson(difference, step: float) -> float:
    """Central differences at `step` and `step / 2` combined so that their O(step^2) errors cancel."""
    return (4 * difference(step / 2) - difference(step)) / 3


def test_memory_gradients_equal_finite_differences(video_model, monkeypatch):
    """Backpropagation through three tracked frames reaches the memory modules with the right gradient.

    In float64 throughout: transformers rotates the memory attention's queries and keys in float32 whatever the
    model's dtype, whose round-off would swamp small differences, so the test rotates them in float64.
    """
    monkeypatch.setattr(modeling_sam2_video, "apply_rotary_pos_emb_2d", rope_in_input_precision)
    model = load_sam2("tiny-random", video=True).double().train()
    for module in model.modules():  # the memory attention's dropouts would make the function random
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_p"):
            module.dropout_p = 0.0
    segmenter = VideoSegmenter(model, memory_dtype=None)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    coords = torch.tensor([[[40.0, 40.0], [150.0, 140.0]]], dtype=torch.float64)
    weights = torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64)
    features = segmenter.encode_frames(pixel_values, frozen=True)

    def loss() -> torch.Tensor:
        outputs = segmenter(features, point_coords=coords, point_labels=torch.tensor([[2, 3]]))
        # The tracked frames' raw candidates: they depend on the memory of every earlier frame.
        return sum((steps[0].mask_logits[0] * weights[t - 1]).sum() for t, steps in enumerate(outputs) if t > 0)

    # One weight of every kind of memory module: the memory attention (self- and cross-attention), the memory
    # encoder (mask downsampler and projection), the object pointers and the memories' temporal encodings.
    checked = [
        "memory_attention.layers.0.cross_attn_image.v_proj.weight",
        "memory_attention.layers.1.self_attn.q_proj.weight",
        "memory_encoder.projection.weight",
        "memory_encoder.mask_downsampler.layers.0.conv.weight",
        "object_pointer_proj.layers.0.weight",
        "memory_temporal_positional_encoding",
        "temporal_positional_encoding_projection_layer.weight",
    ]  # (the occlusion embedding only enters where an object is judged absent, which it is on no frame here)
    parameters = dict(model.named_parameters())
    features.maps = [level.detach() for level in features.maps]
    features.position = features.position.detach()
    loss().backward()
    for name in checked:
        parameter = parameters[name]
        assert parameter.grad is not None and bool(parameter.grad.abs().max() > 0), f"{name}: no gradient reaches it"
        # Its most sensitive entry, so the difference stands well above round-off.
        index = np.unravel_index(int(parameter.grad.abs().argmax()), parameter.shape)
        analytic = parameter.grad[index].item()
        numeric = richardson(lambda h: central_difference(loss, parameter, index, h), STEP)
        assert analytic == pytest.approx(numeric, rel=1e-4), name
