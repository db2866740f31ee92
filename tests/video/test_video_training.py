"""The clip training forward's correction clicks, and the loss over frames against a sum computed frame by frame."""

from pathlib import Path

import pytest
import torch

from sam2_peft.data import Preprocessor, PromptConfig
from sam2_peft.data.clips import ClipDataset, collate_clips
from sam2_peft.data.config import DataConfig
from sam2_peft.losses import LossWeights, downsample_targets, sam2_loss
from sam2_peft.models import load_sam2
from sam2_peft.strategies import apply_strategy
from sam2_peft.video.training import ClipSegmenter, video_loss

SAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "data_video")


@pytest.fixture(scope="module")
def clips():
    model = load_sam2("tiny-random-video", video=True)
    splits = DataConfig(data=SAMPLE, task="video").load_clip_splits(seed=0)
    dataset = ClipDataset(splits["train"], Preprocessor.from_model(model), clip_length=4,
                          prompts=PromptConfig(box_prob=0.0), seed=1)  # clicks: the first frame gets corrections too
    return collate_clips([dataset[0], dataset[1]])


def test_correction_frames_get_their_clicks_and_become_prompted_memories(clips):
    module = ClipSegmenter(apply_strategy(load_sam2("tiny-random-video", video=True), "memory")).eval()
    generator = torch.Generator().manual_seed(0)
    outputs = module(clips, correction_rounds=2, correction_frames=1, generator=generator)
    for frames in outputs:
        steps = [len(frame) for frame in frames]
        # The prompt frame and one sampled tracked frame: the first prediction, then one step per click.
        assert steps[0] == 3 and sorted(steps[1:]) == [1] * (len(steps) - 2) + [3]
        assert [frame[0].prompted for frame in frames] == [n == 3 for n in steps]


def test_video_loss_sums_the_image_loss_over_frames_per_object(clips):
    module = ClipSegmenter(apply_strategy(load_sam2("tiny-random-video", video=True), "memory"))
    outputs = module(clips)
    weights = LossWeights()
    losses = video_loss(outputs, clips, weights)
    num_objects = sum(len(clip["object_ids"]) for clip in clips)
    expected = 0.0
    for clip, frames in zip(clips, outputs):
        for t, (step,) in enumerate(frames):
            targets = downsample_targets(clip["masks"][t], step.mask_logits.shape[-2:])
            expected = expected + sam2_loss(step.mask_logits, step.iou_scores, step.object_score_logits, targets,
                                            clip["object_present"][t], weights, num_objects=num_objects)["loss"]
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    memory = module.segmenter.sam.memory_attention.layers[0].cross_attn_image.q_proj.weight
    assert memory.grad is not None and memory.grad.abs().sum() > 0
