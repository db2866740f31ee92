"""Data: sources -> label maps -> objects -> SAM2 preprocessing, augmentation and prompts -> batches.

    from torch.utils.data import DataLoader
    from sam2_peft.data import (AugmentConfig, Preprocessor, PromptConfig, SegmentationDataset, collate_objects,
                                inspect_dataset, load_source)

    print(inspect_dataset("examples/data"))
    splits = load_source("examples/data")
    pre = Preprocessor.from_model(model)
    train = SegmentationDataset(splits["train"], pre, augment=AugmentConfig(), prompts=PromptConfig())
    loader = DataLoader(train, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_objects)
"""

from sam2_peft.data.batching import SegmentationDataset, collate_objects
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
    "collate_objects",
    "decode_row",
    "eval_prompts",
    "extract_objects",
    "inspect_dataset",
    "load_folder",
    "load_source",
    "mask_to_box",
    "normalize_intensity",
    "sample_correction_clicks",
    "simulate_prompts",
]
