"""Data: sources -> label maps -> objects -> SAM2 preprocessing, augmentation and prompts -> batches.

    from torch.utils.data import DataLoader
    from sam2_peft.data import (AugmentConfig, Preprocessor, PromptConfig, SegmentationDataset, collate_objects,
                                inspect_dataset, load_source)

    print(inspect_dataset("examples/data"))
    splits = load_source("examples/data")
    pre = Preprocessor.from_model(model)
    train = SegmentationDataset(splits["train"], pre, augment=AugmentConfig(), prompts=PromptConfig())
    loader = DataLoader(train, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_objects)

    clips = load_clips("examples/data_video")                       # videos/<clip>/ frames or NIfTI volumes
    video_train = ClipDataset(clips["train"], pre, clip_length=8, prompts=PromptConfig())
    video_loader = DataLoader(video_train, batch_size=2, shuffle=True, collate_fn=collate_clips)
"""

from sam2_peft.data.batching import SegmentationDataset, collate_objects
from sam2_peft.data.clip_frames import read_video
from sam2_peft.data.clip_sources import ClipRecord, load_clips
from sam2_peft.data.clips import ClipDataset, ClipReport, collate_clips
from sam2_peft.data.intensity import CT_WINDOWS, IntensityConfig, normalize_intensity
from sam2_peft.data.io import DataError, decode_row
from sam2_peft.data.objects import Objects, extract_objects, mask_to_box
from sam2_peft.data.prompts import (
    EvalPrompt,
    PromptConfig,
    Prompts,
    eval_prompts,
    sample_correction_clicks,
    simulate_prompts,
)
from sam2_peft.data.report import DataReport, SplitReport, inspect_dataset
from sam2_peft.data.sources import load_folder, load_source
from sam2_peft.data.transforms import AugmentConfig, JointAugment, Preprocessor

__all__ = [
    "CT_WINDOWS",
    "AugmentConfig",
    "ClipDataset",
    "ClipRecord",
    "ClipReport",
    "DataError",
    "DataReport",
    "EvalPrompt",
    "IntensityConfig",
    "JointAugment",
    "Objects",
    "Preprocessor",
    "PromptConfig",
    "Prompts",
    "SegmentationDataset",
    "SplitReport",
    "collate_clips",
    "collate_objects",
    "decode_row",
    "eval_prompts",
    "extract_objects",
    "inspect_dataset",
    "load_clips",
    "load_folder",
    "load_source",
    "mask_to_box",
    "normalize_intensity",
    "read_video",
    "sample_correction_clicks",
    "simulate_prompts",
]
