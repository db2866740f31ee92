"""sam2-peft: fine-tune SAM2 on your own images with one switch between strategies.

    from sam2_peft import load_sam2, apply_strategy, trainable_summary
    model = apply_strategy(load_sam2("facebook/sam2.1-hiera-tiny"), "lora", r=8)
    print(trainable_summary(model))
"""

from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.segmenter import Sam2Segmenter, SegmenterOutput, combine_prompts
from sam2_peft.strategies import apply_strategy, trainable_summary
from sam2_peft.targets import resolve_targets

__version__ = "0.1.0"
__all__ = [
    "Sam2Segmenter",
    "SegmenterOutput",
    "apply_strategy",
    "combine_prompts",
    "load_sam2",
    "model_fingerprint",
    "resolve_targets",
    "trainable_summary",
]
