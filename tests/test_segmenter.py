import weakref
from unittest import mock

import pytest
import torch

from sam2_peft.family import encode_from_prefix, encode_prefix
from sam2_peft.interactive import InteractiveSegmenter
from sam2_peft.models import load_sam2
from sam2_peft.segmenter import PADDING, Sam2Segmenter, combine_prompts
from sam2_peft.strategies import apply_strategy


def test_matches_sam2model_forward_for_boxes(tiny_model):
    # Sam2Model.forward needs the same number of boxes per image: two each, so both paths can run.
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[[10.0, 20, 100, 120], [50, 50, 200, 210]], [[5.0, 6, 70, 80], [100, 100, 250, 250]]])
    with torch.no_grad():
        reference = tiny_model(pixel_values=pixel_values, input_boxes=boxes)
        coords, labels = combine_prompts(boxes=boxes.reshape(-1, 4))
        ours = Sam2Segmenter(tiny_model)(
            pixel_values, image_index=torch.tensor([0, 0, 1, 1]), point_coords=coords, point_labels=labels
        )
    torch.testing.assert_close(ours.mask_logits, reference.pred_masks.reshape(4, 3, 64, 64), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.iou_scores, reference.iou_scores.reshape(4, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.object_score_logits, reference.object_score_logits.reshape(4, 1), rtol=0, atol=1e-6)


def test_matches_sam2model_forward_for_points_and_mask_prompt(tiny_model):
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    points = torch.tensor([[[30.0, 40], [60, 60]], [[200.0, 10], [90, 150]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    mask_inputs = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = tiny_model(
            pixel_values=pixel_values,
            input_points=points.unsqueeze(1),
            input_labels=labels.unsqueeze(1),
            input_masks=mask_inputs,
            multimask_output=False,
        )
        ours = Sam2Segmenter(tiny_model)(
            pixel_values,
            image_index=torch.tensor([0, 1]),
            point_coords=points,
            point_labels=labels,
            mask_inputs=mask_inputs,
            multimask_output=False,
        )
    assert ours.mask_logits.shape == (2, 1, 64, 64)
    torch.testing.assert_close(ours.mask_logits, reference.pred_masks[:, 0], rtol=0, atol=1e-6)


def test_objects_are_independent_of_their_batch_neighbours(tiny_model, tiny_batch):
    segmenter = Sam2Segmenter(tiny_model)
    with torch.no_grad():
        batched = segmenter(**tiny_batch)
        alone = segmenter(
            tiny_batch["pixel_values"][1:],
            image_index=torch.tensor([0]),
            point_coords=tiny_batch["point_coords"][2:],
            point_labels=tiny_batch["point_labels"][2:],
        )
    assert batched.mask_logits.shape == (3, 3, 64, 64)
    assert batched.iou_scores.shape == (3, 3) and batched.object_score_logits.shape == (3, 1)
    torch.testing.assert_close(batched.mask_logits[2:], alone.mask_logits, rtol=1e-5, atol=1e-5)


def test_cached_image_features_give_the_same_outputs(tiny_model, tiny_batch):
    segmenter = Sam2Segmenter(tiny_model)
    with torch.no_grad():
        direct = segmenter(**tiny_batch)
        features = segmenter.encode_images(tiny_batch["pixel_values"])
        prompts = {k: v for k, v in tiny_batch.items() if k != "pixel_values"}
        cached = segmenter(image_features=features, **prompts)
        projected = segmenter.project(features)
        from_projected = segmenter(decoder_features=projected, **prompts)
    assert [tuple(f.shape) for f in features] == [(2, 64, 64, 64), (2, 64, 32, 32), (2, 64, 16, 16)]
    assert [tuple(f.shape) for f in projected] == [(2, 8, 64, 64), (2, 16, 32, 32), (2, 64, 16, 16)]
    torch.testing.assert_close(cached.mask_logits, direct.mask_logits, rtol=0, atol=0)
    torch.testing.assert_close(from_projected.mask_logits, direct.mask_logits, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["lora", "full"])
@pytest.mark.parametrize("rounds", [0, 1])
def test_encoded_maps_are_let_go_before_the_decoder_runs(strategy, rounds, tiny_batch):
    """Once projected, the 256-channel S/4 and S/8 maps are only needed to train `conv_s0` and `conv_s1`: nothing
    else holds them while the decoder runs (64 + 16 MB per image at 1024 px). With the decoder frozen (LoRA)
    autograd does not save them either, so they are freed; full fine-tuning saves them for the weight gradients."""
    model = apply_strategy(load_sam2("tiny-random"), strategy).train()
    interactive = InteractiveSegmenter(model)
    segmenter = interactive.segmenter
    encoded, alive, saved = [], [], set()
    encode, decode = segmenter.encode_images, segmenter._decoder(segmenter.backend_for(torch.device("cpu")))

    def encode_images(pixel_values):
        maps = encode(pixel_values)
        encoded.extend(weakref.ref(level) for level in maps)
        return maps

    def record_and_decode(*args, **kwargs):
        alive.append([level() is not None for level in encoded])
        return decode(*args, **kwargs)

    def pack(tensor):
        # Matched against the maps alive now: a freed map's memory may be reused by a tensor saved later.
        storage = tensor.untyped_storage().data_ptr()
        saved.update(index for index, level in enumerate(encoded)
                     if level() is not None and level().untyped_storage().data_ptr() == storage)
        return tensor

    batch = {**tiny_batch, "masks": torch.zeros(3, 256, 256, dtype=torch.bool)}
    with mock.patch.object(segmenter, "encode_images", encode_images), \
            mock.patch.object(segmenter, "_decoder", lambda backend: record_and_decode), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        interactive(batch, correction_rounds=rounds, generator=torch.Generator().manual_seed(0))
    # Only the S/16 embeddings go into the decoder as they are; every round reads the one projection.
    assert alive == [[False, False, True]] * (rounds + 1)
    assert [index in saved for index in range(2)] == [strategy == "full"] * 2


def test_combine_prompts_layout():
    coords, labels = combine_prompts(
        boxes=torch.tensor([[1.0, 2, 3, 4]]), points=torch.tensor([[[5.0, 6]]]), point_labels=torch.tensor([[PADDING]])
    )
    assert coords.tolist() == [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]
    assert labels.tolist() == [[2, 3, PADDING]]


def test_errors(tiny_model, tiny_batch):
    segmenter = Sam2Segmenter(tiny_model)
    prompts = {k: v for k, v in tiny_batch.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="exactly one of `pixel_values`, `image_features` or `decoder_features`"):
        segmenter(**prompts)
    with pytest.raises(ValueError, match="exactly one of"):
        segmenter(**tiny_batch, image_features=segmenter.encode_images(tiny_batch["pixel_values"]))
    with pytest.raises(ValueError, match="at least one prompt"):
        combine_prompts()
    with pytest.raises(ValueError, match="`point_labels` must have shape"):
        combine_prompts(points=torch.zeros(2, 3, 2), point_labels=torch.zeros(2, 2))
    with pytest.raises(TypeError, match="Expected a Sam2Model"):
        Sam2Segmenter(torch.nn.Linear(2, 2))
    one_image = {**tiny_batch, "pixel_values": tiny_batch["pixel_values"][:1]}  # objects of image 1 have no image
    with pytest.raises(ValueError, match=r"image_index has values from 0 to 1, outside \[0, 1\)"):
        segmenter(**one_image)


def test_decoder_gradients_match_sam2model_forward(tiny_model):
    """The training forward (GEMM projections, token layouts, `index_select` gathers) back-propagates like
    `Sam2Model`: to float rounding of each gradient's scale, plus a floor for the small ones (key biases have no true
    gradient at all: the softmax ignores them)."""
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[[10.0, 20, 100, 120], [50, 50, 200, 210]], [[5.0, 6, 70, 80], [100, 100, 250, 250]]])
    weights = torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    decoder = tiny_model.mask_decoder

    def gradients(loss):
        tiny_model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in decoder.named_parameters() if p.grad is not None}

    reference = gradients((tiny_model(pixel_values=pixel_values, input_boxes=boxes).pred_masks * weights).sum())
    coords, labels = combine_prompts(boxes=boxes.reshape(-1, 4))
    ours = Sam2Segmenter(tiny_model)(
        pixel_values, image_index=torch.tensor([0, 0, 1, 1]), point_coords=coords, point_labels=labels
    )
    ours = gradients((ours.mask_logits * weights.reshape(4, 3, 64, 64)).sum())
    assert {"conv_s0.weight", "conv_s1.weight", "upscale_conv1.weight"} <= ours.keys() == reference.keys()
    for name, grad in ours.items():
        atol = 2e-5 * reference[name].abs().max().item() + 2e-6
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("path", ["encode_images", "encode_from_prefix"])
def test_fpn_maps_are_the_neck_without_position_encodings(tiny_model, path):
    """Both ways of running the encoder (whole, or from a cached prefix) give transformers' FPN maps and gradients,
    and never build the neck's sine position encodings, which transformers keeps in a global one-entry cache (the
    largest level's, 64 MB per image at 1024 px)."""
    pixel_values = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    encoder = tiny_model.vision_encoder
    weights = [torch.randn(2, 64, s, s, generator=torch.Generator().manual_seed(s)) for s in (64, 32, 16)]

    def maps_and_grads(encode):
        tiny_model.zero_grad()
        maps = encode()
        sum((m * w).sum() for m, w in zip(maps, weights)).backward()
        return maps, {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}

    embedding = type(encoder.neck.position_encoding)
    with mock.patch.object(embedding, "forward", autospec=True, side_effect=embedding.forward) as built:
        reference, reference_grads = maps_and_grads(lambda: encoder(pixel_values).fpn_hidden_states)
        assert built.call_count == 4  # transformers builds one per neck level (the decoder reads three)
        built.reset_mock()
        if path == "encode_images":
            maps, grads = maps_and_grads(lambda: Sam2Segmenter(tiny_model).encode_images(pixel_values))
        else:
            prefix = encode_prefix(encoder, pixel_values, 4)
            maps, grads = maps_and_grads(lambda: encode_from_prefix(encoder, prefix, 4))
        built.assert_not_called()
    for ours, theirs in zip(maps, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys() and any(name.startswith("neck.convs") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_compile_decoder_keeps_outputs_gradients_and_parameter_names(tiny_model, tiny_batch):
    segmenter = Sam2Segmenter(tiny_model)
    inputs = {key: value for key, value in tiny_batch.items() if key != "pixel_values"}
    with torch.no_grad():
        features = segmenter.encode_images(tiny_batch["pixel_values"])
    graphs = []

    def eager_recording(graph, example_inputs):  # a dynamo backend that runs the captured graph as it is
        graphs.append(graph)
        return graph.forward

    def run():
        tiny_model.zero_grad()
        out = segmenter(image_features=features, **inputs)
        out.mask_logits.square().mean().backward()
        return out.mask_logits, {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}

    reference, reference_grads = run()
    names = list(tiny_model.state_dict())
    # No inductor, so no C++ compiler is needed and the test stays fast.
    segmenter.compile_decoder(backend=eager_recording)
    compiled, grads = run()
    assert graphs  # the decoder ran compiled
    assert list(tiny_model.state_dict()) == names
    torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-6)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)
